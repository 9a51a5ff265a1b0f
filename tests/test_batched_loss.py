"""The view-batched criterion (losses/batched_loss.py) and loss.impl (losses/loss_selfcheck.py).

Its own invariants are tested everywhere; equality with MapAnything's criterion, built from the v1.1
loss strings, runs where MapAnything is installed (skipped otherwise, with the reason)."""

import importlib.util
import math

import pytest
import torch

from mapanything_ext.config import compose_training
from mapanything_ext.losses import batched_loss
from mapanything_ext.losses.batched_loss import BatchedCriterion, LossSpec
from mapanything_ext.losses.loss_selfcheck import ChosenCriterion, LossMismatch, compare
from tests.loss_batches import noisy_predictions, perfect_predictions, random_views

TRAIN, TEST = LossSpec(), LossSpec(conf_sets=(), exclude_sets=(0, 1, 2))
NAME = "FactoredGeometryScaleRegr3DPlusNormalGMLoss"


def loss_and_details(spec, views, preds):
    loss, details = BatchedCriterion(spec)(views, preds)
    return float(loss), dict(details)


def test_a_perfect_prediction_costs_only_the_normal_losses_one_degree_floor():
    # Every regression term is 0, log(conf=1) is 0, the mask BCE at logits +-40 is ~1e-17; the normal
    # loss clamps angles to at least 1 degree, smoothed to (1 deg)^2 / (2 * 3 deg) per triangle, and
    # divides by 4 triangles x max(H, W) per pixel quad: weight 3 x (1 deg / 6) / 16 per view.
    views = random_views(4, batch=2, height=12, width=16, invalid_fraction=0.0)
    loss, details = loss_and_details(TRAIN, views, perfect_predictions(views))
    floor = 3 * math.radians(1) / 6 / 16
    assert loss == pytest.approx(4 * floor, abs=1e-5)  # float rounding leaves gradient matching at ~1e-7
    assert details[f"{NAME}_normal_avg"] == pytest.approx(floor, rel=1e-4)
    assert details[f"{NAME}_gradient_matching_avg"] < 1e-6
    assert not any(key.startswith(f"{NAME}_pts3d_view") for key in details)  # exactly-zero terms are left out


def test_the_floor_counts_only_triangles_of_valid_pixels():
    views = random_views(2, batch=1, height=6, width=8, invalid_fraction=0.3, seed=3)
    _, details = loss_and_details(TRAIN, views, perfect_predictions(views))
    for index, view in enumerate(views):
        valid = view["valid_mask"][0]
        corners = [valid[:-1, :-1], valid[:-1, 1:], valid[1:, :-1], valid[1:, 1:]]
        triangles = [a & b & c for a, b, c in ((corners[1], corners[2], corners[3]), (corners[0], corners[3], corners[1]),
                                               (corners[2], corners[1], corners[0]), (corners[3], corners[0], corners[2]))]
        quads = int((triangles[0] | triangles[1] | triangles[2] | triangles[3]).sum())  # with a valid triangle
        triangles = sum(int(t.sum()) for t in triangles)
        expected = 3 * triangles * math.radians(1) / 6 / (quads * 4 * 8)
        assert details[f"{NAME}_normal_view{index + 1}"] == pytest.approx(expected, rel=1e-4)


def scaled(items, factor, keys):
    out = [dict(item) for item in items]
    for item in out:
        for key in keys:
            item[key] = item[key] * factor
        if "camera_pose" in item:
            item["camera_pose"] = item["camera_pose"].clone()
            item["camera_pose"][:, :3, 3] *= factor
    return out


SCENE_KEYS = ("pts3d", "pts3d_cam", "depth_along_ray", "depthmap", "camera_pose_trans")
PRED_KEYS = ("pts3d", "pts3d_cam", "depth_along_ray", "cam_trans")


@pytest.mark.parametrize("what", ["scene and prediction", "prediction only"])
def test_scaling_leaves_every_term_but_the_metric_scale_unchanged(what):
    views = random_views(3, batch=2, seed=5)
    preds = noisy_predictions(views)
    _, before = loss_and_details(TRAIN, views, preds)
    scaled_views = scaled(views, 7.3, SCENE_KEYS) if what == "scene and prediction" else views
    _, after = loss_and_details(TRAIN, scaled_views, scaled(preds, 7.3, PRED_KEYS))
    assert before.keys() == after.keys()
    for key, value in before.items():
        if key != f"{NAME}_scale":
            assert after[key] == pytest.approx(value, rel=1e-4, abs=1e-6), key
    assert after[f"{NAME}_scale"] != pytest.approx(before[f"{NAME}_scale"], rel=1e-3)


