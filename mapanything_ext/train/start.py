"""Where a job starts training from: its own newest proven-good checkpoint, a run of MapAnything's
own loop (train_params.resume_ckpt), or model.pretrained; and the TensorBoard x it continues at.
"""

from __future__ import annotations

import os
import time
from concurrent.futures import Future
from pathlib import Path

from mapanything_ext.checkpoint import load_checkpoint, prepare_resume
from mapanything_ext.cluster import distributed as dist
from mapanything_ext.console import say
from mapanything_ext.config import to_plain
from mapanything_ext.run_log import Scalars, read_epoch_records
from mapanything_ext.train import epoch_end, settings_check, sharding, state
from mapanything_ext.train.evaluation_loop import test_statistics
from mapanything_ext.train.run import Run
from mapanything_ext.train.saving import save
from mapanything_ext.train.state import Position


def restore_or_start(run: Run, chosen: Future | None = None) -> tuple[Position, bool]:
    """Resume from the newest proven-good checkpoint (chosen: choose_in_background's answer in the
    making), else continue a run of MapAnything's own loop (train_params.resume_ckpt), else initialise
    from model.pretrained. Returns the position and whether it continues MapAnything's run."""
    resume_from = prepare_resume(run.output_dir, chosen) if run.tp.resume else None
    trust = bool(run.cfg.get("trust_foreign_checkpoints"))
    if resume_from is None and run.tp.resume_ckpt:
        position, notes = state.continue_mapanything_run(run, _outside_run_folder(run, run.tp.resume_ckpt), trust)
        for note in notes:
            say("mapanything_ext", note)
        return position, True
    if resume_from is None:
        pretrained = run.cfg.model.get("pretrained")
        if pretrained:
            from mapanything_ext.models.pretrained import load_pretrained

            load_pretrained(run.module, pretrained, trust_foreign=trust,
                            load=lambda usable: sharding.load_model_state(run.module, usable, strict=False))
            run.pretrained_fingerprint = settings_check.fingerprint(pretrained)
        return Position(), False
    position, notes = state.restore(run, resume_from)
    repaired = epoch_end.repair_names(run, position, resume_from)
    if repaired:
        notes.append(f"{', '.join(repaired)} given the state of epoch {position.epoch}'s end again (a job stopped "
                     f"between that epoch's saves had left them missing or on an older state)")
    run.saved_step = position.global_step
    run.background.saved(position.global_step)
    say("mapanything_ext", f"resumed from {resume_from}: epoch {position.epoch + 1}, {position.consumed} batches of "
        f"it done, global step {position.global_step}")
    for note in notes:
        say("mapanything_ext", f"resume: {note}")
    return position, False


# What an earlier run of the folder leaves that a new run must not take for its own.
RUN_RECORDS = ("log.txt", "tensorboard", "initial_eval.json", "wandb_run_id", "hf_export")


def supersede_if_upstream_changed(cfg, output_dir: Path, rank: int) -> str | None:
    """Collective. With train_params.restart_when_pretrained_changes: when model.pretrained's content
    differs from the one the folder's checkpoints started from (the earlier stage was trained again),
    rank 0 moves the earlier run's checkpoints and records to <output_dir>/superseded/<time>/, so this
    job trains the stage again from the new weights. Returns the console's note (None: nothing moved)."""
    note = _supersede(cfg, output_dir) if rank == 0 else None
    return dist.broadcast_object(note)


def _supersede(cfg, output_dir: Path) -> str | None:
    pretrained = cfg.model.get("pretrained")
    if not (cfg.train_params.get("restart_when_pretrained_changes") and pretrained and cfg.train_params.resume):
        return None
    stored, now = _started_from(output_dir), settings_check.fingerprint(pretrained)
    if stored is None or now is None or stored == now:
        return None
    target = output_dir / "superseded" / time.strftime("%Y%m%d-%H%M%S")
    target.mkdir(parents=True)
    moved = [p for p in sorted(output_dir.iterdir()) if p.name.startswith("checkpoint-") or p.name in RUN_RECORDS]
    for path in moved:
        os.replace(path, target / path.name)
    return (f"model.pretrained={pretrained} is not the file this stage trained from (its content changed: the "
            f"earlier stage was trained again): {len(moved)} files of the earlier run moved to {target}; training "
            f"this stage again from the new weights (train_params.restart_when_pretrained_changes)")


