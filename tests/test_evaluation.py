"""Evaluation end to end: the CLI on a trained checkpoint, comparison tables, plots, PLY export."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import default_collate

from mapanything_ext.datasets.opv2v import OPV2VCoopDataset
from mapanything_ext.evaluation import export_ply, plots
from tests.test_evaluation_metrics import oracle
from tests.training_runs import REPO, run_training, tiny_overrides

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def trained_run(synthetic_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval") / "stage1"
    proc = run_training(tiny_overrides(synthetic_root, out, "train_params.epochs=2"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    return out


def evaluate(synthetic_root, *args):
    cmd = [sys.executable, "-m", "mapanything_ext.evaluate", f"machine.opv2v_root={synthetic_root / 'opv2v'}",
           f"machine.opv2v_depth_root={synthetic_root / 'opv2v_depth'}", "dataset.resolution_test=[56,42]",
           "max_points_per_view=500", *args]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)


def test_evaluate_compares_checkpoints_single_vs_coop(synthetic_root, trained_run, tmp_path):
    out = tmp_path / "eval"
    proc = evaluate(synthetic_root, f"checkpoint=[{trained_run / 'checkpoint-best.pth'},"
                    f"{trained_run / 'checkpoint-final.pth'}]", "labels=[best,final]", f"output_dir={out}",
                    "num_samples=2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((out / "metrics.json").read_text())
    assert set(results) == {"best", "final"}
    summary = results["best"]["summary"]
    assert {"single", "coop_main", "coop_all", "by_num_views"} <= set(summary)
    assert summary["single"]["samples"] == 2 and len(results["best"]["samples"]) == 2
    for key in ("depth_abs_rel_metric", "depth_inlier_1.25_metric", "point_error_metric_m", "abs_registration_error_m",
                "rel_rotation_deg", "rel_translation_metric_m", "metric_scale_abs_rel", "pointmaps_abs_rel",
                "pose_auc_5"):
        assert summary["coop_all"]["per_sample"][key] >= 0
    table = (out / "table.md").read_text()
    assert "| best | single |" in table and "| final | coop_main |" in table
    assert "Does the other vehicle help?" in table and "metric, no alignment, delta 1.25, depth <= 250 m" in table
    assert "MapAnything's benchmark set" in table and "| pointmaps_abs_rel |" in table
    for png in ("loss_curves.png", "metric_vs_views.png", "depth_errors_best_sample0.png"):
        with Image.open(out / png) as image:
            assert image.size[0] > 300
    points, colors = export_ply.read_ply(out / "final_sample0_side_by_side.ply")
    assert len(points) > 1000 and np.isfinite(points).all()
    assert f"table: {out / 'table.md'}" in proc.stdout


def test_missing_checkpoint_is_named(synthetic_root, tmp_path):
    proc = evaluate(synthetic_root, f"checkpoint={tmp_path / 'nope.pth'}")
    assert proc.returncode != 0
    assert f"checkpoint(s) not found: {tmp_path / 'nope.pth'}" in proc.stderr


def test_ply_of_a_perfect_prediction_matches_the_truth(synthetic_root, tmp_path):
    ds = OPV2VCoopDataset(root=synthetic_root / "opv2v", depth_root=synthetic_root / "opv2v_depth", split="train",
                          resolution=(56, 42), seed=0, num_views=8)
    views = default_collate([ds[0]])
    files = export_ply.export_sample(views, oracle(views), tmp_path, max_points_per_view=10_000)
    gt_points, gt_colors = export_ply.read_ply(files["gt"])
    pred_points, pred_colors = export_ply.read_ply(files["pred"])
    cameras = (gt_colors == export_ply.GT_CAMERA_RGB).all(1)
    assert cameras.sum() == 8 * 8 * 40  # 8 views x 8 edges x 40 points
    cloud = gt_points[~cameras]
    expected = torch.cat([v["pts3d"][0][v["valid_mask"][0].bool() & (v["depthmap"][0, ..., 0] > 0)] for v in views])
    assert len(cloud) == len(expected)
    np.testing.assert_allclose(cloud, expected.numpy(), atol=1e-3)
    # the oracle's points and cameras land exactly on the truth in the main vehicle's frame
    np.testing.assert_allclose(pred_points, gt_points, atol=1e-3)
    assert ((pred_colors == export_ply.PRED_CAMERA_RGB).all(1) == cameras).all()
    both, _ = export_ply.read_ply(files["side_by_side"])
    assert len(both) == 2 * len(gt_points)
    assert both[len(gt_points):, 1].min() > gt_points[:, 1].max()  # the prediction sits beside the truth


def test_frustum_apex_is_the_camera_centre_and_looks_along_its_axis():
    pose = np.eye(4)
    pose[:3, 3] = [1.0, 2.0, 3.0]
    k = np.array([[50.0, 0, 32], [0, 50.0, 24], [0, 0, 1]])
    pts = export_ply.frustum_points(pose, k, 48, 64, depth=2.0, per_edge=5)
    np.testing.assert_allclose(pts[0], [1.0, 2.0, 3.0])
    assert np.isclose(pts[:, 2].max(), 5.0)  # base at 2 m in front along +z (OpenCV)


def test_loss_curves_from_several_runs(trained_run, tmp_path):
    png = plots.loss_curves([trained_run, trained_run], tmp_path / "curves.png", ["a", "b"])
    with Image.open(png) as image:
        assert image.format == "PNG"
    with pytest.raises(FileNotFoundError, match="no log.txt"):
        plots.loss_curves([tmp_path], tmp_path / "x.png")


def test_a_run_folder_evaluates_its_best_a_torn_file_gets_our_verdict_and_the_header_counts_what_ran(
        synthetic_root, trained_run, tmp_path):
    proc = evaluate(synthetic_root, f"checkpoint={trained_run}", f"output_dir={tmp_path / 'folder'}", "num_samples=1",
                    "plots=false", "export_ply=false")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"{trained_run} is a run folder: evaluating its checkpoint-best.pth" in proc.stdout
    assert "[evaluate] 1 of the 3 samples of split" in proc.stdout
    torn = tmp_path / "torn.pth"
    torn.write_bytes((trained_run / "checkpoint-best.pth").read_bytes()[:-4000])
    bad = evaluate(synthetic_root, f"checkpoint={torn}", f"output_dir={tmp_path / 'torn'}")
    assert bad.returncode != 0 and f"{torn} fails verification and is not used: truncated" in bad.stderr, \
        bad.stderr[-2000:]
    empty = tmp_path / "empty_run"
    empty.mkdir()
    (empty / "checkpoint-3.pth").write_bytes(b"")
    listed = evaluate(synthetic_root, f"checkpoint={empty}")
    assert listed.returncode != 0 and "without checkpoint-best.pth; give one of its checkpoints as " \
        "checkpoint=: checkpoint-3.pth" in listed.stderr


def test_better_or_worse_only_beyond_the_noise_of_the_paired_difference():
    from mapanything_ext.evaluation.report import _gain, _paired_gain

    def records(diffs):
        return [{"single": {"sample": {"depth_abs_rel_metric": 0.5}}, "coop_main": {"sample": {"depth_abs_rel_metric": 0.5 + d}}}
                for d in diffs]

    clear = _paired_gain(records([-0.1, -0.11, -0.09, -0.1]))["depth_abs_rel_metric"]
    assert _gain(0.5, 0.4, "depth_abs_rel_metric", clear).endswith("(better)")
    noisy = _paired_gain(records([-0.3, 0.25, -0.2, 0.2]))["depth_abs_rel_metric"]
    assert _gain(0.5, 0.49, "depth_abs_rel_metric", noisy).endswith("(within noise)")
    assert _gain(0.5, 0.4, "depth_abs_rel_metric", None).endswith("(too few samples to tell)")