def test_invalid_pixels_contribute_nothing_and_get_no_gradient():
    views = random_views(3, batch=2, seed=7, invalid_fraction=0.3)
    preds = noisy_predictions(views)
    disturbed = []
    for view, pred in zip(views, preds):
        invalid = ~view["valid_mask"]
        pred = dict(pred)
        for key in ("pts3d", "pts3d_cam", "depth_along_ray"):  # MapAnything masks these; rays and mask logits not
            pred[key] = torch.where(invalid[..., None], pred[key] * 50 + 3, pred[key])
        pred["conf"] = torch.where(invalid, 1000.0, pred["conf"])
        disturbed.append(pred)
    loss, details = loss_and_details(TRAIN, views, preds)
    loss2, details2 = loss_and_details(TRAIN, views, disturbed)
    assert loss2 == pytest.approx(loss, rel=1e-6) and details2 == pytest.approx(details, rel=1e-6)
    leaves = [{k: v.clone().requires_grad_(True) for k, v in pred.items()} for pred in disturbed]
    BatchedCriterion(TRAIN)(views, leaves)[0].backward()
    for view, leaf in zip(views, leaves):
        invalid = ~view["valid_mask"]
        assert leaf["pts3d"].grad[invalid].abs().max() == 0 and leaf["conf"].grad[invalid].abs().max() == 0
        assert leaf["pts3d"].grad[~invalid].abs().max() > 0


def test_a_view_without_valid_pixels_drops_out_of_its_terms_and_averages():
    views = random_views(3, batch=1, seed=2, invalid_views=(1,))
    loss, details = loss_and_details(TRAIN, views, noisy_predictions(views))
    assert math.isfinite(loss)
    assert f"{NAME}_pts3d_conf_loss_view2" not in details and f"{NAME}_pts3d_conf_loss_view3" in details
    assert f"{NAME}_pose_trans_view2" not in details and f"{NAME}_ray_directions_view2" in details
    avg = details[f"{NAME}_pts3d_conf_loss_avg"]
    assert avg == pytest.approx((details[f"{NAME}_pts3d_conf_loss_view1"] + details[f"{NAME}_pts3d_conf_loss_view3"]) / 2)


@pytest.mark.parametrize("spec", [TRAIN, TEST], ids=["train", "test"])
def test_the_compiled_row_by_row_sums_compute_the_same_loss_details_and_gradients(spec, monkeypatch):
    # Compiled, every sum over pixels runs row by row and the factors are spread over the rows (for
    # the GPU's sake); run that formulation eagerly and compare it with the one-reduction sums.
    from mapanything_ext.losses.loss_selfcheck import as_dtype, loss_details_gradients

    views = as_dtype(random_views(4, batch=2, seed=5, invalid_views=(2,), metric=[True, False],
                                  synthetic=[True, False]), torch.float64)
    preds = as_dtype(noisy_predictions(views, seed=3), torch.float64)
    criterion = BatchedCriterion(spec)
    one_reduction = loss_details_gradients(criterion.compute, views, preds)
    monkeypatch.setattr(batched_loss, "_compiling", lambda: True)
    row_by_row = loss_details_gradients(criterion.compute, views, preds)
    # float64, but the mask's BCE runs in float32 as MapAnything's does (its target is cast to float).
    assert row_by_row[0] == pytest.approx(one_reduction[0], rel=1e-8)
    assert row_by_row[1].keys() == one_reduction[1].keys()
    for key, value in one_reduction[1].items():
        assert row_by_row[1][key] == pytest.approx(value, rel=1e-6 if key.startswith("NonAmbiguous") else 1e-12), key
    for key, grad in one_reduction[2].items():
        torch.testing.assert_close(row_by_row[2][key], grad, rtol=1e-6 if "mask" in key[1] else 1e-10, atol=1e-14)
    assert any(grad.abs().max() > 0 for key, grad in one_reduction[2].items() if key[1] == "metric_scaling_factor")


