"""Evaluation metrics against values known by hand: perfect predictions, known scale and shifts."""

import math

import pytest
import torch
from torch.utils.data import default_collate

from mapanything_ext.datasets.opv2v import OPV2VCoopDataset
from mapanything_ext.evaluation import metrics
from mapanything_ext.geometry.rotations import matrix_to_quaternion, quaternion_to_matrix


@pytest.fixture(scope="module")
def coop_views(synthetic_root):
    ds = OPV2VCoopDataset(root=synthetic_root / "opv2v", depth_root=synthetic_root / "opv2v_depth", split="train",
                          resolution=(56, 42), seed=0, num_views=8)
    return default_collate([ds[0]])


def oracle(views, scale=1.0, shift=(0.0, 0.0, 0.0)):
    """A prediction built from the ground truth, optionally scaled about the first camera and shifted."""
    ref_to_main = views[0]["camera_pose"][0]
    main_to_ref = torch.linalg.inv(ref_to_main)
    shift = torch.tensor(shift)
    preds = []
    for view in views:
        pose_ref = main_to_ref @ view["camera_pose"][0]
        pts_ref = view["pts3d"][0] @ main_to_ref[:3, :3].T + main_to_ref[:3, 3]
        preds.append({
            "pts3d_cam": view["pts3d_cam"] * scale,
            "pts3d": (pts_ref * scale + shift)[None],
            "cam_trans": (pose_ref[:3, 3] * scale)[None],
            "cam_quats": matrix_to_quaternion(pose_ref[:3, :3])[None],
        })
    return preds


def test_perfect_prediction_scores_zero_error(coop_views):
    result = metrics.sample_metrics(coop_views, oracle(coop_views))
    s = result["sample"]
    assert s["num_views"] == 8 and len(result["views"]) == 8
    assert s["depth_abs_rel_metric"] == pytest.approx(0, abs=1e-6)
    assert s["depth_inlier_1.25_metric"] == 1.0
    assert s["point_error_metric_m"] == pytest.approx(0, abs=1e-4)
    # (the oracle's quaternions are float32: ~1e-5 deg is their rounding, not the metric's floor)
    assert s["rel_rotation_deg"] == pytest.approx(0, abs=1e-4)
    assert s["rel_translation_metric_m"] == pytest.approx(0, abs=1e-4)
    assert s["metric_scale_abs_rel"] == pytest.approx(0, abs=1e-6)


def test_scene_ten_percent_too_large(coop_views):
    s = metrics.sample_metrics(coop_views, oracle(coop_views, scale=1.1))["sample"]
    assert s["depth_abs_rel_metric"] == pytest.approx(0.1, rel=1e-4)
    assert s["depth_inlier_1.25_metric"] == 1.0  # 1.1 < 1.25
    assert s["metric_scale_abs_rel"] == pytest.approx(0.1, rel=1e-4)
    assert s["rel_rotation_deg"] == pytest.approx(0, abs=0.05)
    # relative translations grow by 10 %: the error is 0.1 x the mean true baseline
    gt = [v["camera_pose"][0].double() for v in coop_views]
    baselines = [float((torch.linalg.inv(gt[i]) @ gt[j])[:3, 3].norm())
                 for i in range(len(gt)) for j in range(i + 1, len(gt))]
    assert s["rel_translation_metric_m"] == pytest.approx(0.1 * sum(baselines) / len(baselines), rel=1e-3)


def test_scene_thirty_percent_too_large_has_no_inliers(coop_views):
    s = metrics.sample_metrics(coop_views, oracle(coop_views, scale=1.3))["sample"]
    assert s["depth_inlier_1.25_metric"] == 0.0
    assert s["depth_abs_rel_metric"] == pytest.approx(0.3, rel=1e-4)


def test_known_shift_gives_known_point_error(coop_views):
    s = metrics.sample_metrics(coop_views, oracle(coop_views, shift=(0.3, 0.0, 0.4)))["sample"]
    assert s["point_error_metric_m"] == pytest.approx(0.5, rel=1e-4)
    assert s["abs_registration_error_m"] == pytest.approx(0.5, rel=1e-4)
    assert s["depth_abs_rel_metric"] == pytest.approx(0, abs=1e-6)  # per-view depth does not see the shift


