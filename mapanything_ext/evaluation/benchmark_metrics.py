"""MapAnything's dense N-view benchmark metrics, with its names and definitions, so that a number here
can sit beside the MapAnything paper's tables (its `benchmarking/dense_n_view/benchmark.py` and
`mapanything/utils/metrics.py`; tests/test_benchmark_metrics.py scores one case with its functions).

How the benchmark prepares one sample (N views):
- the truth goes into the first true camera's frame; the prediction into its own first camera's frame
  (the inverse of the predicted pose of view 0), and the model's metric scaling factor is divided out
  of its points, camera-frame points and translations;
- truth and prediction are each divided by their own mean distance from the first camera, pooled over
  the valid pixels (the truth's mask) of every view: scale-free, a prediction = truth x 2 scores 0.
Then, per view (averaged over the views of the sample):
  pointmaps_abs_rel           mean over valid pixels of |X_pred - X_gt| / |X_gt| (first-view frame)
  pointmaps_inlier_thres_103  share of valid pixels with max(|X_gt|/|X_pred|, |X_pred|/|X_gt|) < 1.03
                              (lengths only, as MapAnything compares them)
  z_depth_abs_rel, z_depth_inlier_thres_103   the same on each view's own z-depth
  ray_dirs_err_deg            mean over every pixel (no mask) of the angle between true and predicted
                              unit rays in the view's camera frame
and per sample:
  pose_auc_5                  AUC up to 5 deg (x100) of max(rotation error, translation-direction
                              error) over every view pair, histogram bins of 1 deg
  pose_ate_rmse               mean (MapAnything's name says RMSE; its code takes the mean) distance of
                              the normalised camera centres after the best rigid alignment (no scale)
  metric_scale_abs_rel        |s_pred - s_gt| / s_gt, s the metric mean distance above (the scale the
                              model predicts, judged)
Beside them, the depth after per-view median alignment (z_pred x median(z_gt) / median(z_pred)), AbsRel
and delta < 1.25: the monocular-depth convention, for tables that align each view.

Where ours differs, deliberately: float64 throughout (MapAnything's rotation error in float32 reads 0
below ~0.05 deg); the ray angle's asin argument is clipped to 1 (rounding can take two opposite unit
rays just past it, where MapAnything gives nan).
"""

from __future__ import annotations

import math

import torch

from mapanything_ext.evaluation.pose_metrics import pair_errors
from mapanything_ext.geometry.rotations import quaternion_to_matrix

THRESHOLD = 1.03
AUC_MAX_DEG = 5
MEDIAN_INLIER = 1.25
PER_VIEW = ("pointmaps_abs_rel", "pointmaps_inlier_thres_103", "z_depth_abs_rel", "z_depth_inlier_thres_103",
            "ray_dirs_err_deg", "depth_abs_rel_median_aligned", "depth_inlier_1.25_median_aligned")
PER_SAMPLE = ("pose_auc_5", "pose_ate_rmse", "metric_scale_abs_rel")
BENCHMARK = PER_VIEW + PER_SAMPLE


def pose_of(quats_xyzw: torch.Tensor, trans: torch.Tensor) -> torch.Tensor:
    """4x4 float64 camera-to-frame pose from a quaternion (x, y, z, w; normalised here) and a translation."""
    pose = torch.eye(4, dtype=torch.float64)
    pose[:3, :3] = quaternion_to_matrix(quats_xyzw.double() / quats_xyzw.double().norm())
    pose[:3, 3] = trans.double()
    return pose


def moved(points: torch.Tensor, pose: torch.Tensor) -> torch.Tensor:
    return points @ pose[:3, :3].T + pose[:3, 3]


def mean_distance(points: list[torch.Tensor], masks: list[torch.Tensor]) -> torch.Tensor:
    """MapAnything's avg_dis normalisation factor: mean |x| over the masked pixels of every view."""
    total = sum(p.norm(dim=-1)[m].sum() for p, m in zip(points, masks))
    count = sum(int(m.sum()) for m in masks)
    return torch.clamp(total / (count + 1e-8), min=1e-8)


def abs_rel(gt: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor) -> float:
    """mean |pred - gt| / |gt| over mask & |gt| > 0 (a non-finite ratio counts 0, as MapAnything's)."""
    gt_norm = gt.norm(dim=-1)
    keep = mask & (gt_norm > 0)
    if not keep.any():
        return math.nan
    rel = torch.nan_to_num((pred - gt).norm(dim=-1) / gt_norm, nan=0.0, posinf=0.0, neginf=0.0)
    return float(rel[keep].mean())


def inlier_ratio(gt: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor, threshold: float = THRESHOLD) -> float:
    """Share of mask & |gt| > 0 with 0 < max(|gt|/|pred|, |pred|/|gt|) < threshold (a zero prediction is
    an outlier)."""
    gt_norm, pred_norm = gt.norm(dim=-1), pred.norm(dim=-1)
    keep = mask & (gt_norm > 0)
    if not keep.any():
        return math.nan
    over = threshold + 1
    rel = torch.maximum(torch.nan_to_num(gt_norm / pred_norm, nan=over, posinf=over, neginf=over),
                        torch.nan_to_num(pred_norm / gt_norm, nan=0.0, posinf=0.0, neginf=0.0))
    return float(((rel > 0) & (rel < threshold))[keep].double().mean())


def ray_angle_deg(rays_gt: torch.Tensor, rays_pred: torch.Tensor) -> float:
    """Mean over every pixel of the angle between unit rays, 2 asin(|a - b| / 2), in degrees."""
    chord = ((rays_gt.double() - rays_pred.double()).norm(dim=-1) / 2).clamp(max=1.0)
    return float(torch.rad2deg(2 * torch.asin(chord)).mean())