@pytest.mark.slow
def test_inductors_symbolic_view_count_kernels_compute_the_eager_loss_details_and_gradients():
    """The graphs Stage 3 trains with: Inductor's kernels with the view count and batch size symbolic
    (marked dynamic from the first shape) and with a batch of one, each against the eager criterion."""
    from mapanything_ext.losses.loss_selfcheck import loss_details_gradients

    torch._dynamo.reset()
    criterion = BatchedCriterion(TRAIN, compile=True)
    for views_count, batch in ((4, 2), (6, 2), (3, 3), (7, 1)):
        views = random_views(views_count, batch=batch, seed=views_count, metric=[True] + [False] * (batch - 1))
        preds = noisy_predictions(views, seed=views_count)
        compiled = loss_details_gradients(criterion, views, preds)
        eager = loss_details_gradients(criterion.compute, views, preds)
        assert compiled[0] == pytest.approx(eager[0], rel=1e-5), (views_count, batch)
        assert compiled[1].keys() == eager[1].keys()
        for key, value in eager[1].items():
            assert compiled[1][key] == pytest.approx(value, rel=1e-4, abs=1e-6), (views_count, batch, key)
        for key, grad in eager[2].items():
            torch.testing.assert_close(compiled[2][key], grad, rtol=1e-3, atol=1e-6, msg=f"{views_count}x{batch} {key}")
    assert criterion._eager_shapes == set()


def test_ground_truth_poses_in_view0_agree_with_matrix_algebra():
    views = random_views(4, batch=2, seed=11)
    quats, trans = batched_loss._poses_in_view0(batched_loss.stacked(views, batched_loss.VIEW_KEYS))
    from mapanything_ext.geometry.rotations import quaternion_to_matrix

    inverse0 = torch.linalg.inv(views[0]["camera_pose"])
    for index, view in enumerate(views):
        relative = inverse0 @ view["camera_pose"]
        torch.testing.assert_close(quaternion_to_matrix(quats[index]), relative[:, :3, :3], atol=1e-5, rtol=0)
        torch.testing.assert_close(trans[index], relative[:, :3, 3], atol=1e-4, rtol=0)
    assert torch.equal(quats[0], torch.tensor([[0.0, 0, 0, 1]] * 2))


def test_details_are_read_back_once():
    views = random_views(2, seed=1)
    _, details = BatchedCriterion(TRAIN)(views, noisy_predictions(views))
    assert details._read is None
    assert f"{NAME}_cam_pts3d_bot95%_loss_avg" in details and details._read is not None
    assert details["NonAmbiguousMaskLoss_mask_avg"] == pytest.approx(
        (details["NonAmbiguousMaskLoss_mask_view1"] + details["NonAmbiguousMaskLoss_mask_view2"]) / 2)


def test_confidence_on_an_unmasked_set_is_refused():
    with pytest.raises(ValueError, match="ray_directions"):
        BatchedCriterion(LossSpec(conf_sets=(3,)))


def fork_of(spec: LossSpec) -> BatchedCriterion:
    """Stands in for a MapAnything fork whose loss differs from v1.1 (here: another confidence alpha)."""
    return BatchedCriterion(LossSpec(conf_alpha=spec.conf_alpha * 2))


def test_auto_falls_back_to_the_reference_and_names_the_term_that_differs():
    views = random_views(2, seed=4)
    preds = noisy_predictions(views)
    chosen = ChosenCriterion("train", "auto", fork_of(TRAIN), BatchedCriterion(TRAIN))
    line = chosen.self_check(views, preds)
    assert not chosen.use_batched and "DISAGREED" in line and "conf_loss_view1" in line
    agreeing = ChosenCriterion("train", "auto", BatchedCriterion(TRAIN), BatchedCriterion(TRAIN))
    assert "agreed" in agreeing.self_check(views, preds) and agreeing.use_batched


def test_batched_stops_the_job_on_a_mismatch_and_one_rank_decides_for_all():
    views = random_views(2, seed=4)
    preds = noisy_predictions(views)
    with pytest.raises(LossMismatch, match="loss.impl=reference"):
        ChosenCriterion("train", "batched", fork_of(TRAIN), BatchedCriterion(TRAIN)).self_check(views, preds)
    chosen = ChosenCriterion("train", "auto", BatchedCriterion(TRAIN), BatchedCriterion(TRAIN))
    chosen.self_check(views, preds, everyone_agrees=lambda ok: False)  # another rank disagreed
    assert not chosen.use_batched


