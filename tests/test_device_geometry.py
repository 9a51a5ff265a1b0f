"""train_params.geometry_on_device: lean views from the loader, completed where the batch trains,
to the bit equal to the views the dataset computes itself; and the completed geometry checked
against independent projection."""

import numpy as np
import pytest
import torch
from torch.utils.data import default_collate

from mapanything_ext.datasets.device_geometry import DERIVED_KEYS, GEOMETRY_KEY, complete_view
from mapanything_ext.datasets.opv2v import OPV2VCoopDataset
from mapanything_ext.geometry.projection import project
from mapanything_ext.train.data import to_device
from tests.test_dataset_fast_path import OneView, awkward_view
from tests.training_runs import run_training, tiny_overrides


def both_ways(dataset, indices):
    """(full batch, lean batch) of the same samples."""
    dataset.geometry_on_device = False
    full = default_collate([dataset[i] for i in indices])
    dataset.geometry_on_device = True
    lean = default_collate([dataset[i] for i in indices])
    return full, lean


def assert_bitwise_equal(full, completed, where="batch") -> None:
    assert type(full) is type(completed), where
    if torch.is_tensor(full):
        assert full.dtype == completed.dtype and torch.equal(full, completed), where
    elif isinstance(full, dict):
        assert list(full) == list(completed), where  # same keys, same order
        for key, value in full.items():
            assert_bitwise_equal(value, completed[key], f"{where}.{key}")
    elif isinstance(full, (list, tuple)):
        assert len(full) == len(completed), where
        for i, (a, b) in enumerate(zip(full, completed)):
            assert_bitwise_equal(a, b, f"{where}[{i}]")
    else:
        assert full == completed, where


@pytest.mark.parametrize("resolution", [(518, 392), (98, 84)])
def test_a_completed_lean_view_is_the_full_view_to_the_bit(resolution):
    # Invalid depth of every kind, a random pose far from the origin, an awkward image.
    full, lean = both_ways(OneView(awkward_view(seed=resolution[0]), resolution), [0, 0])
    assert not set(DERIVED_KEYS) & set(lean[0]) and lean[0]["img"].dtype == torch.uint8
    size = {name: sum(v.numel() * v.element_size() for v in batch[0].values() if torch.is_tensor(v))
            for name, batch in (("full", full), ("lean", lean))}
    assert size["lean"] < 0.2 * size["full"]
    assert_bitwise_equal(full, to_device(lean, torch.device("cpu")))


def test_cooperative_batches_complete_to_the_same_views(synthetic_root):
    ds = OPV2VCoopDataset(synthetic_root / "opv2v", synthetic_root / "opv2v_depth", "train", (98, 84), seed=0,
                          num_views=12, min_num_views=4)
    full, lean = both_ways(ds, [0, 1])
    assert GEOMETRY_KEY in lean[1] and GEOMETRY_KEY not in full[1]
    assert_bitwise_equal(full, [complete_view(view) for view in lean])


def test_completed_points_project_back_to_their_pixels_at_their_depth():
    """Independent geometry: each valid point, projected by its own camera, lands on its pixel
    centre at its depth; in another view's camera it lands where that camera's own math puts it."""
    ds = OneView(awkward_view(seed=3), (98, 84))
    ds.geometry_on_device = True
    view = to_device(default_collate([ds[0]]), torch.device("cpu"))[0]
    valid = view["valid_mask"][0].numpy()
    points = view["pts3d"][0].numpy().astype(np.float64)[valid]
    intrinsics, pose = view["camera_intrinsics"][0].double().numpy(), view["camera_pose"][0].double().numpy()
    pixels, depth = project(points, intrinsics, pose)
    v, u = np.nonzero(valid)
    np.testing.assert_allclose(pixels, np.stack([u, v], axis=-1).astype(np.float64), atol=2e-3)
    # float32 world points some 30 m from the origin: about 2e-6 m of rounding
    np.testing.assert_allclose(depth, view["depthmap"][0, ..., 0].numpy()[valid], rtol=1e-6, atol=1e-5)
    rays = view["ray_directions_cam"][0].numpy()[valid]
    np.testing.assert_allclose(np.linalg.norm(rays, axis=-1), 1.0, atol=1e-6)
    np.testing.assert_allclose(view["depth_along_ray"][0, ..., 0].numpy()[valid],
                               np.linalg.norm(view["pts3d_cam"][0].numpy()[valid], axis=-1), rtol=1e-6)


@pytest.mark.slow
def test_training_with_lean_views_ends_with_the_same_weights(synthetic_root, tmp_path):
    weights = []
    for on_device in ("true", "false"):
        out = tmp_path / f"geometry_on_device_{on_device}"
        proc = run_training(tiny_overrides(synthetic_root, out, "train_params.epochs=1",
                                           "train_params.max_num_of_imgs_per_gpu=4",
                                           f"train_params.geometry_on_device={on_device}"))
        assert proc.returncode == 0, proc.stderr[-3000:]
        weights.append(torch.load(out / "checkpoint-final.pth", weights_only=True)["model"])
    for key, value in weights[0].items():
        assert torch.equal(value, weights[1][key]), key
