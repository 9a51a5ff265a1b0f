"""Batch samplers: which samples make each step's batch, and where an epoch stands.

Two ways to cut an epoch into batches (`train_params.batching`):

  mapanything    MapAnything's training sampler (`DynamicBatchedMultiFeatureRandomSampler`): the
                 samples are shuffled by a generator seeded with epoch + 777 (not
                 train_params.seed); then, batch after batch, the same generator draws the batch's
                 resolution index (of the dataset's `resolutions`) and, with variable_num_views,
                 its view count n (of `view_counts`, 2..num_views), and the batch takes the next
                 max(1, max_num_of_imgs_per_gpu // n) samples, n being the configured num_views
                 when fixed, whatever a sample really has (a sample over the image budget is
                 accepted; with a fixed count, a batch of any resolution but the first takes one
                 sample, as in MapAnything's sampler). A batch that would run past the end is dropped, and an epoch has
                 (num_samples // largest batch) batches, (that // world_size) steps per rank.
                 Its items are (index, resolution_index, n or None). Default: a stage sees the
                 batches and the number of steps of MapAnything's loop.
  by_view_count  ours: samples bucketed by their actual view count, each bucket shuffled and cut
                 into batches of max_num_of_imgs_per_gpu // views samples (no step over the budget,
                 a sample over it is refused), the batches shuffled; seeded by (seed, epoch).

Either way the batches of an epoch form one global list (independent of the number of ranks but
for its length, a multiple of it), and the ranks walk it together: one step = the next
`world_size` batches, dealt round-robin (rank r takes the r-th), as MapAnything's sampler deals
them. Where an epoch stands is one global number, `consumed`: how many batches of the list the job
has used. A resume continues at batch `consumed` whatever the world size is now, so no sample of
the epoch is seen twice or skipped.

`max_steps` (train_params.max_steps_per_epoch) ends an epoch after that many steps: for smoke runs.

`lockstep=False` (evaluation) deals every batch in order (no shuffle), so ranks may get one batch
more or less: an evaluation sees each sample once, whatever the world size.

`state_dict()` records what `consumed` means (batching, batch sizes, dataset length, seed, shuffle,
world size, max_steps). `load_state_dict()` maps a changed world size and refuses any other change
with a message naming the value.
"""

from __future__ import annotations

from typing import Callable, Iterator

import numpy as np
from torch.utils.data import Sampler

# MapAnything's sampler seeds its generator with epoch + this.
MAPANYTHING_SEED_OFFSET = 777


class SamplerStateMismatch(ValueError):
    """A saved sampler position cannot be mapped onto this run's batches."""


