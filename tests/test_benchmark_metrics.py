"""MapAnything's benchmark set (evaluation/benchmark_metrics.py): each definition pinned on hand-made
cases, and one noisy case scored by MapAnything's own benchmark code (where it is installed, with its
repository's benchmarking/ folder) to the same numbers."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest
import torch

from mapanything_ext.evaluation.benchmark_metrics import (
    BENCHMARK, auc_histogram, benchmark_metrics, rigid_alignment_error)
from mapanything_ext.geometry.rotations import matrix_to_quaternion, quaternion_to_matrix

H, W = 6, 8


def rotation(seed: int, degrees: float | None = None) -> torch.Tensor:
    """A random rotation (or one of `degrees` about a random axis)."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(4, generator=g, dtype=torch.float64)
    if degrees is not None:
        axis = q[:3] / q[:3].norm()
        half = math.radians(degrees) / 2
        q = torch.cat([axis * math.sin(half), torch.tensor([math.cos(half)], dtype=torch.float64)])
    return quaternion_to_matrix(q / q.norm())


def scene(n_views: int = 3, seed: int = 0) -> list[dict]:
    """Ground-truth views in the batch-of-one layout the evaluation gives: poses, camera-frame points
    (depth 2..40 m), world points, unit rays, a mask with a few invalid pixels."""
    g = torch.Generator().manual_seed(seed)
    views = []
    for i in range(n_views):
        pose = torch.eye(4, dtype=torch.float64)
        pose[:3, :3] = rotation(seed * 100 + i)
        pose[:3, 3] = torch.randn(3, generator=g, dtype=torch.float64) * 5
        rays = torch.randn(H, W, 3, generator=g, dtype=torch.float64) * 0.3
        rays[..., 2] = 1.0
        depth = 2 + 38 * torch.rand(H, W, generator=g, dtype=torch.float64)
        pts_cam = rays * depth[..., None]
        valid = torch.rand(H, W, generator=g) > 0.1
        depth = torch.where(valid, depth, torch.zeros_like(depth))
        views.append({"camera_pose": pose[None].float(), "pts3d_cam": pts_cam[None].float(),
                      "pts3d": (pts_cam @ pose[:3, :3].T + pose[:3, 3])[None].float(),
                      "ray_directions_cam": (rays / rays.norm(dim=-1, keepdim=True))[None].float(),
                      "depthmap": depth[None, ..., None].float(), "valid_mask": valid[None]})
    return views


def prediction(views: list[dict], scale: float = 1.0, world: torch.Tensor | None = None, msf: float = 1.0,
               noise: float = 0.0, pose_noise_deg: float = 0.0, seed: int = 1) -> list[dict]:
    """The truth as a model would output it: world moved by `world` (4x4), every length x `scale`,
    a metric scaling factor `msf` (already multiplied in, as MapAnything's outputs are), optional noise."""
    g = torch.Generator().manual_seed(seed)
    world = torch.eye(4, dtype=torch.float64) if world is None else world
    preds = []
    for i, view in enumerate(views):
        pose = world @ view["camera_pose"][0].double()
        if pose_noise_deg:
            pose[:3, :3] = pose[:3, :3] @ rotation(seed * 1000 + i, pose_noise_deg * (1 + i))
            pose[:3, 3] += torch.randn(3, generator=g, dtype=torch.float64) * 0.3
        pts_cam = view["pts3d_cam"][0].double() * (1 + noise * torch.randn(H, W, 1, generator=g, dtype=torch.float64))
        rays = view["ray_directions_cam"][0].double() + noise * torch.randn(H, W, 3, generator=g, dtype=torch.float64)
        length = scale * msf
        pose_scaled = pose.clone()
        pose_scaled[:3, 3] *= length
        preds.append({"pts3d_cam": (pts_cam * length)[None].float(),
                      "pts3d": ((pts_cam * length) @ pose[:3, :3].T + pose_scaled[:3, 3])[None].float(),
                      "cam_quats": matrix_to_quaternion(pose[:3, :3])[None].float(),
                      "cam_trans": pose_scaled[:3, 3][None].float(),
                      "ray_directions": (rays / rays.norm(dim=-1, keepdim=True))[None].float(),
                      "metric_scaling_factor": torch.tensor([[msf]])})
    return preds


