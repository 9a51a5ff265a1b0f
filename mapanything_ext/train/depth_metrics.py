"""The depth metric the engine logs each epoch (the evaluation module has the full set)."""

from __future__ import annotations


def depth_abs_rel(views: list[dict], preds: list[dict]) -> float:
    """Mean over views of |z_pred - z_gt| / z_gt on valid pixels (z = depth along the optical axis)."""
    values = []
    for view, pred in zip(views, preds):
        gt = view["depthmap"][..., 0].float()
        valid = view["valid_mask"].bool() & (gt > 0)
        z_pred = pred["pts3d_cam"][..., 2].float()
        err = (z_pred - gt).abs() / gt.clamp(min=1e-6)
        values.append(float(err[valid].mean()) if valid.any() else 0.0)
    return sum(values) / max(len(values), 1)
