"""The saved training state: what a checkpoint holds and how a run gets it back, side by side.

A checkpoint is `{"model", "optimizer", "scaler", "epoch", "best_so_far", "args", "resume"}` (the
first six as MapAnything's own checkpoints name them; docs/checkpoints.md). `resume` is the
position: the next thing to do, `epoch`, and `consumed`, how many batches of that epoch's global
batch list (datasets/batch_sampler.py) the job has used; `epoch_complete` marks a position after
the epoch's evaluation and saves (a position with every batch consumed but not complete is one whose
evaluation is still due: a stop during it reruns it on resume); the sampler's state says what
`consumed` means, the RNG states of every rank, and the running sums of the epoch in progress.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from mapanything_ext import distributed as dist
from mapanything_ext.checkpoint import load_checkpoint
from mapanything_ext.config import to_plain
from mapanything_ext.train import rng_state


@dataclass
class Position:
    epoch: int = 0
    consumed: int = 0  # global batches of this epoch used (all ranks together)
    global_step: int = 0
    best_so_far: float = math.inf  # the lowest test loss_med so far (checkpoint-best's)
    epoch_complete: bool = False
    # Running sums of the epoch in progress (one value per step each), so a mid-epoch resume logs the
    # whole epoch; counters: the epoch's optimizer steps, their gradient norms, skipped steps.
    sums: dict = field(default_factory=dict)
    count: int = 0
    counters: dict = field(default_factory=dict)

    def next_epoch(self) -> None:
        self.epoch += 1
        self.consumed, self.sums, self.count, self.counters, self.epoch_complete = 0, {}, 0, {}, False

    def accumulate(self, values: dict) -> None:
        for key, value in values.items():
            self.sums[key] = self.sums.get(key, 0.0) + float(value)
        self.count += 1


def checkpoint_of(run, position: Position) -> dict:
    """The state to write at `position` (collective: every rank's RNG state is gathered)."""
    rng = dist.all_gather_object(rng_state.capture())
    sampler = run.train_loader.batch_sampler.state_dict(consumed=position.consumed)
    sampler["epoch"] = position.epoch
    return {
        "model": run.module.state_dict(),
        "optimizer": run.optimizer.state_dict(),
        "scaler": None,  # bf16 autocast needs no loss scaling (fp16 is refused at start)
        "epoch": position.epoch,
        "best_so_far": float(position.best_so_far),
        "args": to_plain(run.cfg),
        "resume": {"epoch": position.epoch, "consumed": position.consumed, "epoch_complete": position.epoch_complete,
                   "global_step": position.global_step, "sampler": sampler, "rng": rng,
                   "sums": dict(position.sums), "count": position.count, "counters": dict(position.counters)},
    }


def restore(run, path: Path) -> tuple[Position, list[str]]:
    """Model, optimizer, RNG and sampler of `run` as the checkpoint at `path` left them; returns the
    position and notes for the console (a changed world size, say)."""
    ckpt = load_checkpoint(path, map_location="cpu", mmap=True)
    try:
        run.module.load_state_dict(ckpt["model"])
    except RuntimeError as err:
        raise RuntimeError(
            f"cannot resume from {path}: it was written with a different model configuration than this run's "
            f"(use the original overrides, or a new output_dir to start over). {str(err).splitlines()[0]}"
        ) from None
    try:
        run.optimizer.load_state_dict(ckpt["optimizer"])
    except ValueError as err:
        raise RuntimeError(
            f"cannot resume from {path}: its optimizer has other parameter groups than this run's ({err}); "
            f"train_params.submodule_configs or the model changed. Use the original overrides, or a new output_dir."
        ) from None
    state = ckpt["resume"]
    position = _position_of(state, ckpt["best_so_far"])
    notes = [_restore_rng(state["rng"], run.info.rank, run.info.world_size, int(run.tp.seed), position.epoch)]
    saved_world = int(state.get("sampler", {}).get("world_size", run.info.world_size))
    if position.epoch_complete:
        position.next_epoch()
        if saved_world != run.info.world_size:
            notes.append(f"world size changed from {saved_world} to {run.info.world_size} at the end of epoch "
                         f"{position.epoch - 1}: the next epoch is dealt to {run.info.world_size} rank(s)")
    else:
        sampler_state = {**state["sampler"], "consumed": position.consumed, "epoch": position.epoch}
        notes.append(run.train_loader.batch_sampler.load_state_dict(sampler_state))
    return position, [note for note in notes if note]


def _position_of(state: dict, best_so_far: float) -> Position:
    consumed = state.get("consumed")
    if consumed is None:  # written before positions were global
        consumed = int(state["iteration"]) * int(state.get("sampler", {}).get("world_size", 1))
    return Position(epoch=int(state["epoch"]), consumed=int(consumed), global_step=int(state["global_step"]),
                    best_so_far=float(best_so_far), epoch_complete=bool(state["epoch_complete"]),
                    sums=dict(state.get("sums", {})), count=int(state.get("count", 0)),
                    counters=dict(state.get("counters", {})))


def _restore_rng(saved, rank: int, world_size: int, seed: int, epoch: int) -> str | None:
    """This rank's saved RNG state; a rank the writer did not have is seeded afresh (returns a note)."""
    if isinstance(saved, dict):  # one state for all ranks (single-process writer)
        saved = [saved]
    if rank < len(saved) and len(saved) == world_size:
        rng_state.restore(saved[rank])
        return None
    if rank < len(saved):
        rng_state.restore(saved[rank])
    else:
        rng_state.seed_everything(seed + 1000 * (epoch + 1) + rank)
    return (f"RNG states of {len(saved)} rank(s) saved, {world_size} now: ranks below {len(saved)} take theirs, "
            f"the others are seeded from train_params.seed; the run is exact, not bitwise equal to one "
            f"that kept its world size")