def test_a_perfect_prediction_scores_zero_error_and_full_inliers():
    views = scene()
    sample = benchmark_metrics(views, prediction(views))["sample"]
    for key in ("pointmaps_abs_rel", "z_depth_abs_rel", "depth_abs_rel_median_aligned", "metric_scale_abs_rel"):
        assert sample[key] == pytest.approx(0, abs=1e-6), key
    for key in ("pointmaps_inlier_thres_103", "z_depth_inlier_thres_103", "depth_inlier_1.25_median_aligned"):
        assert sample[key] == 1.0, key
    assert sample["ray_dirs_err_deg"] < 0.05  # float32 unit rays
    assert sample["pose_auc_5"] == 100.0 and sample["pose_ate_rmse"] < 1e-5


def test_truth_times_two_is_perfect_but_for_the_metric_scale():
    views = scene()
    sample = benchmark_metrics(views, prediction(views, scale=2.0))["sample"]
    assert sample["pointmaps_abs_rel"] == pytest.approx(0, abs=1e-6)
    assert sample["z_depth_abs_rel"] == pytest.approx(0, abs=1e-6)
    assert sample["depth_abs_rel_median_aligned"] == pytest.approx(0, abs=1e-6)
    assert sample["metric_scale_abs_rel"] == pytest.approx(1.0, rel=1e-6)  # twice the size: 100 % off


def test_the_metric_scaling_factor_is_divided_out_of_the_shape_and_judged_in_the_scale():
    views = scene()
    sample = benchmark_metrics(views, prediction(views, msf=1.5))["sample"]
    assert sample["pointmaps_abs_rel"] == pytest.approx(0, abs=1e-6)
    assert sample["metric_scale_abs_rel"] == pytest.approx(0.5, rel=1e-6)


def test_a_prediction_in_another_world_frame_scores_as_the_truth():
    """The prediction is read in its own first camera's frame: a whole predicted world moved by 30 deg
    and 12 m (a first view that is off) costs nothing, as the geometry is perfect."""
    views = scene()
    world = torch.eye(4, dtype=torch.float64)
    world[:3, :3] = rotation(7, 30.0)
    world[:3, 3] = torch.tensor([12.0, -3.0, 1.0])
    sample = benchmark_metrics(views, prediction(views, world=world))["sample"]
    assert sample["pointmaps_abs_rel"] == pytest.approx(0, abs=1e-5)
    assert sample["metric_scale_abs_rel"] == pytest.approx(0, abs=1e-5)
    assert sample["pose_auc_5"] == 100.0 and sample["pose_ate_rmse"] < 1e-5


def test_noise_costs_and_every_key_is_reported():
    views = scene()
    sample = benchmark_metrics(views, prediction(views, noise=0.05, pose_noise_deg=2.0))["sample"]
    assert set(BENCHMARK) <= set(sample)
    assert 0.01 < sample["pointmaps_abs_rel"] < 0.5 and sample["pointmaps_inlier_thres_103"] < 1.0
    assert 0 < sample["pose_auc_5"] < 100 and sample["ray_dirs_err_deg"] > 0.5


def test_auc_is_the_histogram_form_with_the_last_bin_closed():
    assert auc_histogram([0.5, 1.5, 4.99, 5.0, 7.0]) == pytest.approx(44.0)
    assert auc_histogram([0.0] * 3) == 100.0 and auc_histogram([math.inf, math.nan]) == 0.0


def test_the_rigid_alignment_takes_no_scale():
    centres = torch.tensor([[0.0, 0, 0], [1, 0, 0], [0, 2, 0], [0, 0, 3]], dtype=torch.float64)
    moved = centres @ rotation(3).T + torch.tensor([4.0, 5, 6])
    assert rigid_alignment_error(centres, moved) == pytest.approx(0, abs=1e-12)
    assert rigid_alignment_error(centres, 2 * centres) > 0.5  # a scale error stays an error


