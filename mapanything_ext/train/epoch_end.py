"""What an epoch leaves, as MapAnything's `train()` leaves it: the epoch's line in log.txt (epochs
counted from 1, `train_<k>` and `<test set>_<k>_avg/_med`), its test statistics in TensorBoard,
`best_so_far` (the lowest test loss median), and one save under every name due: checkpoint-last when
the epoch is a multiple of save_freq or the last, checkpoint-best when its test loss median is the
lowest so far, checkpoint-<e> every keep_freq, checkpoint-final after the last epoch.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch

from mapanything_ext.cluster import faults
from mapanything_ext.cluster.preemption import StopPoint
from mapanything_ext.console import say
from mapanything_ext.checkpoint import link_on_master
from mapanything_ext.run_log import append_epoch_record, read_epoch_records
from mapanything_ext.train.run import Run
from mapanything_ext.train.saving import save
from mapanything_ext.train.state import Position

# Per-view loss terms (MapAnything's criterion has dozens) stay in log.txt, out of console lines.
PER_VIEW = re.compile(r"_view\d+_(avg|med)$|_view\d+$")


def summary(prefix: str, stats: dict) -> str:
    """`<prefix><k>=<v>` for the statistics a console line shows (numbers, no per-view terms)."""
    return ", ".join(f"{prefix}{k}={v:.4g}" for k, v in stats.items()
                     if isinstance(v, float) and not PER_VIEW.search(k) and k != "time")


def end_epoch(run: Run, position: Position, record: dict, test_stats: dict | None) -> None:
    """Log the epoch, then save it once under every name due: last, best (lowest test loss_med),
    numbered every keep_freq epochs (checkpoint-<e>, e counted from 1), final after the last epoch."""
    done = position.epoch + 1  # epochs trained, MapAnything's count
    is_best = record_epoch(run, position, done, record, test_stats)
    say("mapanything_ext", f"epoch {done}: " + summary("", record))
    position.epoch_complete = True
    names = names_due(run, done, is_best)
    if names:
        faults.at(StopPoint.END_OF_EPOCH)
        save(run, names, position)


def names_due(run: Run, done: int, is_best: bool) -> list[str]:
    """The names the state at the end of epoch `done` (counted from 1) is saved under."""
    last_epoch = done == int(run.tp.epochs)
    return [name for name, due in (
        ("checkpoint-last.pth", int(run.tp.save_freq) > 0 and done % int(run.tp.save_freq) == 0 or last_epoch),
        ("checkpoint-best.pth", is_best),
        (f"checkpoint-{done}.pth", int(run.tp.keep_freq) > 0 and done % int(run.tp.keep_freq) == 0),
        ("checkpoint-final.pth", last_epoch),
    ) if due]


def repair_names(run: Run, position: Position, source: Path) -> list[str]:
    """Resumed at the end of epoch `position.epoch`: give its state (the file `source`) every name that
    epoch's saves were due to give it, where a job killed between those saves left a name missing or on
    an older state (a stale checkpoint-best would start the next stage from the wrong weights). Returns
    the names given again (rank 0 links; the others return [])."""
    done = position.epoch
    if position.consumed or done == 0 or run.info.rank != 0:
        return []
    record = next((r for r in read_epoch_records(run.output_dir) if r.get("epoch") == done), {})
    was_best = record.get(f"{run.test_name}_loss_med") == position.best_so_far
    repaired = []
    for name in names_due(run, done, was_best):
        target = run.output_dir / name
        if not (target.exists() and os.path.samefile(target, source)):
            link_on_master(source, target)
            repaired.append(name)
    return repaired


def record_epoch(run: Run, position: Position, epochs_trained: int, record: dict, test_stats: dict | None) -> bool:
    """The epoch's line in log.txt and its test statistics in TensorBoard, with best_so_far brought up
    to date; True when the test loss median is the lowest so far (checkpoint-best's rule)."""
    is_best = test_stats is not None and test_stats["loss_med"] < position.best_so_far
    if is_best:
        position.best_so_far = test_stats["loss_med"]
    record["best_so_far"] = position.best_so_far
    if run.info.rank == 0:
        append_epoch_record(run.output_dir / "log.txt", record)
        if test_stats is not None:
            run.scalars.test(epochs_trained, run.test_name, test_stats)
    return is_best


def memory_record(run: Run) -> dict:
    """Peak GPU memory of this rank since the last record (GiB), then reset."""
    if run.info.device.type != "cuda":
        return {}
    gib = 2 ** 30
    record = {"peak_mem_allocated_gib": torch.cuda.max_memory_allocated() / gib,
              "peak_mem_reserved_gib": torch.cuda.max_memory_reserved() / gib}
    torch.cuda.reset_peak_memory_stats()
    return record
