"""Metrics of one sample's prediction against its ground truth (batch of one).

Two sets, side by side in the report (docs/evaluation.md has the table of names and definitions):

- ours, metric (`*_metric`): metres and raw metric depth, no alignment of any kind, delta 1.25,
  depth <= 250 m: what a driving stack would get from the model's output as it is.
  depth_abs_rel_metric, depth_inlier_1.25_metric  each view's z-depth against the truth
  point_error_metric_m     the predicted points in the predicted first camera's frame against the true
                           points in the true first camera's frame (scale is the model's own)
  abs_registration_error_m the predicted points placed in the main vehicle's frame with the true pose
                           of the first view (so an error of the first view's pose costs here too)
  rel_rotation_deg, rel_translation_metric_m  per view pair, the relative pose's errors (mean)
  ate_m                    camera centres after similarity alignment (pose_metrics.py)
- MapAnything's benchmark set (benchmark_metrics.py): its names, its normalisation, its thresholds;
  its metric_scale_abs_rel is the one scale metric of both.

MapAnything-style predictions (its output keys, already multiplied by the metric scaling factor):

  pts3d_cam          (1, H, W, 3)  points in each view's own camera frame
  pts3d              (1, H, W, 3)  points in the predicted world (the first view's camera, nearly)
  cam_trans, cam_quats (1, 3), (1, 4)  camera-to-world pose, quaternion x, y, z, w
"""

from __future__ import annotations

import math

import torch

from mapanything_ext.evaluation.benchmark_metrics import benchmark_metrics, moved, pose_of
from mapanything_ext.geometry.depth_metrics import depth_abs_rel
from mapanything_ext.evaluation.pose_metrics import ate_m, pair_errors
from mapanything_ext.geometry.rotations import rotation_angle_deg

INLIER_THRESHOLD = 1.25
# True-depth ranges (m) of the binned results: near, middle, far (the last includes 250 m).
DEPTH_BINS_M = ((0.0, 30.0), (30.0, 80.0), (80.0, 250.0))
BINNED = tuple(f"{metric}_{int(lo)}_{int(hi)}m" for metric in ("depth_abs_rel_metric", "point_error_metric_m")
               for lo, hi in DEPTH_BINS_M)
PER_VIEW_METRIC = ("depth_abs_rel_metric", "depth_inlier_1.25_metric", "point_error_metric_m",
                   "abs_registration_error_m")


def by_true_depth(z_pred, z_gt, pts_pred, pts_gt, valid) -> dict:
    """Depth AbsRel and point error over the valid pixels whose true depth lies in each of DEPTH_BINS_M
    (nan for a bin without such pixels): the far pixels no longer set the whole view's number."""
    out = {}
    for lo, hi in DEPTH_BINS_M:
        in_bin = valid & (z_gt >= lo) & ((z_gt < hi) if hi < DEPTH_BINS_M[-1][1] else (z_gt <= hi))
        out[f"depth_abs_rel_metric_{int(lo)}_{int(hi)}m"] = depth_abs_rel(z_pred, z_gt, in_bin)
        out[f"point_error_metric_m_{int(lo)}_{int(hi)}m"] = point_error_m(pts_pred, pts_gt, in_bin)
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
    """4x4 camera-to-world poses from cam_trans / cam_quats (the quaternion normalised)."""
    return [pose_of(pred["cam_quats"][0], pred["cam_trans"][0]) for pred in preds]


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


def sample_metrics(views: list[dict], preds: list[dict]) -> dict:
    """Per-view and per-sample metrics of one sample (tensors with a batch dimension of 1), view pairs'
    pose errors, and MapAnything's benchmark set."""
    gt_poses = [v["camera_pose"][0].double() for v in views]
    poses_pred = predicted_poses(preds)
    gt_first, pred_first = torch.linalg.inv(gt_poses[0]), torch.linalg.inv(poses_pred[0])
    bench = benchmark_metrics(views, preds)
    per_view = []
    for view, pred, bench_view in zip(views, preds, bench["views"]):
        valid = view["valid_mask"][0].bool() & (view["depthmap"][0, ..., 0] > 0)
        z_gt, z_pred = view["depthmap"][0, ..., 0].double(), pred["pts3d_cam"][0, ..., 2].double()
        gt_main = view["pts3d"][0].double()
        pred_world = pred["pts3d"][0].double()
        pred_in_first, gt_in_first = moved(pred_world, pred_first), moved(gt_main, gt_first)
        per_view.append({
            "view": view["instance"][0] if isinstance(view["instance"], (list, tuple)) else view["instance"],
            "depth_abs_rel_metric": depth_abs_rel(z_pred, z_gt, valid),
            "depth_inlier_1.25_metric": depth_inlier_ratio(z_pred, z_gt, valid),
            "point_error_metric_m": point_error_m(pred_in_first, gt_in_first, valid),
            "abs_registration_error_m": point_error_m(moved(pred_world, gt_poses[0]), gt_main, valid),
            **by_true_depth(z_pred, z_gt, pred_in_first, gt_in_first, valid),
            **bench_view,
        })
    rot_deg, trans_m = relative_pose_errors(poses_pred, gt_poses)
    sample = {key: _nanmean([v[key] for v in per_view]) for key in PER_VIEW_METRIC + BINNED}
    sample.update(bench["sample"])
    sample.update({"rel_rotation_deg": rot_deg, "rel_translation_metric_m": trans_m, "num_views": len(views),
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
