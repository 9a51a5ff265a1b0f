"""The test loss of a training job: every test batch once, over all ranks."""

from __future__ import annotations

import math

import torch

from mapanything_ext import distributed as dist
from mapanything_ext.depth_metrics import mean_depth_abs_rel
from mapanything_ext.train.compiling import mark_step_begin
from mapanything_ext.train.data import to_device


@torch.no_grad()
def evaluate(model, criterion, loader, device, amp_dtype, between_batches=None) -> dict:
    """Mean test loss, its terms and depth AbsRel over every test batch, each seen once by one rank
    (ranks may hold one batch more or less). `model` is the plain module (no DDP collective in its
    forward); `between_batches(i)` runs before step i on every rank alike (the engine's stop point)."""
    model.eval()
    sums, counts = {}, {}
    batches = iter(loader)
    steps = int(dist.all_reduce_max(torch.tensor([len(loader)])).item())
    for i in range(steps):
        if between_batches is not None:
            between_batches(i)
        views = next(batches, None)
        if views is None:  # this rank's share is done; the others still meet at between_batches
            continue
        views = to_device(views, device)
        mark_step_begin()
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            preds = model(views)
        with torch.autocast(device.type, enabled=False):
            loss, details = criterion(views, preds)
        values = {"loss": float(loss), **details, "depth_abs_rel": mean_depth_abs_rel(views, preds)}
        for key, value in values.items():
            if math.isfinite(float(value)):  # a batch without any valid depth has no AbsRel
                sums[key] = sums.get(key, 0.0) + float(value)
                counts[key] = counts.get(key, 0) + 1
    model.train()
    # Every rank reduces the same keys in the same order, even one whose batches had none of a key.
    keys = sorted(set().union(*dist.all_gather_object(sorted(sums))))
    totals = dist.all_reduce_sum(torch.tensor([sums.get(k, 0.0) for k in keys] + [counts.get(k, 0) for k in keys],
                                              dtype=torch.float64))
    return {k: float(totals[i] / totals[len(keys) + i]) if totals[len(keys) + i] > 0 else math.nan
            for i, k in enumerate(keys)}