def mapanything_batch_size(max_imgs: int, num_views: int) -> int:
    """Samples per training batch in MapAnything's sampler (its test loader takes twice as many)."""
    return max(1, int(max_imgs) // int(num_views))


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
        max_steps: int | None = None,
        lockstep: bool = True,
        batch_size: int | None = None,
        num_resolutions: int = 1,
        view_counts: list[int] | None = None,
    ):
        """batch_size: MapAnything's batching with that many samples per batch; None: by view count
        under the image budget. num_resolutions, view_counts: what MapAnything's training batches draw
        (the dataset's resolutions and variable_num_views counts); lockstep (training) only."""
        if num_samples <= 0:
            raise ValueError("the dataset is empty: no sample to batch (check the data roots and split)")
        self.num_samples = num_samples
        self.max_imgs = int(max_num_of_imgs_per_gpu)
        self.batch_size = int(batch_size) if batch_size else None
        self.shuffle = shuffle
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.max_steps = int(max_steps) if max_steps else None
        self.lockstep = lockstep
        self.num_resolutions = int(num_resolutions)
        self.view_counts = [int(n) for n in view_counts] if view_counts else None
        if (self.num_resolutions > 1 or self.view_counts) and not (self.batch_size and lockstep):
            raise ValueError("several resolutions or variable_num_views need MapAnything's batching of a training "
                             "set (train_params.batching=mapanything); a test set takes one resolution and num_views")
        self.epoch = 0
        self.consumed = 0  # batches of this epoch's global list used before the next pass
        # (epoch, global batches) of an epoch resumed at another world size under max_steps: the epoch
        # keeps the length it had when it started (max_steps x the world size then)
        self._resumed_cut: tuple[int, int] | None = None
        self._counts = np.array([views_of(i) for i in range(num_samples)], dtype=np.int64)
        self._uniform = len(np.unique(self._counts)) == 1
        if not self.batch_size:
            self._check_budget()
        elif lockstep and not self.view_counts:  # (with a drawn view count every sample gives that many)
            self._check_batches_collate()
        if lockstep and self.epoch_batches() < world_size:
            raise ValueError(
                f"{len(self._global_batches())} batches of {self._describe_size()} cannot be shared by {world_size} "
                f"rank(s): need more samples, a smaller train_params.max_num_of_imgs_per_gpu or fewer ranks"
            )

    @property
    def batching(self) -> str:
        return "mapanything" if self.batch_size else "by_view_count"

    def describe(self) -> str:
        """How this sampler cuts batches, for the start-up line."""
        if not self.batch_size:
            return f"batches of at most {self.max_imgs} images (by view count)"
        if self.view_counts:
            text = (f"a view count n drawn per batch in {self.view_counts[0]}..{self.view_counts[-1]}, "
                    f"max(1, {self.max_imgs} // n) samples per batch")
        else:
            text = f"{self.batch_size} sample(s) per batch"
        if self.num_resolutions > 1:
            text += f", one of {self.num_resolutions} resolutions drawn per batch"
        return text + " (MapAnything's batching)"

    def _describe_size(self) -> str:
        return (f"{self.batch_size} sample(s)" if self.batch_size
                else f"at most {self.max_imgs} images") + f" from {self.num_samples} samples"

    def _check_budget(self) -> None:
        too_many = self._counts > self.max_imgs
        if too_many.any():
            first = int(np.flatnonzero(too_many)[0])
            raise ValueError(
                f"sample {first} has {self._counts[first]} views but train_params.max_num_of_imgs_per_gpu="
                f"{self.max_imgs}: raise the image budget or lower the dataset's num_views"
            )

    def _check_batches_collate(self) -> None:
        """A batch of several samples needs one view count (views are stacked per position)."""
        counts = np.unique(self._counts)
        if self.batch_size > 1 and not self._uniform:
            raise ValueError(
                f"batches of {self.batch_size} samples (train_params.batching=mapanything: max(1, "
                f"max_num_of_imgs_per_gpu // dataset.num_views)) cannot be stacked: this dataset's samples have "
                f"{', '.join(map(str, counts))} views. Lower train_params.max_num_of_imgs_per_gpu below twice "
                f"dataset.num_views (one sample per batch, as MapAnything's loop needs for such data), or set "
                f"train_params.batching=by_view_count"
            )

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _global_batches(self) -> list[list]:
        """This epoch's batches, in order, before they are dealt to ranks (uncut)."""
        if self.batch_size and self.lockstep:
            batches = self._mapanything_batches()
        elif self.batch_size and (self._uniform or self.batch_size == 1):
            batches = self._in_order_batches()
        else:  # by view count (also an evaluation of mixed view counts with MapAnything's batch size)
            batches = self._view_count_batches()
        if self.max_steps:
            resumed = self._resumed_cut and self._resumed_cut[0] == self.epoch
            batches = batches[:self._resumed_cut[1] if resumed else self.max_steps * self.world_size]
        return batches

    def _mapanything_batches(self) -> list[list[tuple]]:
        """MapAnything's training batches of this epoch: items (index, resolution_index, view count or None)."""
        rng = np.random.default_rng(seed=self.epoch + MAPANYTHING_SEED_OFFSET)
        order = np.arange(self.num_samples)
        if self.shuffle:
            rng.shuffle(order)
        pools = [self.num_resolutions] + ([len(self.view_counts)] if self.view_counts else [])
        sizes = {n: mapanything_batch_size(self.max_imgs, n) for n in self.view_counts or ()}
        limit = self.num_samples // max(sizes.values(), default=self.batch_size)  # its sampler's length
        batches, start = [], 0
        while len(batches) < limit:
            drawn = [int(rng.integers(pool)) for pool in pools]
            count = self.view_counts[drawn[1]] if self.view_counts else None
            # MapAnything keys a fixed view count's batch size by the resolution index ({0: size}, default
            # 1): the first resolution's batches take `batch_size` samples, the others' one. Kept, so the
            # batches are its loop's.
            size = sizes[count] if count else (self.batch_size if drawn[0] == 0 else 1)
            if self.num_samples - start < size:
                break
            batches.append([(int(i), drawn[0], count) for i in order[start:start + size]])
            start += size
        return batches

    def _in_order_batches(self) -> list[list[int]]:
        """An evaluation's batches: the samples in order, the last batch possibly short."""
        size = self.batch_size
        return [list(range(start, min(start + size, self.num_samples))) for start in range(0, self.num_samples, size)]

    def _view_count_batches(self) -> list[list[int]]:
        rng = np.random.default_rng([self.seed, self.epoch])
        batches = []
        for count in np.unique(self._counts):
            members = np.flatnonzero(self._counts == count)
            if self.shuffle:
                members = rng.permutation(members)
            size = self.batch_size or max(1, self.max_imgs // int(count))
            batches += [members[start:start + size].tolist() for start in range(0, len(members), size)]
        if self.shuffle:
            batches = [batches[i] for i in rng.permutation(len(batches))]
        return batches

    def epoch_batches(self) -> int:
        """Global batches one epoch uses at this world size (the epoch's length for the LR schedule)."""
        total = len(self._global_batches())
        return total // self.world_size * self.world_size if self.lockstep else total

    def _remaining(self) -> list[list[int]]:
        """The batches after `consumed`; in lockstep cut to a multiple of the world size (every rank runs
        the same number of steps, which DDP needs; a fresh epoch: MapAnything's steps x world size)."""
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
                "batching": self.batching, "batch_size": self.batch_size, "seed": self.seed,
                "shuffle": self.shuffle, "world_size": self.world_size, "max_steps": self.max_steps,
                "max_num_of_imgs_per_gpu": self.max_imgs, "num_samples": self.num_samples,
                "num_resolutions": self.num_resolutions, "view_counts": self.view_counts}

    # What a saved position means, and the setting that decides it (a change is refused).
    _MEANING = (("batching", "train_params.batching"),
                ("batch_size", "the batch size (train_params.max_num_of_imgs_per_gpu // dataset.num_views)"),
                ("max_num_of_imgs_per_gpu", "train_params.max_num_of_imgs_per_gpu"),
                ("num_samples", "the training dataset's length"), ("shuffle", "shuffling"),
                ("max_steps", "train_params.max_steps_per_epoch"),
                ("num_resolutions", "the number of training resolutions (dataset.resolution_train)"),
                ("view_counts", "the view counts a batch may draw (dataset.variable_num_views, num_views)"))

    def load_state_dict(self, state: dict) -> str | None:
        """Continue at the saved position; returns a note when the world size changed, else None."""
        # positions written before these settings existed
        state = {"batching": "by_view_count", "batch_size": None, "num_resolutions": 1, "view_counts": None, **state}
        ours = self.state_dict()
        meanings = self._MEANING + ((("seed", "train_params.seed"),) if self.batching == "by_view_count" else ())
        for key, meaning in meanings:
            if key in state and state[key] != ours[key]:
                raise SamplerStateMismatch(
                    f"cannot continue the epoch where it stopped: {meaning} was {state[key]} when the checkpoint "
                    f"was written and is {ours[key]} now, so its position ({state['consumed']} batches into epoch "
                    f"{state['epoch']}) means other samples. Use the original value, or a new output_dir."
                )
        self.epoch, self.consumed = int(state["epoch"]), int(state["consumed"])
        saved_world = int(state.get("world_size", self.world_size))
        if saved_world != self.world_size:
            if self.max_steps:
                self._resumed_cut = (self.epoch, self.max_steps * saved_world)
            return (f"world size changed from {saved_world} to {self.world_size}: epoch {self.epoch} continues at "
                    f"global batch {self.consumed} of {self.epoch_batches()}, each remaining batch once")
        return None
