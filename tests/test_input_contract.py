"""The model sees images only: changing the ground truth in its input views changes no prediction."""

import pytest
import torch

from mapanything_ext.datasets.opv2v import OPV2VCoopDataset
from mapanything_ext.evaluation.predict import batch_of_one
from mapanything_ext.models.compact import CompactMapAnything
from mapanything_ext.models.input_contract import GroundTruthLeak, check_images_only, perturb_ground_truth


def coop_views(root):
    dataset = OPV2VCoopDataset(root / "opv2v", root / "opv2v_depth", split="train", resolution=(56, 42),
                               num_views=8, min_num_views=4)
    return batch_of_one(dataset[0], torch.device("cpu"))


def test_perturbation_changes_every_ground_truth_tensor_and_no_image(synthetic_root):
    views = coop_views(synthetic_root)
    changed = perturb_ground_truth(views)
    for before, after in zip(views, changed):
        assert torch.equal(before["img"], after["img"])
        for key in ("depthmap", "camera_pose", "camera_intrinsics", "pts3d", "ray_directions_cam",
                    "camera_pose_quats", "camera_pose_trans", "valid_mask", "is_metric_scale"):
            assert not torch.equal(before[key], after[key]), key
            assert torch.isfinite(after[key].float()).all(), key


def test_compact_model_reads_images_only(synthetic_root):
    torch.manual_seed(0)
    check_images_only(CompactMapAnything(dim=32, depth=1, num_heads=2), coop_views(synthetic_root))


class Peeking(CompactMapAnything):
    """A model that cheats: its depth follows the ground-truth depth of its inputs."""

    def forward(self, views):
        preds = super().forward(views)
        for view, pred in zip(views, preds):
            pred["depth_along_ray"] = pred["depth_along_ray"] + view["depthmap"].mean()
        return preds


def test_a_model_that_reads_ground_truth_is_caught(synthetic_root):
    torch.manual_seed(0)
    with pytest.raises(GroundTruthLeak, match="depth_along_ray \\(view 0\\)"):
        check_images_only(Peeking(dim=32, depth=1, num_heads=2), coop_views(synthetic_root))
