"""Saving a training job's state, and its stop points (where a preemption signal is honoured).

A state is written once under its first name and linked under the others (last, best, numbered,
final: mapanything_ext.checkpoint). A stop point asks every rank whether any got a signal
(mapanything_ext/preemption.py); if so it writes checkpoint-last when the position is newer than
the newest checkpoint, then leaves for requeue.
"""

from __future__ import annotations

import time

from mapanything_ext import distributed as dist
from mapanything_ext import faults
from mapanything_ext.checkpoint import link_on_master, save_on_master
from mapanything_ext.config import to_plain
from mapanything_ext.train import rng_state
from mapanything_ext.train.position import Position
from mapanything_ext.train.run import Run


def save(run: Run, names: list[str], position: Position) -> None:
    """Write the state at `position` once under names[0] and link the other names to it."""
    faults.at("save")
    rng = dist.all_gather_object(rng_state.capture())
    sampler_state = run.train_loader.batch_sampler.state_dict(consumed=position.consumed)
    sampler_state["epoch"] = position.epoch
    ckpt = {
        "model": run.module.state_dict(),
        "optimizer": run.optimizer.state_dict(),
        "scaler": None,  # bf16 autocast needs no loss scaling (fp16 is refused at start)
        "epoch": position.epoch,
        "best_so_far": float(position.best_so_far),
        "args": to_plain(run.cfg),
        "resume": position.to_state(sampler_state, rng),
    }
    started = time.perf_counter()
    first = run.output_dir / names[0]
    save_on_master(ckpt, first)
    for name in names[1:]:
        link_on_master(first, run.output_dir / name)
    dist.barrier()
    run.saved_step = position.global_step
    if run.info.rank == 0:
        size = first.stat().st_size / 1e9
        links = f" (linked as {', '.join(names[1:])})" if len(names) > 1 else ""
        print(f"[mapanything_ext] saved {names[0]}{links} (epoch {position.epoch}, {position.consumed} batches done, "
              f"{size:.2f} GB) in {time.perf_counter() - started:.2f}s")


def ensure_final(run: Run, epochs: int) -> None:
    """A run resumed after its last epoch's saves but before its final link gets it now."""
    final, last = run.output_dir / "checkpoint-final.pth", run.output_dir / "checkpoint-last.pth"
    if run.info.rank == 0 and not final.exists() and last.exists():
        link_on_master(last, final)
    dist.barrier()


def stop_here(run: Run, position: Position, where: str) -> None:
    """A stop point: when any rank got a signal, save what is new, then leave for requeue."""
    if not run.watcher.stop_requested():
        return
    if run.bar is not None:
        run.bar.close()
    if position.global_step != run.saved_step:
        save(run, ["checkpoint-last.pth"], position)
        saved = f"checkpoint-last.pth written ({where}, epoch {position.epoch}, {position.consumed} batches done)"
    else:
        saved = f"nothing new to save ({where}; the newest checkpoint holds this position)"
    run.watcher.requeue_and_exit(saved)


def eval_stop_point(run: Run, position: Position, batch_index: int, phase: str) -> None:
    if batch_index == 0:
        faults.at(phase)
    stop_here(run, position, f"during {'the initial ' if phase == 'initial_eval' else ''}evaluation")