def _mapanything_benchmark():
    """MapAnything's benchmark module from the installed package's repository, or None."""
    try:
        import mapanything
    except ImportError:
        return None
    path = Path(mapanything.__file__).resolve().parents[1] / "benchmarking" / "dense_n_view" / "benchmark.py"
    if not path.exists():
        return None
    spec = importlib.util.spec_from_file_location("mapanything_dense_n_view_benchmark", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def mapanything_scores(views: list[dict], preds: list[dict]) -> dict:
    """One sample scored as MapAnything's benchmark scores it: its data preparation, then its metric
    functions in the order and with the arguments of its per-sample loop."""
    import numpy as np
    from mapanything.utils import metrics

    bench = _mapanything_benchmark()
    if not hasattr(np.linalg, "linalg"):  # evaluate_ate reaches numpy < 2's np.linalg.linalg
        np.linalg.linalg = np.linalg
    batch = [{**v, "camera_pose_quats": matrix_to_quaternion(v["camera_pose"][0, :3, :3].double())[None].float(),
              "camera_pose_trans": v["camera_pose"][:, :3, 3], "is_metric_scale": torch.tensor([True])}
             for v in views]
    batch = [{**b, "valid_mask": b["valid_mask"] & (b["depthmap"][..., 0] > 0)} for b in batch]
    gt, pr, masks = bench.get_all_info_for_metric_computation(batch, preds)
    n = len(views)
    per_view = {k: [] for k in ("pointmaps_abs_rel", "pointmaps_inlier_thres_103", "z_depth_abs_rel",
                                "z_depth_inlier_thres_103", "ray_dirs_err_deg")}
    for v in range(n):
        mask = masks[v][0].numpy()
        for name, key in (("pointmaps", "pts3d"), ("z_depth", "z_depths")):
            per_view[f"{name}_abs_rel"].append(metrics.m_rel_ae(gt=gt[key][v][0].numpy(), pred=pr[key][v][0].numpy(),
                                                                mask=mask))
            per_view[f"{name}_inlier_thres_103"].append(metrics.thresh_inliers(
                gt=gt[key][v][0].numpy(), pred=pr[key][v][0].numpy(), mask=mask, thresh=1.03))
        l2 = torch.norm(gt["ray_directions"][v][0] - pr["ray_directions"][v][0], dim=-1)
        per_view["ray_dirs_err_deg"].append(float(metrics.l2_distance_of_unit_ray_directions_to_angular_error(l2).mean()))
    out = {k: float(np.mean(v)) for k, v in per_view.items()}
    gt_poses, pr_poses = [gt["poses"][v][0] for v in range(n)], [pr["poses"][v][0] for v in range(n)]
    out["pose_ate_rmse"] = float(metrics.evaluate_ate(gt_traj=gt_poses, est_traj=pr_poses))
    r_err, t_err = metrics.se3_to_relative_pose_error(pred_se3=torch.stack(pr_poses), gt_se3=torch.stack(gt_poses),
                                                      num_frames=n)
    out["pose_auc_5"] = float(metrics.calculate_auc_np(r_err.numpy(), t_err.numpy(), max_threshold=5)[0] * 100)
    scale_gt, scale_pr = gt["metric_scale"][0].numpy(), pr["metric_scale"][0].numpy()
    out["metric_scale_abs_rel"] = float((np.abs(scale_pr - scale_gt) / scale_gt).item())
    return out


@pytest.mark.skipif(_mapanything_benchmark() is None,
                    reason="needs MapAnything installed from its repository (benchmarking/dense_n_view)")
def test_mapanything_s_own_benchmark_scores_a_noisy_case_to_our_numbers():
    views = scene(n_views=4, seed=3)
    world = torch.eye(4, dtype=torch.float64)
    world[:3, :3] = rotation(11, 20.0)
    world[:3, 3] = torch.tensor([3.0, -1.0, 2.0])
    preds = prediction(views, scale=1.3, world=world, msf=1.7, noise=0.02, pose_noise_deg=1.5)
    ours = benchmark_metrics(views, preds)["sample"]
    theirs = mapanything_scores(views, preds)
    print("\n[benchmark] ours vs MapAnything's:", {k: (round(ours[k], 6), round(v, 6)) for k, v in theirs.items()})
    assert 0 < theirs["pose_auc_5"] < 100 and theirs["pointmaps_abs_rel"] > 0.01  # a case that can differ
    for key, value in theirs.items():
        assert ours[key] == pytest.approx(value, rel=1e-4, abs=1e-5), key
