"""Random batches in MapAnything's view format with consistent geometry, and predictions for them.

Each view of each sample is a pinhole camera (focal = width) at a random pose looking at a random
depth map: rays are unit directions, `pts3d_cam = ray * depth_along_ray`, `pts3d = R pts3d_cam + t`,
`camera_pose` is [R | t] (camera to world) and `camera_pose_quats`/`_trans` hold the same pose.
Invalid pixels have depth 0, as OPV2V's do.
"""

from __future__ import annotations

import torch

from mapanything_ext.geometry.rotations import quaternion_to_matrix


def random_views(n_views: int, batch: int = 1, height: int = 12, width: int = 16, seed: int = 0, *,
                 invalid_fraction: float = 0.2, invalid_views=(), metric=True, synthetic=True) -> list[dict]:
    """`metric` / `synthetic`: one bool for all samples or one per sample; `invalid_views`: views
    whose every pixel is invalid."""
    g = torch.Generator().manual_seed(seed)
    metric, synthetic = _per_sample(metric, batch), _per_sample(synthetic, batch)
    v, u = torch.meshgrid(torch.arange(height) + 0.5, torch.arange(width) + 0.5, indexing="ij")
    rays = torch.stack([(u - width / 2) / width, (v - height / 2) / width, torch.ones_like(u)], -1)
    rays = rays / rays.norm(dim=-1, keepdim=True)
    views = []
    for index in range(n_views):
        quats = torch.randn(batch, 4, generator=g)
        quats = quats / quats.norm(dim=-1, keepdim=True)
        trans = 5 * torch.randn(batch, 3, generator=g)
        rot = quaternion_to_matrix(quats)
        depth = 4 + 20 * torch.rand(batch, 1, 1, 1, generator=g) + torch.rand(batch, height, width, 1, generator=g)
        valid = torch.rand(batch, height, width, generator=g) >= invalid_fraction
        if index in invalid_views:
            valid[:] = False
        depth = torch.where(valid[..., None], depth, 0.0)
        pts_cam = rays * depth
        pose = torch.eye(4).repeat(batch, 1, 1)
        pose[:, :3, :3], pose[:, :3, 3] = rot, trans
        views.append({
            "camera_pose": pose, "camera_pose_quats": quats, "camera_pose_trans": trans,
            "ray_directions_cam": rays.expand(batch, -1, -1, -1).clone(), "depth_along_ray": depth,
            "depthmap": pts_cam[..., 2:], "pts3d_cam": pts_cam,
            "pts3d": torch.einsum("bij,bhwj->bhwi", rot, pts_cam) + trans[:, None, None],
            "valid_mask": valid, "non_ambiguous_mask": valid | (torch.rand(batch, height, width, generator=g) < 0.5),
            "is_metric_scale": metric.clone(), "is_synthetic": synthetic.clone(),
        })
    return views


def _per_sample(flag, batch: int) -> torch.Tensor:
    if isinstance(flag, bool):
        return torch.full((batch,), flag)
    assert len(flag) == batch
    return torch.tensor(flag)


def perfect_predictions(views: list[dict], metric_scaling: float = 2.5) -> list[dict]:
    """What a perfect model predicts: geometry in view 0's camera frame at metric scale, confidence 1,
    mask logits of +-40."""
    rot0, trans0 = views[0]["camera_pose"][:, :3, :3], views[0]["camera_pose"][:, :3, 3]
    preds = []
    for view in views:
        rot, trans = view["camera_pose"][:, :3, :3], view["camera_pose"][:, :3, 3]
        rel_rot = rot0.transpose(1, 2) @ rot
        preds.append({
            "pts3d": torch.einsum("bji,bhwj->bhwi", rot0, view["pts3d"] - trans0[:, None, None]),
            "pts3d_cam": view["pts3d_cam"].clone(), "ray_directions": view["ray_directions_cam"].clone(),
            "depth_along_ray": view["depth_along_ray"].clone(),
            "cam_trans": torch.einsum("bji,bj->bi", rot0, trans - trans0), "cam_quats": _matrix_quats(rel_rot),
            "metric_scaling_factor": torch.full((len(rot), 1), metric_scaling),
            "conf": torch.ones_like(view["valid_mask"], dtype=torch.float32),
            "non_ambiguous_mask_logits": torch.where(view["non_ambiguous_mask"], 40.0, -40.0),
        })
    return preds


def _matrix_quats(rot: torch.Tensor) -> torch.Tensor:
    from mapanything_ext.geometry.rotations import matrix_to_quaternion

    return matrix_to_quaternion(rot)


def noisy_predictions(views: list[dict], seed: int = 1, noise: float = 0.2) -> list[dict]:
    """Perfect predictions disturbed everywhere (invalid pixels too): every term is non-zero."""
    g = torch.Generator().manual_seed(seed)
    preds = perfect_predictions(views)
    scene_scale = torch.exp(0.3 * torch.randn(len(views[0]["camera_pose"]), generator=g))  # metric scale off
    for pred in preds:
        for key in ("pts3d", "pts3d_cam", "depth_along_ray"):
            pred[key] = pred[key] * scene_scale[:, None, None, None]
        pred["cam_trans"] = pred["cam_trans"] * scene_scale[:, None]
        for key in ("pts3d", "pts3d_cam", "ray_directions", "cam_trans", "cam_quats"):
            pred[key] = pred[key] + noise * torch.randn(pred[key].shape, generator=g)
        pred["depth_along_ray"] = pred["depth_along_ray"].clamp_min(0.5) * torch.exp(
            noise * torch.randn(pred["depth_along_ray"].shape, generator=g))
        pred["metric_scaling_factor"] = pred["metric_scaling_factor"] * torch.exp(
            torch.randn(pred["metric_scaling_factor"].shape, generator=g))
        pred["conf"] = 1 + torch.rand(pred["conf"].shape, generator=g) * 3
        pred["non_ambiguous_mask_logits"] = 3 * torch.randn(pred["conf"].shape, generator=g)
    return preds
