"""Dynamic batch sampler: a per-GPU image budget instead of a fixed batch size.

Every sample has a known view count (`num_views_of(index)` on the dataset, or a
fixed count). Samples are bucketed by that count, each bucket is shuffled and cut
into batches of `max_num_of_imgs_per_gpu // views` samples, so no step exceeds the
image budget and every batch collates (all its samples have the same view count).
The batches of an epoch are shuffled globally and dealt round-robin to the ranks:
rank r takes batches r, r + W, r + 2W, ...; the list is cut to a multiple of the
world size so every rank runs the same number of steps (DDP needs lockstep).

The order depends only on (seed, epoch), so the position inside an epoch is one
integer: `state_dict()` / `load_state_dict()` save and restore it, and iteration
resumes at the next batch.
"""

from __future__ import annotations

from typing import Callable, Iterator

import numpy as np
from torch.utils.data import Sampler


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
        self.epoch = 0
        self.start_batch = 0
        self._counts = np.array([views_of(i) for i in range(num_samples)], dtype=np.int64)
        too_many = self._counts > self.max_imgs
        if too_many.any():
            first = int(np.flatnonzero(too_many)[0])
            raise ValueError(
                f"sample {first} has {self._counts[first]} views but train_params.max_num_of_imgs_per_gpu="
                f"{self.max_imgs}: raise the image budget or lower the dataset's num_views"
            )

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _all_batches(self) -> list[list[int]]:
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
        usable = (len(batches) // self.world_size) * self.world_size
        if usable == 0:
            raise ValueError(
                f"{len(batches)} batches cannot be shared by {self.world_size} ranks: need more samples or fewer ranks"
            )
        return batches[:usable]

    def __len__(self) -> int:
        """Batches this rank runs in a full epoch."""
        return len(self._all_batches()) // self.world_size

    def __iter__(self) -> Iterator[list[int]]:
        mine = self._all_batches()[self.rank::self.world_size]
        start, self.start_batch = self.start_batch, 0  # a resume offset applies to one pass only
        yield from mine[start:]

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "start_batch": self.start_batch, "seed": self.seed,
                "world_size": self.world_size}

    def load_state_dict(self, state: dict) -> None:
        if state.get("world_size", self.world_size) != self.world_size or state.get("seed", self.seed) != self.seed:
            raise ValueError(
                f"sampler state was saved with world_size={state.get('world_size')} seed={state.get('seed')}, "
                f"this run has world_size={self.world_size} seed={self.seed}: exact resume is impossible"
            )
        self.epoch = state["epoch"]
        self.start_batch = state["start_batch"]