def auc_histogram(errors: list[float], max_deg: int = AUC_MAX_DEG) -> float:
    """MapAnything's (and VGGT's) calculate_auc_np x100: the mean over k = 1..max of the share of pairs with
    error < k (<= max in the last bin); non-finite errors count as misses."""
    if not errors:
        return math.nan
    shares = [sum(1 for e in errors if (e < k if k < max_deg else e <= k)) / len(errors)
              for k in range(1, max_deg + 1)]
    return 100.0 * sum(shares) / max_deg


def rigid_alignment_error(centres_gt: torch.Tensor, centres_pred: torch.Tensor) -> float:
    """Mean distance of the predicted centres (N, 3) from the true ones moved by the best rotation and
    translation (Horn's closed form, reflections excluded; no scale)."""
    gt, pred = centres_gt.double(), centres_pred.double()
    gt_c, pred_c = gt - gt.mean(0), pred - pred.mean(0)
    u, _, vt = torch.linalg.svd(pred_c.T @ gt_c)
    fix = torch.eye(3, dtype=torch.float64)
    if torch.det(u) * torch.det(vt) < 0:
        fix[2, 2] = -1.0
    rotation = u @ fix @ vt
    aligned = gt_c @ rotation.T + pred.mean(0)
    return float((aligned - pred).norm(dim=-1).mean())


def median_aligned(z_pred: torch.Tensor, z_gt: torch.Tensor, valid: torch.Tensor) -> tuple[float, float]:
    """(AbsRel, delta < 1.25) of the depth scaled by median(z_gt) / median(z_pred) over the valid pixels."""
    if not valid.any():
        return math.nan, math.nan
    pred, gt = z_pred[valid].double(), z_gt[valid].double()
    scaled = (pred * gt.median() / pred.median()).clamp(min=1e-6)
    return float(((scaled - gt).abs() / gt).mean()), float((torch.maximum(scaled / gt, gt / scaled) < MEDIAN_INLIER)
                                                            .double().mean())


def benchmark_metrics(views: list[dict], preds: list[dict]) -> dict:
    """{"views": [per-view dicts of PER_VIEW], "sample": the PER_VIEW means and PER_SAMPLE} of one sample
    (tensors with a batch dimension of 1; MapAnything's output keys)."""
    masks = [v["valid_mask"][0].bool() & (v["depthmap"][0, ..., 0] > 0) for v in views]
    gt_poses = [v["camera_pose"][0].double() for v in views]
    pr_poses = [pose_of(p["cam_quats"][0], p["cam_trans"][0]) for p in preds]
    scale = [float(p["metric_scaling_factor"].reshape(-1)[0]) if "metric_scaling_factor" in p else 1.0 for p in preds]
    gt_to_first, pr_to_first = torch.linalg.inv(gt_poses[0]), torch.linalg.inv(pr_poses[0])
    gt_pts = [moved(v["pts3d"][0].double(), gt_to_first) for v in views]
    pr_metric = [moved(p["pts3d"][0].double(), pr_to_first) for p in preds]
    pr_pts = [x / s for x, s in zip(pr_metric, scale)]
    s_gt, s_pr = mean_distance(gt_pts, masks), mean_distance(pr_pts, masks)
    per_view = []
    for i, (view, pred, mask) in enumerate(zip(views, preds, masks)):
        z_gt = view["pts3d_cam"][0, ..., 2:].double() / s_gt
        z_pr = pred["pts3d_cam"][0, ..., 2:].double() / scale[i] / s_pr
        rel, inl = median_aligned(pred["pts3d_cam"][0, ..., 2], view["depthmap"][0, ..., 0], mask)
        per_view.append({
            "pointmaps_abs_rel": abs_rel(gt_pts[i] / s_gt, pr_pts[i] / s_pr, mask),
            "pointmaps_inlier_thres_103": inlier_ratio(gt_pts[i] / s_gt, pr_pts[i] / s_pr, mask),
            "z_depth_abs_rel": abs_rel(z_gt, z_pr, mask),
            "z_depth_inlier_thres_103": inlier_ratio(z_gt, z_pr, mask),
            "ray_dirs_err_deg": (ray_angle_deg(view["ray_directions_cam"][0], pred["ray_directions"][0])
                                 if "ray_directions" in pred else math.nan),
            "depth_abs_rel_median_aligned": rel, "depth_inlier_1.25_median_aligned": inl,
        })
    sample = {key: sum(v[key] for v in per_view) / len(per_view) for key in PER_VIEW}
    pairs = pair_errors(pr_poses, gt_poses, [str(i) for i in range(len(views))])
    sample["pose_auc_5"] = auc_histogram([max(p["rotation_deg"], p["translation_deg"]) if not
                                          math.isnan(p["translation_deg"]) else math.inf for p in pairs])
    centres_gt = torch.stack([(gt_to_first @ p)[:3, 3] for p in gt_poses]) / s_gt
    centres_pr = torch.stack([(pr_to_first @ p)[:3, 3] / s for p, s in zip(pr_poses, scale)]) / s_pr
    sample["pose_ate_rmse"] = rigid_alignment_error(centres_gt, centres_pr) if len(views) > 1 else math.nan
    s_pr_metric = mean_distance(pr_metric, masks)
    sample["metric_scale_abs_rel"] = float((s_pr_metric - s_gt).abs() / s_gt)
    return {"views": per_view, "sample": sample}