def test_loss_impl_is_checked():
    with pytest.raises(ValueError, match="choose one of auto, batched, reference"):
        ChosenCriterion("train", "fast", BatchedCriterion(TRAIN), None)
    with pytest.raises(ValueError, match="cannot compute this train criterion: because"):
        ChosenCriterion("train", "batched", BatchedCriterion(TRAIN), None, "because")


# ---- equality with MapAnything's own criterion ------------------------------------------------------

needs_mapanything = pytest.mark.skipif(importlib.util.find_spec("mapanything") is None,
                                       reason="MapAnything not installed (optional; docs/mapanything.md says how)")

CASES = {
    "plain": {},
    "invalid view and pixels": {"invalid_views": (1,), "invalid_fraction": 0.4},
    "non-metric": {"metric": False},
    "real data": {"synthetic": False},
}


def reference_criteria(*overrides):
    from mapanything_ext.models.registry import build_criteria

    train, test = build_criteria(compose_training(["model=mapanything", "loss=overall_loss", *overrides]).loss)
    return train, test


@needs_mapanything
@pytest.mark.parametrize("n_views", [2, 4, 8, 12, 24])
@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("case", list(CASES))
def test_batched_equals_mapanythings_v1_1_criterion(n_views, batch, case):
    flags = dict(CASES[case])
    if batch == 2 and case != "plain":  # the two samples take different branches
        key = {"non-metric": "metric", "real data": "synthetic"}.get(case)
        if key:
            flags[key] = [True, False]
    views = random_views(n_views, batch=batch, height=18, width=24, seed=n_views * 10 + batch, **flags)
    preds = noisy_predictions(views, seed=n_views)
    for chosen in reference_criteria():
        assert chosen.batched is not None, chosen.why_not
        assert compare(chosen.reference, chosen.batched, views, preds, dtype=torch.float32) == []
        assert compare(chosen.reference, chosen.batched, views, preds, tolerance=1e-7) == []  # float64 (its mask BCE is float32)


@needs_mapanything
@pytest.mark.parametrize("variant", [
    "FactoredGeometryScaleRegr3DPlusNormalGMLoss(RobustRegressionLoss(alpha=0.5, scaling_c=0.05), norm_mode='avg_dis', "
    "depth_type_for_loss='depth_z', loss_in_log=True, flatten_across_image_only=True, compute_world_frame_points_loss=False, "
    "apply_normal_and_gm_loss_to_synthetic_data_only=False, normal_loss_weight=2.0, gm_loss_weight=0.5)",
    "FactoredGeometryScaleRegr3D(RobustRegressionLoss(alpha=1.0, scaling_c=0.1), norm_mode='avg_dis', loss_in_log=False, "
    "flatten_across_image_only=True, depth_loss_weight=2.0)",
])
def test_batched_equals_other_options_of_the_same_classes(variant):
    string = (f"ConfAndExcludeTopNPercentPixelLoss({variant}, conf_alpha=0.5, top_n_percent=10, apply_to_real_data_only=False, "
              f"conf_loss_set_indices=[1], exclude_loss_set_indices=[0]) + 0.7 * NonAmbiguousMaskLoss(BCELoss())")
    train, _ = reference_criteria(f'loss.train_criterion="{string}"')
    views = random_views(4, batch=2, height=18, width=24, seed=9, synthetic=[True, False], invalid_views=(2,))
    preds = noisy_predictions(views)
    assert compare(train.reference, train.batched, views, preds, dtype=torch.float32) == []
    assert compare(train.reference, train.batched, views, preds, tolerance=1e-7) == []


@needs_mapanything
def test_what_the_batched_criterion_does_not_implement_stays_with_the_reference():
    string = ("ConfLoss(FactoredGeometryScaleRegr3D(RobustRegressionLoss(alpha=0.5, scaling_c=0.05), "
              "flatten_across_image_only=True), alpha=0.2)")
    train, _ = reference_criteria(f'loss.train_criterion="{string}"')
    assert train.batched is None and "ConfLoss as the first term" in train.why_not
    with pytest.raises(ValueError, match="cannot compute this train criterion"):
        reference_criteria(f'loss.train_criterion="{string}"', "loss.impl=batched")


