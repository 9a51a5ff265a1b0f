"""Pose metrics as published tables define them (evaluation/pose_metrics.py), pinned on hand-made cases."""

import math

import pytest
import torch

from mapanything_ext.evaluation import pose_metrics as pm


def pose(yaw_deg=0.0, t=(0.0, 0.0, 0.0)):
    out = torch.eye(4, dtype=torch.float64)
    a = math.radians(yaw_deg)
    out[:2, :2] = torch.tensor([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]], dtype=torch.float64)
    out[:3, 3] = torch.tensor(t, dtype=torch.float64)
    return out


GT = [pose(0, (0, 0, 0)), pose(30, (2, 0, 0)), pose(-20, (0, 3, 1)), pose(90, (5, 5, 0))]
VEHICLES = ["641", "641", "659", "659"]


def test_a_perfect_prediction_scores_exactly_perfect():
    pairs = pm.pair_errors(GT, GT, VEHICLES)
    assert len(pairs) == 6 and all(p["rotation_deg"] == 0.0 and p["translation_deg"] == 0.0 for p in pairs)
    result = pm.pooled(pairs)
    assert result["auc_30"] == result["auc_5"] == result["rra_5"] == result["rta_5"] == 1.0
    assert (result["pose_pairs_intra"], result["pose_pairs_cross"]) == (2, 4)
    centres = torch.stack([p[:3, 3] for p in GT])
    assert pm.ate_m(centres, centres) < 1e-12


def test_the_frame_and_scale_of_the_prediction_do_not_count():
    """Poses given in another frame (the predicted first view's) and another scale: relative rotations,
    translation directions and ATE after similarity alignment see no error."""
    frame = pose(47, (10, -3, 2))
    scaled = []
    for p in GT:
        q = frame @ p
        q[:3, 3] *= 2.5
        scaled.append(q)
    # scaling every position by 2.5 about the origin keeps relative rotations; directions stay too
    pairs = pm.pair_errors(scaled, GT, VEHICLES)
    assert max(p["rotation_deg"] for p in pairs) < 1e-9 and max(p["translation_deg"] for p in pairs) < 1e-6
    centres = torch.stack([p[:3, 3] for p in GT])
    assert pm.ate_m(torch.stack([p[:3, 3] for p in scaled]), centres) < 1e-9


def test_a_known_rotation_error_gives_known_accuracies_and_auc():
    predicted = [GT[0], GT[1] @ pose(10.0)]  # the second camera turned 10 degrees about its z axis
    pairs = pm.pair_errors(predicted, GT[:2], VEHICLES[:2])
    assert pairs[0]["rotation_deg"] == pytest.approx(10.0, rel=1e-12)
    result = pm.pooled(pairs)
    assert (result["rra_5"], result["rra_15"], result["rra_30"]) == (0.0, 1.0, 1.0)
    assert result["auc_5"] == 0.0
    # thresholds 1..30 deg: the larger error (10 deg) is below 11..30 of them
    assert result["auc_30"] == pytest.approx(20 / 30)


def test_a_translation_direction_is_known_up_to_its_sign():
    x, y = torch.tensor([1.0, 0.0, 0.0]), torch.tensor([0.0, 1.0, 0.0])
    assert pm.translation_direction_deg(x, -x) == 0.0
    assert pm.translation_direction_deg(x, y) == pytest.approx(90.0)
    assert pm.translation_direction_deg(x, torch.tensor([1.0, 1.0, 0.0])) == pytest.approx(45.0)
    assert pm.translation_direction_deg(x, torch.tensor([-1.0, 1.0, 0.0])) == pytest.approx(45.0)
    assert math.isnan(pm.translation_direction_deg(x, torch.zeros(3)))


def test_ate_is_the_rms_of_what_no_similarity_can_explain():
    centres = torch.tensor([[0.0, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1]], dtype=torch.float64)
    moved = centres.clone()
    moved[3, 2] += 0.4  # one camera off by 0.4 m: the best similarity absorbs part of it
    error = pm.ate_m(moved, centres)
    assert 0.0 < error < 0.4 / math.sqrt(4) + 1e-9
    assert math.isnan(pm.ate_m(centres[:1], centres[:1]))


def test_pairs_are_split_into_one_rig_and_across_vehicles():
    predicted = [GT[0], GT[1], GT[2] @ pose(20.0), GT[3] @ pose(20.0)]  # the second vehicle's cameras turned
    result = pm.pooled(pm.pair_errors(predicted, GT, VEHICLES))
    # inside each rig the relative rotations hold; across vehicles every pair is off by 20 degrees
    assert (result["rra_5_intra"], result["rra_5_cross"], result["rra_30_cross"]) == (1.0, 0.0, 1.0)
