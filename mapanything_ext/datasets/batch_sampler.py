"""Dynamic batch sampler: a per-GPU image budget instead of a fixed batch size.

Every sample has a known view count (`num_views_of(index)` on the dataset, or a
fixed count). Samples are bucketed by that count, each bucket is shuffled and cut
into batches of `max_num_of_imgs_per_gpu // views` samples, so no step exceeds the
image budget and every batch collates (all its samples have the same view count).
The batches of an epoch form one global list, shuffled, that depends only on
(seed, epoch, image budget, view counts): never on the number of ranks.

The ranks walk that list together, one step = the next `world_size` batches, dealt
round-robin (rank r takes the r-th of them). Where an epoch stands is therefore one
global number, `consumed`: how many batches of the list the job has used. A resume
continues at batch `consumed` whatever the world size is now, so no sample of the
epoch is seen twice or skipped; the remaining batches are cut to a multiple of the
world size (every rank runs the same number of steps, which DDP needs), dropping at
most world_size - 1 batches at the epoch's end, as every epoch does.

`max_steps` (train_params.max_steps_per_epoch) ends an epoch after that many steps:
for smoke runs on real data.

`lockstep=False` (evaluation) deals every batch, so ranks may get one batch more or less
(a rank may get none): an evaluation sees each sample once, whatever the world size.

`state_dict()` records what `consumed` means (image budget, dataset length, seed,
shuffle, world size). `load_state_dict()` maps a changed world size and refuses any
other change with a message naming the value.
"""

from __future__ import annotations

from typing import Callable, Iterator

import numpy as np
from torch.utils.data import Sampler


class SamplerStateMismatch(ValueError):
    """A saved sampler position cannot be mapped onto this run's batches."""


class DynamicBatchSampler(Sampler[list[int]]):
    def __init__(
        self,
        num_samples: int,
        views_of: Callable[[int], int],
        max_num_of_imgs_per_gpu: int,
        shuffle: bool = True,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        drop_last: bool = False,
        max_steps: int | None = None,
        lockstep: bool = True,
    ):
        if num_samples <= 0:
            raise ValueError("the dataset is empty: no sample to batch (check the data roots and split)")
        self.num_samples = num_samples
        self.max_imgs = int(max_num_of_imgs_per_gpu)
        self.shuffle = shuffle
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.drop_last = drop_last
        self.max_steps = int(max_steps) if max_steps else None
        self.lockstep = lockstep
        self.epoch = 0
        self.consumed = 0  # batches of this epoch's global list used before the next pass
        self._counts = np.array([views_of(i) for i in range(num_samples)], dtype=np.int64)
        too_many = self._counts > self.max_imgs
        if too_many.any():
            first = int(np.flatnonzero(too_many)[0])
            raise ValueError(
                f"sample {first} has {self._counts[first]} views but train_params.max_num_of_imgs_per_gpu="
                f"{self.max_imgs}: raise the image budget or lower the dataset's num_views"
            )
        if lockstep and self.epoch_batches() < world_size:
            raise ValueError(
                f"{self.epoch_batches()} batches cannot be shared by {world_size} ranks: need more samples or "
                f"fewer ranks"
            )

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _global_batches(self) -> list[list[int]]:
        """This epoch's batches, in order, before they are dealt to ranks."""
        rng = np.random.default_rng([self.seed, self.epoch])
        batches = []
        for count in np.unique(self._counts):
            members = np.flatnonzero(self._counts == count)
            if self.shuffle:
                members = rng.permutation(members)
            size = max(1, self.max_imgs // int(count))
            for start in range(0, len(members), size):
                chunk = members[start:start + size].tolist()
                if len(chunk) == size or not self.drop_last:
                    batches.append(chunk)
        if self.shuffle:
            batches = [batches[i] for i in rng.permutation(len(batches))]
        if self.max_steps:
            batches = batches[:self.max_steps * self.world_size]
        return batches

    def epoch_batches(self) -> int:
        """Global batches one epoch uses at this world size (the epoch's length for the LR schedule)."""
        total = len(self._global_batches())
        return total // self.world_size * self.world_size if self.lockstep else total

    def _remaining(self) -> list[list[int]]:
        rest = self._global_batches()[self.consumed:]
        return rest[:len(rest) // self.world_size * self.world_size] if self.lockstep else rest

    def __len__(self) -> int:
        """Steps this rank runs in the next pass (the rest of the epoch after a resume)."""
        return len(self._remaining()[self.rank::self.world_size])

    def __iter__(self) -> Iterator[list[int]]:
        mine = self._remaining()[self.rank::self.world_size]
        self.consumed = 0  # a resume offset applies to one pass only
        yield from mine

    def state_dict(self, consumed: int | None = None) -> dict:
        """The position `consumed` (default: the resume offset) and what it means."""
        return {"epoch": self.epoch, "consumed": self.consumed if consumed is None else int(consumed),
                "seed": self.seed, "shuffle": self.shuffle, "world_size": self.world_size,
                "max_num_of_imgs_per_gpu": self.max_imgs, "num_samples": self.num_samples}

    def load_state_dict(self, state: dict) -> str | None:
        """Continue at the saved position; returns a note when the world size changed, else None."""
        if "consumed" not in state:  # written before positions were global: start_batch steps per rank
            state = {**state, "consumed": int(state["start_batch"]) * int(state.get("world_size", 1))}
        ours = self.state_dict()
        for key, meaning in (("max_num_of_imgs_per_gpu", "train_params.max_num_of_imgs_per_gpu"),
                             ("num_samples", "the training dataset's length"), ("seed", "train_params.seed"),
                             ("shuffle", "shuffling")):
            if key in state and state[key] != ours[key]:
                raise SamplerStateMismatch(
                    f"cannot continue the epoch where it stopped: {meaning} was {state[key]} when the checkpoint "
                    f"was written and is {ours[key]} now, so its position ({state['consumed']} batches into epoch "
                    f"{state['epoch']}) means other samples. Use the original value, or a new output_dir."
                )
        self.epoch, self.consumed = int(state["epoch"]), int(state["consumed"])
        saved_world = int(state.get("world_size", self.world_size))
        if saved_world != self.world_size:
            return (f"world size changed from {saved_world} to {self.world_size}: epoch {self.epoch} continues at "
                    f"global batch {self.consumed} of {len(self._global_batches())}, each remaining batch once")
        return None
