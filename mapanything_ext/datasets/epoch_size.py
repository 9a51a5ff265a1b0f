"""An epoch of a chosen size: MapAnything's `N @ Dataset(...)` (its `ResizedDataset`).

Each epoch the samples are shuffled by a generator seeded with epoch + 777 and repeated until there
are N; the i-th repetition of a sample draws its random choices anew (MapAnything's seed offset),
so a dataset smaller than N still gives N different samples. `dataset.train_epoch_size` (null: the
dataset's own length) turns it on for the training set.
"""

from __future__ import annotations

import numpy as np

from mapanything_ext.datasets.base import parse_item
from mapanything_ext.datasets.batch_sampler import MAPANYTHING_SEED_OFFSET


class EpochOfSize:
    def __init__(self, dataset, size: int):
        if int(size) <= 0:
            raise ValueError(f"dataset.train_epoch_size={size}: it must be a positive number of samples")
        self.dataset, self.size = dataset, int(size)
        self.set_epoch(0)

    def __len__(self) -> int:
        return self.size

    def set_epoch(self, epoch: int) -> None:
        """This epoch's mapping from position to (sample, repetition), as MapAnything draws it."""
        order = np.random.default_rng(seed=epoch + MAPANYTHING_SEED_OFFSET).permutation(len(self.dataset))
        repetitions = 1 + (self.size - 1) // len(self.dataset)
        self._samples = np.concatenate([order] * repetitions)[:self.size]
        self._repetition = np.repeat(np.arange(repetitions), len(self.dataset))[:self.size]
        self.dataset.set_epoch(epoch)

    def __getitem__(self, item):
        index, _, resolution_index, num_views = parse_item(item)
        return self.dataset.get(int(self._samples[index]), int(self._repetition[index]), resolution_index, num_views)

    def num_views_of(self, index: int) -> int:
        views_of = getattr(self.dataset, "num_views_of", None)
        return views_of(int(self._samples[index])) if views_of else int(self.dataset.num_views)

    def __getattr__(self, name):  # num_views, geometry_on_device, sample_name, ... of the dataset
        if name == "dataset":
            raise AttributeError(name)
        return getattr(self.dataset, name)
