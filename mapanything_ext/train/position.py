"""Where training stands, as it is written into checkpoints and read back on resume.

A position is the next thing to do: `epoch`, and `consumed`, how many batches of that epoch's
global batch list (datasets/batch_sampler.py) the job has used. `epoch_complete` marks a
position after the epoch's evaluation and saves; a position with every batch consumed but not
complete is one whose evaluation is still due (a stop during it reruns it on resume).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from mapanything_ext.train import rng_state


@dataclass
class Position:
    epoch: int = 0
    consumed: int = 0  # global batches of this epoch used (all ranks together)
    global_step: int = 0
    best_so_far: float = math.inf
    epoch_complete: bool = False
    # Running sums of the epoch in progress, so a mid-epoch resume logs the whole epoch.
    sums: dict = field(default_factory=dict)
    count: int = 0

    def to_state(self, sampler_state: dict, rng: list) -> dict:
        return {"epoch": self.epoch, "consumed": self.consumed, "epoch_complete": self.epoch_complete,
                "global_step": self.global_step, "sampler": sampler_state, "rng": rng,
                "sums": dict(self.sums), "count": self.count}

    @classmethod
    def from_state(cls, state: dict, best_so_far: float) -> "Position":
        consumed = state.get("consumed")
        if consumed is None:  # written before positions were global
            consumed = int(state["iteration"]) * int(state.get("sampler", {}).get("world_size", 1))
        return cls(epoch=int(state["epoch"]), consumed=int(consumed), global_step=int(state["global_step"]),
                   best_so_far=float(best_so_far), epoch_complete=bool(state["epoch_complete"]),
                   sums=dict(state.get("sums", {})), count=int(state.get("count", 0)))

    def next_epoch(self) -> None:
        self.epoch += 1
        self.consumed, self.sums, self.count, self.epoch_complete = 0, {}, 0, False


def restore_rng(saved, rank: int, world_size: int, seed: int, epoch: int) -> str | None:
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