def test_an_error_of_the_first_view_alone_costs_only_the_absolute_registration(coop_views):
    """The whole predicted world turned by 2 deg and moved 0.54 m (the first view's pose off, the
    geometry perfect): the point error in the predicted first camera's frame is 0; placed with the
    true first pose (abs_registration_error_m), every point moves."""
    preds = oracle(coop_views)
    turn = torch.eye(4)
    a = math.radians(2.0)
    turn[:2, :2] = torch.tensor([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])
    turn[:3, 3] = torch.tensor([0.54, 0.0, 0.0])
    for pred in preds:
        pose = torch.eye(4)
        pose[:3, :3] = quaternion_to_matrix(pred["cam_quats"][0].double()).float()
        pose[:3, 3] = pred["cam_trans"][0]
        pose = turn @ pose
        pred["pts3d"] = pred["pts3d"] @ turn[:3, :3].T + turn[:3, 3]
        pred["cam_trans"], pred["cam_quats"] = pose[:3, 3][None], matrix_to_quaternion(pose[:3, :3])[None]
    s = metrics.sample_metrics(coop_views, preds)["sample"]
    assert s["point_error_metric_m"] == pytest.approx(0, abs=1e-3)
    assert s["pointmaps_abs_rel"] == pytest.approx(0, abs=1e-5) and s["metric_scale_abs_rel"] < 1e-5
    assert s["abs_registration_error_m"] > 0.5


def test_metrics_on_a_tiny_hand_case():
    z_gt = torch.tensor([[2.0, 4.0], [8.0, 1.0]])
    z_pred = torch.tensor([[2.0, 5.0], [4.0, 9.0]])
    valid = torch.tensor([[True, True], [True, False]])
    # |0|/2, |1|/4, |4|/8 -> (0 + 0.25 + 0.5) / 3
    assert metrics.depth_abs_rel(z_pred, z_gt, valid) == pytest.approx(0.25)
    # ratios 1, 1.25 (not < 1.25), 2 -> 1 inlier of 3
    assert metrics.depth_inlier_ratio(z_pred, z_gt, valid) == pytest.approx(1 / 3)
    assert math.isnan(metrics.depth_abs_rel(z_pred, z_gt, torch.zeros_like(valid)))


def test_relative_rotation_error_of_a_known_turn():
    turn = torch.eye(4, dtype=torch.float64)
    angle = math.radians(10)
    turn[:2, :2] = torch.tensor([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    gt = [torch.eye(4, dtype=torch.float64), torch.eye(4, dtype=torch.float64)]
    rot, trans = metrics.relative_pose_errors([torch.eye(4, dtype=torch.float64), turn], gt)
    assert rot == pytest.approx(10.0, abs=1e-4) and trans == pytest.approx(0.0)


@pytest.mark.parametrize("degrees", [1e-4, 0.01, 2.0, 90.0, 179.9])
def test_rotation_angle_has_no_floor_near_zero_and_is_exact_at_every_angle(degrees):
    """The atan2 form: the identity scores exactly 0 (arccos of the trace scored 0.0115 deg in float32),
    and small angles keep their precision."""
    assert metrics.rotation_angle_deg(torch.eye(3)) == 0.0
    assert metrics.rotation_angle_deg(torch.eye(3, dtype=torch.float64)) == 0.0
    a = math.radians(degrees)
    axis = torch.tensor([1.0, 2.0, -0.5], dtype=torch.float64)
    axis = axis / axis.norm()
    k = torch.tensor([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]], dtype=torch.float64)
    rotation = torch.eye(3, dtype=torch.float64) + math.sin(a) * k + (1 - math.cos(a)) * k @ k  # Rodrigues
    assert metrics.rotation_angle_deg(rotation) == pytest.approx(degrees, rel=1e-9)


def test_depth_and_point_errors_by_true_depth_range():
    """Three pixels, one per range: 10 m exact, 50 m read 10 % long, 120 m read 20 % long (points along
    the optical axis, so the point error is the depth error)."""
    z_gt = torch.tensor([[10.0, 50.0, 120.0, 300.0]], dtype=torch.float64)
    z_pred = z_gt * torch.tensor([[1.0, 1.1, 1.2, 1.0]], dtype=torch.float64)
    valid = torch.tensor([[True, True, True, True]])
    pts_gt = torch.stack([torch.zeros_like(z_gt), torch.zeros_like(z_gt), z_gt], dim=-1)
    pts_pred = torch.stack([torch.zeros_like(z_pred), torch.zeros_like(z_pred), z_pred], dim=-1)
    out = metrics.by_true_depth(z_pred, z_gt, pts_pred, pts_gt, valid)
    assert out["depth_abs_rel_metric_0_30m"] == 0.0 and out["point_error_metric_m_0_30m"] == 0.0
    assert out["depth_abs_rel_metric_30_80m"] == pytest.approx(0.1) and out["point_error_metric_m_30_80m"] == pytest.approx(5.0)
    assert out["depth_abs_rel_metric_80_250m"] == pytest.approx(0.2) and out["point_error_metric_m_80_250m"] == pytest.approx(24.0)
    out = metrics.by_true_depth(z_pred, z_gt, pts_pred, pts_gt, torch.tensor([[True, False, False, False]]))
    assert math.isnan(out["depth_abs_rel_metric_30_80m"])  # no pixel in the range: not a number, not a zero
