"""One training step of MapAnything's recipe: forward, loss scaled by 2/n_views, backward, and at
an accumulation boundary the gradient norm, clipping and an optimizer step unless the gradient is
non-finite.

MapAnything's loop (`train_one_epoch`) and its loss scaler do the same, in this order:
  - the criterion's loss of a batch with n > 2 views is multiplied by 2/n (the base is 2 views);
    that scaled value is what is logged and what the instability check reads; the criterion's
    details stay unscaled;
  - the backward runs on loss / accum_iter;
  - at the boundary the global gradient norm is taken and clipped to `gradient_clip` (1.0), and the
    norm is logged as train_grad_norm;
  - a step whose gradient is not finite changes nothing (its scaler skips it on a GPU).
Nothing here waits for the device: the loss and the norm are copied to the host behind the step's
work and read by `read_step` once the next step is queued, so the device never idles while the
host prepares a step.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from mapanything_ext.cluster import distributed as dist
from mapanything_ext.losses.batched_loss import DeviceDetails
from mapanything_ext.readback import HostCopy
from mapanything_ext.train import sharding
from mapanything_ext.train.compiling import mark_step_begin


class LossInstability(RuntimeError):
    """The train loss became non-finite or exceeded train_params.max_loss_value."""


def view_scale(num_views: int) -> float:
    """MapAnything's weight of a batch's loss: 2 / n_views above 2 views, else 1."""
    return 2.0 / num_views if num_views > 2 else 1.0


@dataclass
class StepResult:
    """What train_step leaves behind, on its way to the host: [scaled loss averaged over ranks,
    gradient norm, 1 at an accumulation boundary else 0] and the criterion's details."""

    values: HostCopy
    details: Mapping


@dataclass
class StepValues:
    """A step's numbers on the host."""

    loss: float
    grad_norm: float | None  # None between accumulation boundaries
    skipped: bool  # the optimizer step was skipped: non-finite gradient
    details: dict


def train_step(run, views, autocast_dtype, accum: int = 1, boundary: bool = True) -> StepResult:
    """One micro-batch: forward, scaled loss, backward; at an accumulation boundary also the norm,
    clipping and the optimizer step (skipped on a non-finite gradient)."""
    loss, details = forward_backward(run, views, autocast_dtype, accum, sync=boundary)
    norm = optimizer_step(run) if boundary else torch.zeros((), device=loss.device)
    if isinstance(details, DeviceDetails):
        details.queue_read()
    values = torch.stack([dist.all_reduce_mean(loss.float()), norm.float().to(loss.device),
                          torch.tensor(float(boundary), device=loss.device)])
    return StepResult(HostCopy(values), details)


def optimizer_step(run) -> torch.Tensor:
    """Norm of the accumulated gradient (clipped to train_params.gradient_clip), then the step unless
    it is not finite; the gradients are cleared either way. Returns the norm before clipping."""
    with _phase("optimizer"):
        params = [p for p in run.module.parameters() if p.grad is not None]
        clip = run.tp.gradient_clip
        if clip is not None:
            norm = torch.nn.utils.clip_grad_norm_(params, float(clip), foreach=True)
        else:
            norm = torch.nn.utils.get_total_norm([p.grad for p in params], foreach=True)
        norm = sharding.plain(norm)  # FSDP: the global norm over every shard
        _step_unless_nonfinite(run.optimizer, norm)
        run.optimizer.zero_grad(set_to_none=True)
    return norm.detach()


def _step_unless_nonfinite(optimizer: torch.optim.Optimizer, norm: torch.Tensor) -> None:
    """The fused AdamW kernel skips a step on the device when told the gradient was not finite (as
    torch's GradScaler tells it; its step counts stay too); elsewhere the host decides (a CPU: no
    device to drain)."""
    if optimizer.defaults.get("fused"):
        optimizer.found_inf = (~torch.isfinite(norm)).float()
        try:
            optimizer.step()
        finally:
            del optimizer.found_inf
    elif bool(torch.isfinite(norm)):
        optimizer.step()


def read_step(run, result: StepResult) -> StepValues:
    """The step's values as Python numbers (waits for that step's work only); raises
    LossInstability when the loss is non-finite or, when checked, above max_loss_value."""
    loss_value, norm, boundary = result.values.get().tolist()
    tp = run.tp
    if not math.isfinite(loss_value) or (tp.check_loss_instability and loss_value > tp.max_loss_value):
        raise LossInstability(
            f"train loss is {loss_value} (train_params.max_loss_value={tp.max_loss_value}, check_loss_instability="
            f"{tp.check_loss_instability}); stopping without saving this state. The last good checkpoint in "
            f"{run.output_dir} is untouched; lower train_params.lr or check the data."
        )
    boundary = bool(boundary)
    return StepValues(loss_value, norm if boundary else None, boundary and not math.isfinite(norm),
                      dict(result.details))


def _phase(name: str):
    """A named range in torch.profiler traces (bench/bench_mapanything_step.py --profile sums
    GPU time per phase); costs a few microseconds when no profiler runs."""
    return torch.profiler.record_function(f"mapanything_ext.{name}")


def forward_backward(run, views, autocast_dtype, accum: int, sync: bool) -> tuple[torch.Tensor, dict]:
    """Forward, scaled loss, backward of one micro-batch; returns the (detached) scaled loss and the
    criterion's details. DDP reduces gradients only when sync (the accumulation's last micro-batch)."""
    mark_step_begin()
    with sharding.set_gradient_sync(run.model, sync):
        with _phase("forward"), torch.autocast(run.info.device.type, dtype=autocast_dtype,
                                               enabled=autocast_dtype is not None):
            preds = run.model(views)
        with _phase("loss"), torch.autocast(run.info.device.type, enabled=False):
            loss, details = run.train_criterion(views, preds)
            loss = loss * view_scale(len(views))
        with _phase("backward"):
            (loss / accum).backward()
    return loss.detach(), details
