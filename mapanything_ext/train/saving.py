"""Writing a training job's state, and its stop points (where a preemption signal is honoured).

A state is written once under its first name and linked under the others (last, best, numbered,
final: mapanything_ext.checkpoint). A stop point asks every rank whether any got a signal
(mapanything_ext/cluster/preemption.py); if so it writes checkpoint-last when the position is newer than
the newest checkpoint, then leaves for requeue. Mid-epoch saves go to a writer thread
(background_save.py); every other save and every stop waits for it first.
"""

from __future__ import annotations

import time

from mapanything_ext.checkpoint import link_on_master, save_on_master
from mapanything_ext.cluster import distributed as dist
from mapanything_ext.cluster.preemption import StopPoint
from mapanything_ext.console import say
from mapanything_ext.train.state import Position, checkpoint_of


def save(run, names: list[str], position: Position) -> None:
    """Write the state at `position` once under names[0] and link the other names to it."""
    ckpt = checkpoint_of(run, position)
    started = time.perf_counter()
    first = run.output_dir / names[0]
    if run.info.rank == 0:
        run.background.wait()  # a background write of checkpoint-last ends before this one starts
    save_on_master(ckpt, first, keep_previous_as=_previous_of(run, names[0]))
    for name in names[1:]:
        link_on_master(first, run.output_dir / name)
    dist.barrier()
    run.saved_step = position.global_step
    run.background.saved(position.global_step)
    if run.info.rank == 0:
        size = first.stat().st_size / 1e9
        links = f" (linked as {', '.join(names[1:])})" if len(names) > 1 else ""
        say("mapanything_ext", f"saved {names[0]}{links} (epoch {position.epoch}, {position.consumed} batches done, "
            f"{size:.2f} GB) in {time.perf_counter() - started:.2f}s")


def _previous_of(run, name: str):
    """The state checkpoint-last held stays as checkpoint-previous: a damaged new file (one flipped bit
    in last, best and final when they are one file) then costs one save, never the run."""
    return run.output_dir / "checkpoint-previous.pth" if name == "checkpoint-last.pth" else None


def save_in_background_if_due(run, position: Position, before=None) -> None:
    """A mid-epoch checkpoint-last when one is due (background_save.py), at a step with no gradient
    pending; `before()` runs first when saving (the epoch's meter reads the steps still queued, so
    the state's running sums are whole)."""
    saver = run.background
    if not saver.enabled:
        return
    saver.prepare_once(lambda: {"model": run.module.state_dict(), "optimizer": run.optimizer.state_dict()})
    if not saver.due(run.watcher.also_at_last_poll):
        return
    if before is not None:
        before()
    state = checkpoint_of(run, position)  # collective: every rank's RNG state
    if run.info.rank == 0:
        path = run.output_dir / "checkpoint-last.pth"
        saver.start(state, path, _previous_of(run, path.name), position.global_step, run.saved_step)
    run.saved_step = position.global_step
    saver.saved(position.global_step)


def ensure_final(run, epochs: int) -> None:
    """A run resumed after its last epoch's saves but before its final link gets it now."""
    final, last = run.output_dir / "checkpoint-final.pth", run.output_dir / "checkpoint-last.pth"
    if run.info.rank == 0 and not final.exists() and last.exists():
        link_on_master(last, final)
    dist.barrier()


def stop_here(run, position: Position, point: StopPoint, on_stop=None) -> None:
    """A stop point: when any rank got a signal, save what is new, then leave for requeue. `on_stop()`
    runs first when stopping (the epoch loop closes its progress bar, so the console's lines stay whole)."""
    if not run.watcher.stop_requested():
        return
    if on_stop is not None:
        on_stop()
    run.saved_step = run.background.settle(run.saved_step)  # a background write in flight ends first
    if position.global_step != run.saved_step:
        save(run, ["checkpoint-last.pth"], position)
        saved = (f"checkpoint-last.pth written at stop point {point.value} ({point.text}; epoch {position.epoch}, "
                 f"{position.consumed} batches done)")
    else:
        saved = f"nothing new to save at stop point {point.value} ({point.text}; the newest checkpoint holds it)"
    run.watcher.requeue_and_exit(saved)
