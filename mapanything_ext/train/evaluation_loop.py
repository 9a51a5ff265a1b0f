"""The test loss of a training job: every test batch once over all ranks, summarised as
MapAnything's `test_one_epoch` does.

Per batch: the test criterion's loss multiplied by 2/n_views (n > 2, as in training) and its
details; per key over the batches: `<key>_avg` (the mean of the batch values) and `<key>_med` (their
median, as torch's `median` of a float32 tensor takes it: the lower middle value).
`checkpoint-best` follows `loss_med`. Beside them, ours: `depth_abs_rel_avg/_med` (over batches that
have valid depth).
"""

from __future__ import annotations

import math
import time

import torch

from mapanything_ext.cluster import distributed as dist
from mapanything_ext.console import say
from mapanything_ext.geometry.depth_metrics import mean_depth_abs_rel
from mapanything_ext.train import sharding
from mapanything_ext.train.compiling import mark_step_begin
from mapanything_ext.train.data import to_device
from mapanything_ext.train.step import view_scale

# Keys of ours that a batch may lack (no valid depth): such a batch is left out of their summaries.
_OPTIONAL = ("depth_abs_rel",)


@torch.no_grad()
def test_statistics(model, criterion, loader, device, amp_dtype, between_batches=None) -> dict:
    """`<key>_avg` and `<key>_med` of the scaled test loss, its terms and depth AbsRel, over every test
    batch of every rank (ranks may hold one batch more or less). `model` is the plain module (no DDP
    collective in its forward; a sharded one's forward is collective, so a rank whose share is done
    runs one more, unused); `between_batches(i)` runs before batch i on every rank alike (the
    engine's stop point)."""
    model.eval()
    values: dict[str, list[float]] = {}
    batches, last = iter(loader), None
    steps = int(dist.all_reduce_max(torch.tensor([len(loader)])).item())
    started, every = time.perf_counter(), max(1, steps // 10)
    for i in range(steps):
        if between_batches is not None:
            between_batches(i)
        if i and i % every == 0:  # hours of silence on real data otherwise
            say("eval", f"test batch {i}/{steps} ({time.perf_counter() - started:.0f}s)")
        views = next(batches, None)
        if views is None and sharding.is_sharded(model) and last is not None:
            # A sharded model's forward gathers its weights with every rank: one more forward, unused.
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                model(last)
        if views is None:  # this rank's share is done; the others still meet at between_batches
            continue
        views = last = to_device(views, device)
        mark_step_begin()
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            preds = model(views)
        with torch.autocast(device.type, enabled=False):
            loss, details = criterion(views, preds)
        # The loss scaled in float32, as MapAnything scales it; its terms as they come.
        batch = {"loss": float(loss * view_scale(len(views))), **{k: float(v) for k, v in details.items()},
                 "depth_abs_rel": mean_depth_abs_rel(views, preds)}
        for key, value in batch.items():
            if key not in _OPTIONAL or math.isfinite(value):
                values.setdefault(key, []).append(value)
    model.train()
    return summarise(dist.all_gather_object(values))


def summarise(per_rank: list[dict[str, list[float]]]) -> dict:
    """MapAnything's avg and med of each key over the batches of all ranks (rank order, then batch order)."""
    merged: dict[str, list[float]] = {}
    for values in per_rank:
        for key, batch_values in values.items():
            merged.setdefault(key, []).extend(batch_values)
    stats = {}
    for key in sorted(merged):
        batch_values = merged[key]
        stats[f"{key}_avg"] = sum(batch_values) / len(batch_values)
        stats[f"{key}_med"] = torch.tensor(batch_values).median().item()
    return stats