def _started_from(output_dir: Path) -> str | None:
    """The pretrained fingerprint the folder's newest readable checkpoint records, if any."""
    for name in ("checkpoint-last.pth", "checkpoint-final.pth", "checkpoint-best.pth"):
        path = output_dir / name
        if path.is_file():
            try:
                return load_checkpoint(path, map_location="cpu", mmap=True)["resume"].get("pretrained_fingerprint")
            except Exception:  # noqa: BLE001 -- an unreadable file is the resume's business (quarantine)
                continue
    return None


def open_scalars(run: Run, position: Position) -> Scalars:
    """TensorBoard (and W&B with logger=wandb) on rank 0, continuing at the x of the resumed step;
    W&B continues the run of the checkpoint's id (wandb_log.py)."""
    also = None
    if run.info.rank == 0 and run.cfg.logger.get("name") == "wandb":
        from mapanything_ext.wandb_log import open_wandb

        also, run.wandb_run_id = open_wandb(run.cfg, run.output_dir, run.wandb_run_id, to_plain(run.cfg))
    return Scalars(run.output_dir, run.info.rank == 0, resume_x=epoch_1000x(run, position), also=also)


def _outside_run_folder(run: Run, path: str) -> Path:
    """A foreign checkpoint inside the run folder would be swept into quarantine as not ours."""
    path = Path(path).resolve()
    if path.parent == run.output_dir.resolve():
        raise state.ContinuationError(
            f"train_params.resume_ckpt={path} lies in this run's output_dir, whose *.pth files must be ours: "
            f"give the continued run a new output_dir")
    return path


def test_continued_run(run: Run, position: Position) -> None:
    """As MapAnything's loop does when it resumes: the test of the epochs trained so far (its checkpoint
    was written before that test), logged for that epoch; then the state is saved in our format, so a
    stop from here on resumes from it (checkpoint-best too when the test beat the run's best)."""
    stats = None
    if position.epoch % int(run.tp.eval_freq) == 0:
        stats = test_statistics(run.module, run.test_criterion, run.test_loader, run.info.device, run.autocast)
    record = {"epoch": position.epoch, **({f"{run.test_name}_{k}": v for k, v in stats.items()} if stats else {}),
              "continued_from": str(run.tp.resume_ckpt)}
    best = epoch_end.record_epoch(run, position, position.epoch, record, stats)
    save(run, ["checkpoint-last.pth", *(["checkpoint-best.pth"] if best else [])], position)


def epoch_1000x(run: Run, position: Position) -> int:
    """TensorBoard's x of a position: the fractional epoch x 1000 (MapAnything's epoch_1000x)."""
    sampler = run.train_loader.batch_sampler
    return int((position.epoch + position.consumed / max(sampler.epoch_batches(), 1)) * 1000)


def relog_finished_epoch(run: Run, position: Position) -> None:
    """Resumed at an epoch's start: the test statistics of the epoch before share its x in TensorBoard
    (1000 x epochs trained), which the resume's purge hid; they come back from log.txt."""
    if run.info.rank != 0 or position.consumed or not position.epoch or not (run.output_dir / "log.txt").exists():
        return
    prefix = f"{run.test_name}_"
    for record in read_epoch_records(run.output_dir):
        if record.get("epoch") == position.epoch:
            stats = {k[len(prefix):]: v for k, v in record.items() if k.startswith(prefix)}
            if stats:
                run.scalars.test(position.epoch, run.test_name, stats)
