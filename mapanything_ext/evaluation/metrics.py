"""Metrics of one sample's prediction against its ground truth (batch of one).

All geometry is in metres in the main vehicle's frame, the reference frame of every
sample (docs/data.md). MapAnything-style predictions are expressed in the first view's
camera frame and are already metric (multiplied by the model's metric scaling factor):

  pts3d_cam          (1, H, W, 3)  points in each view's own camera frame
  pts3d              (1, H, W, 3)  points in the first view's camera frame
  cam_trans, cam_quats (1, 3), (1, 4)  camera-to-first-view pose, quaternion x, y, z, w

The predicted world is placed in the main vehicle's frame with the ground-truth pose of the
first view (the only alignment; scale is the model's own), so the point error also measures
metric scale.
"""

from __future__ import annotations

import math

import torch

from mapanything_ext.geometry.depth_metrics import depth_abs_rel
from mapanything_ext.evaluation.pose_metrics import ate_m, pair_errors
from mapanything_ext.geometry.rotations import quaternion_to_matrix, rotation_angle_deg

INLIER_THRESHOLD = 1.25
# True-depth ranges (m) of the binned results: near, middle, far (the last includes 250 m).
DEPTH_BINS_M = ((0.0, 30.0), (30.0, 80.0), (80.0, 250.0))
BINNED = tuple(f"{metric}_{int(lo)}_{int(hi)}m" for metric in ("depth_abs_rel", "point_error_m")
               for lo, hi in DEPTH_BINS_M)


def by_true_depth(z_pred, z_gt, pts_pred, pts_gt, valid) -> dict:
    """Depth AbsRel and point error over the valid pixels whose true depth lies in each of DEPTH_BINS_M
    (nan for a bin without such pixels): the far pixels no longer set the whole view's number."""
    out = {}
    for lo, hi in DEPTH_BINS_M:
        in_bin = valid & (z_gt >= lo) & ((z_gt < hi) if hi < DEPTH_BINS_M[-1][1] else (z_gt <= hi))
        out[f"depth_abs_rel_{int(lo)}_{int(hi)}m"] = depth_abs_rel(z_pred, z_gt, in_bin)
        out[f"point_error_m_{int(lo)}_{int(hi)}m"] = point_error_m(pts_pred, pts_gt, in_bin)
    return out


def depth_inlier_ratio(z_pred: torch.Tensor, z_gt: torch.Tensor, valid: torch.Tensor,
                       threshold: float = INLIER_THRESHOLD) -> float:
    """Share of valid pixels with max(z_pred / z_gt, z_gt / z_pred) < threshold (delta < 1.25)."""
    if not valid.any():
        return math.nan
    pred, gt = z_pred[valid].clamp(min=1e-6), z_gt[valid]
    return float((torch.maximum(pred / gt, gt / pred) < threshold).float().mean())


def point_error_m(pts_pred: torch.Tensor, pts_gt: torch.Tensor, valid: torch.Tensor) -> float:
    """Mean Euclidean distance (m) between predicted and true points over valid pixels."""
    if not valid.any():
        return math.nan
    return float((pts_pred[valid] - pts_gt[valid]).norm(dim=-1).mean())


def predicted_poses(preds: list[dict]) -> list[torch.Tensor]:
    """4x4 camera-to-first-view poses from cam_trans / cam_quats."""
    poses = []
    for pred in preds:
        pose = torch.eye(4, dtype=torch.float64)
        pose[:3, :3] = quaternion_to_matrix(pred["cam_quats"][0].double())
        pose[:3, 3] = pred["cam_trans"][0].double()
        poses.append(pose)
    return poses


