"""Loaders of a training run: batches by image budget, moved to the device."""

from __future__ import annotations

import random
import signal

import numpy as np
import torch
from torch.utils.data import DataLoader, default_collate

from mapanything_ext.datasets.batch_sampler import DynamicBatchSampler, mapanything_batch_size
from mapanything_ext.datasets.device_geometry import GEOMETRY_KEY, complete_view
from mapanything_ext.train_params import TrainParams


def views_counter(dataset):
    """How many views sample i will have, without loading it."""
    if hasattr(dataset, "num_views_of"):
        return dataset.num_views_of
    fixed = int(dataset.num_views)
    return lambda _index: fixed


def batch_size_of(dataset, tp: TrainParams, train: bool) -> int | None:
    """Samples per batch with MapAnything's batching (its test loader takes twice the training
    batch, at least one); None: batches by view count under the image budget."""
    if tp.batching != "mapanything":
        return None
    size = mapanything_batch_size(tp.max_num_of_imgs_per_gpu, int(dataset.num_views))
    return size if train else max(1, 2 * (int(tp.max_num_of_imgs_per_gpu) // int(dataset.num_views)))


def build_loader(dataset, tp: TrainParams, train: bool, rank: int, world_size: int, num_workers: int) -> DataLoader:
    """The training loader (shuffled, ranks in lockstep, max_steps_per_epoch) or the test loader
    (in order, every batch once over all ranks, max_eval_steps)."""
    resolutions, view_counts = len(dataset.resolutions), dataset.view_counts
    if (resolutions > 1 or view_counts) and not (train and tp.batching == "mapanything"):
        raise ValueError(
            f"the {'training' if train else 'test'} set has {resolutions} resolution(s) and variable_num_views="
            f"{bool(view_counts)}: several resolutions and a variable view count are MapAnything's training "
            f"options and need train_params.batching=mapanything; a test set takes one resolution and "
            f"variable_num_views false")
    sampler = DynamicBatchSampler(len(dataset), views_counter(dataset), tp.max_num_of_imgs_per_gpu, shuffle=train,
                                  seed=int(tp.seed), rank=rank, world_size=world_size, lockstep=train,
                                  max_steps=tp.max_steps_per_epoch if train else tp.max_eval_steps,
                                  batch_size=batch_size_of(dataset, tp, train), num_resolutions=resolutions,
                                  view_counts=view_counts)
    seed = int(tp.seed)
    return DataLoader(
        dataset,
        batch_sampler=sampler,
        num_workers=num_workers,
        collate_fn=default_collate,
        worker_init_fn=_seed_worker,
        persistent_workers=False,
        pin_memory=torch.cuda.is_available(),
        # Each pass draws its workers' base seed from this generator, not from the global torch RNG:
        # the training RNG (dropout, ...) then depends only on the steps run, so a resumed run that
        # starts an extra pass (an evaluation rerun, an epoch with nothing left) stays bitwise exact.
        generator=torch.Generator().manual_seed(seed * 1000 + rank),
    )


def _seed_worker(worker_id: int) -> None:
    # A terminal's Ctrl-C reaches the workers too: they must not die of it (the job stops at its next
    # stop point with the position saved, cluster/preemption.py), so they leave SIGINT to their rank.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # torch gives each worker a distinct base seed; derive numpy/python from it.
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


def to_device(batch, device):
    """The batch on the device; a lean view (train_params.geometry_on_device) gets its per-pixel
    geometry derived there (datasets/device_geometry.py)."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        moved = {k: to_device(v, device) for k, v in batch.items()}
        return complete_view(moved) if GEOMETRY_KEY in moved else moved
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(v, device) for v in batch)
    return batch