def test_a_view_count_whose_compile_fails_runs_eagerly_and_says_so(capsys):
    def failing_backend(graph, example_inputs):
        raise RuntimeError("scheduler assertion")

    views = random_views(3, seed=6)
    preds = noisy_predictions(views)
    criterion = BatchedCriterion(TRAIN)
    criterion._compiled = torch.compile(criterion.compute_stacked, backend=failing_backend)
    loss, details = criterion(views, preds)
    assert "compiling the batched criterion for 3 views of (1, 12, 16) failed" in capsys.readouterr().out
    eager_loss, eager_details = criterion.compute(views, preds)
    assert float(loss) == float(eager_loss) and dict(details) == dict(eager_details)
    criterion(views, preds)  # the shape is remembered: no second attempt, no second warning
    assert "failed" not in capsys.readouterr().out


def test_stage_3s_view_counts_and_batch_sizes_compile_2_graphs_and_one_past_the_limit_runs_eagerly(
        capsys, monkeypatch):
    """Stage 3 draws nine view counts with five batch sizes. Stacked before the compiled code, with
    the view and batch dimensions marked dynamic, they compile one graph with both symbolic and one
    for batch size 1 (a size Dynamo specializes): 2 graphs (one per shape before the views were
    stacked, 3 before they were marked), each shape computing the eager loss.
    Past SHAPE_LIMIT graphs a new shape runs eagerly and says so, not Dynamo's silent fallback."""
    compiles = []

    def counting_backend(graph, example_inputs):
        compiles.append(graph)
        return graph.forward

    torch._dynamo.reset()  # Dynamo's shape memory is per code object: other tests' shapes out
    criterion = BatchedCriterion(TRAIN)
    criterion._compiled = torch.compile(criterion.compute_stacked, backend=counting_backend)
    stage3 = [(2, 6), (4, 3), (3, 4), (5, 2), (6, 2), (7, 1), (8, 1), (9, 1), (10, 1)]
    for views_count, batch in stage3:
        views = random_views(views_count, batch=batch, seed=views_count)
        preds = noisy_predictions(views)
        loss, details = criterion(views, preds)
        eager_loss, eager_details = criterion.compute(views, preds)
        assert float(loss) == pytest.approx(float(eager_loss), rel=1e-6)
        assert dict(details).keys() == dict(eager_details).keys()
        assert f"{NAME}_pts3d_conf_loss_view{views_count}" in dict(details)
    graphs = len(compiles)
    assert graphs == 2, f"{graphs} graphs for {len(stage3)} shapes"
    assert "eagerly" not in capsys.readouterr().out and criterion._eager_shapes == set()
    monkeypatch.setattr(BatchedCriterion, "SHAPE_LIMIT", graphs)
    views = random_views(4, batch=2, height=8, width=10, seed=12)  # a new image size: a third graph
    criterion(views, noisy_predictions(views))
    out = capsys.readouterr().out
    assert "compiling the batched criterion for 4 views of (2, 8, 10)" in out and "runs eagerly" in out
    assert criterion._eager_shapes == {(4, (2, 8, 10))} and len(compiles) == graphs


@needs_mapanything
def test_the_preflight_runs_the_self_check_on_the_first_sample(synthetic_root, tmp_path):
    from mapanything_ext import preflight
    from tests.training_runs import tiny_overrides

    overrides = [o for o in tiny_overrides(synthetic_root, tmp_path / "out") if not o.startswith(("model", "loss"))]
    cfg = compose_training([*overrides, "model=mapanything", "loss=overall_loss", "dataset=opv2v_coop_ft"])
    lines, problems = preflight.loss_check(cfg)
    assert problems == [] and len(lines) == 2 and all("batched" in line and "agreed" in line for line in lines)


def test_the_quaternion_product_composes_rotations_as_their_matrices_do():
    from mapanything_ext.geometry.rotations import (
        quaternion_multiply,
        quaternion_to_matrix,
    )

    g = torch.Generator().manual_seed(3)
    a, b = torch.randn(2, 5, 4, generator=g)
    a, b = a / a.norm(dim=-1, keepdim=True), b / b.norm(dim=-1, keepdim=True)
    torch.testing.assert_close(quaternion_to_matrix(quaternion_multiply(a, b)),
                               quaternion_to_matrix(a) @ quaternion_to_matrix(b), atol=1e-6, rtol=0)
