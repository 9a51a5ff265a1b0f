"""Depth AbsRel, the one definition training logs and the evaluation reports.

AbsRel of a view = mean over its valid pixels of |z_pred - z_gt| / z_gt, z the depth along the
optical axis. A view with no valid pixel has no AbsRel: NaN, and means over views leave it out
(a mean over no view at all is NaN too). Never 0.0: an empty view is not a perfect one.
"""

from __future__ import annotations

import math

import torch


def depth_abs_rel(z_pred: torch.Tensor, z_gt: torch.Tensor, valid: torch.Tensor) -> float:
    """AbsRel of one view (NaN when no pixel is valid)."""
    if not valid.any():
        return math.nan
    return float(((z_pred[valid] - z_gt[valid]).abs() / z_gt[valid]).mean())


def mean_depth_abs_rel(views: list[dict], preds: list[dict]) -> float:
    """Mean AbsRel over the views (and batch items) that have valid pixels; NaN when none has."""
    values = []
    for view, pred in zip(views, preds):
        z_gt = view["depthmap"][..., 0].float()
        valid = view["valid_mask"].bool() & (z_gt > 0)
        z_pred = pred["pts3d_cam"][..., 2].float()
        values += [depth_abs_rel(z_pred[b], z_gt[b], valid[b]) for b in range(z_gt.shape[0])]
    values = [v for v in values if not math.isnan(v)]
    return sum(values) / len(values) if values else math.nan