def relative_pose_errors(poses_pred: list[torch.Tensor], poses_gt: list[torch.Tensor]) -> tuple[float, float]:
    """Mean over view pairs (i < j) of the rotation error (deg) and translation error (m) of
    the relative pose from view j to view i; invariant to the frame both pose sets live in."""
    rot, trans = [], []
    for i in range(len(poses_gt)):
        for j in range(i + 1, len(poses_gt)):
            rel_pred = torch.linalg.inv(poses_pred[i]) @ poses_pred[j]
            rel_gt = torch.linalg.inv(poses_gt[i]) @ poses_gt[j]
            rot.append(rotation_angle_deg(rel_pred[:3, :3].T @ rel_gt[:3, :3]))
            trans.append(float((rel_pred[:3, 3] - rel_gt[:3, 3]).norm()))
    if not rot:
        return math.nan, math.nan
    return sum(rot) / len(rot), sum(trans) / len(trans)


def metric_scale_error(pts_pred_ref: list[torch.Tensor], pts_gt_ref: list[torch.Tensor],
                       valid: list[torch.Tensor]) -> float:
    """|s_pred / s_gt - 1| with s the mean distance of the valid points from the first camera:
    0 when the predicted scene has the true size, 0.1 when it is 10 % too large or small."""
    pred = torch.cat([p[v] for p, v in zip(pts_pred_ref, valid)]).norm(dim=-1)
    gt = torch.cat([p[v] for p, v in zip(pts_gt_ref, valid)]).norm(dim=-1)
    if gt.numel() == 0:
        return math.nan
    return abs(float(pred.mean() / gt.mean()) - 1.0)


def sample_metrics(views: list[dict], preds: list[dict]) -> dict:
    """Per-view and per-sample metrics of one sample (tensors with a batch dimension of 1)."""
    gt_poses = [v["camera_pose"][0].double() for v in views]
    ref_to_main = gt_poses[0]
    main_to_ref = torch.linalg.inv(ref_to_main)
    per_view, pts_pred_ref, pts_gt_ref, valids = [], [], [], []
    for view, pred in zip(views, preds):
        valid = view["valid_mask"][0].bool() & (view["depthmap"][0, ..., 0] > 0)
        z_gt, z_pred = view["depthmap"][0, ..., 0].double(), pred["pts3d_cam"][0, ..., 2].double()
        pred_ref = pred["pts3d"][0].double()
        gt_main = view["pts3d"][0].double()
        pred_main = pred_ref @ ref_to_main[:3, :3].T + ref_to_main[:3, 3]
        per_view.append({
            "view": view["instance"][0] if isinstance(view["instance"], (list, tuple)) else view["instance"],
            "depth_abs_rel": depth_abs_rel(z_pred, z_gt, valid),
            "depth_inlier_1.25": depth_inlier_ratio(z_pred, z_gt, valid),
            "point_error_m": point_error_m(pred_main, gt_main, valid),
            **by_true_depth(z_pred, z_gt, pred_main, gt_main, valid),
        })
        pts_pred_ref.append(pred_ref)
        pts_gt_ref.append(gt_main @ main_to_ref[:3, :3].T + main_to_ref[:3, 3])
        valids.append(valid)
    poses_pred = predicted_poses(preds)
    rot_deg, trans_m = relative_pose_errors(poses_pred, gt_poses)
    sample = {key: _nanmean([v[key] for v in per_view]) for key in ("depth_abs_rel", "depth_inlier_1.25",
                                                                     "point_error_m", *BINNED)}
    sample.update({"rel_rotation_deg": rot_deg, "rel_translation_m": trans_m,
                   "metric_scale_error": metric_scale_error(pts_pred_ref, pts_gt_ref, valids),
                   "num_views": len(views),
                   "ate_m": ate_m(torch.stack([p[:3, 3] for p in poses_pred]), torch.stack([p[:3, 3] for p in gt_poses]))})
    pairs = pair_errors(poses_pred, gt_poses, [vehicle_of(v["view"]) for v in per_view])
    return {"sample": sample, "views": per_view, "pairs": pairs}


def vehicle_of(instance: str) -> str:
    """The vehicle of a view named `<scenario>/<vehicle>/<frame>/camera<k>` (the name itself otherwise)."""
    parts = str(instance).split("/")
    return parts[1] if len(parts) >= 4 else str(instance)


def _nanmean(values: list[float]) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return sum(finite) / len(finite) if finite else math.nan
