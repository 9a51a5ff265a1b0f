"""MapAnything's data options: aspect ratios, the crop zoom (aug_crop), colour transforms and a view
count drawn per batch; geometry checked by reprojection, randomness by epoch and resume."""

import numpy as np
import pytest
from PIL import Image

from mapanything_ext.datasets.augment import apply_transform, gaussian_blur, shift_hue
from mapanything_ext.datasets.opv2v import OPV2VCoopDataset, OPV2VDataset
from mapanything_ext.train.data import build_loader
from mapanything_ext.train_params import TrainParams
from tests.reprojection import reprojection_stats

RESOLUTIONS = [[154, 112], [154, 56], [112, 154]]


def coop(root, **kw):
    args = dict(root=root / "opv2v", depth_root=root / "opv2v_depth", split="train", resolution=RESOLUTIONS, seed=0,
                num_views=12, min_num_views=4)
    return OPV2VCoopDataset(**{**args, **kw})


def by_instance(views):
    return {v["instance"].split("/", 1)[1]: v for v in views}


@pytest.mark.parametrize("resolution_index", [0, 1, 2])
def test_a_zoomed_crop_at_every_aspect_ratio_still_reprojects_depth_between_vehicles(synthetic_root,
                                                                                      resolution_index):
    dataset = coop(synthetic_root, aug_crop=16, transform="colorjitter+grayscale+gaublur")
    views = by_instance(dataset.get(0, resolution_index=resolution_index))
    frame = next(iter(views)).split("/")[1]
    a, b = views[f"668/{frame}/camera0"], views[f"659/{frame}/camera0"]
    width, height = RESOLUTIONS[resolution_index]
    assert a["img"].shape == (3, height, width) and a["depthmap"].shape == (height, width, 1)
    stats = reprojection_stats(a["depthmap"][..., 0], a["camera_intrinsics"], a["camera_pose"],
                               b["depthmap"][..., 0], b["camera_intrinsics"], b["camera_pose"])
    assert stats["covisible_fraction"] > 0.4 and stats["median_rel_error"] < 0.01, stats


def test_the_zoom_is_drawn_per_view_and_only_zooms_in(synthetic_root):
    plain = coop(synthetic_root)[0]
    zoomed = coop(synthetic_root, aug_crop=16)[0]
    assert [v["instance"] for v in plain] == [v["instance"] for v in zoomed]  # the same views are chosen
    focal = [v["camera_intrinsics"][0, 0] / p["camera_intrinsics"][0, 0] for v, p in zip(zoomed, plain)]
    assert min(focal) >= 1.0 and len(set(np.round(focal, 6))) > 2, focal  # in, by different amounts
    for view in zoomed:  # the principal point stays at the image centre (a centred crop, whole pixels)
        assert np.allclose(view["camera_intrinsics"][:2, 2], [154 / 2, 112 / 2], atol=1.0)


def test_augmentation_is_new_every_epoch_and_the_same_when_an_epoch_is_read_again(synthetic_root):
    dataset = coop(synthetic_root, aug_crop=16, transform="colorjitter")
    first = [v["img"] for v in dataset[0]]
    assert all((a == b).all() for a, b in zip(first, [v["img"] for v in dataset[0]]))
    dataset.set_epoch(1)
    other = [v["img"] for v in dataset[0]]
    assert not all((a == b).all() for a, b in zip(first, other))
    dataset.set_epoch(0)
    assert all((a == b).all() for a, b in zip(first, [v["img"] for v in dataset[0]]))


def test_the_template_transform_changes_colours_only_sometimes():
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (24, 32, 3), dtype=np.uint8))
    changed = [apply_transform("colorjitter+grayscale+gaublur", image, np.random.default_rng(seed)) != image
               for seed in range(400)]
    assert 0.65 < np.mean(changed) < 0.85  # jitter p 0.75, grey and blur p 0.05 each
    assert apply_transform("imgnorm", image, np.random.default_rng(0)) is image
    with pytest.raises(ValueError, match="unknown transform 'jitter'"):
        OPV2VDataset(root=".", depth_root=".", transform="jitter")


def test_hue_shift_and_blur_are_torchvisions():
    functional = pytest.importorskip("torchvision.transforms.functional",
                                     reason="torchvision not installed (the MapAnything environment has it)")
    image = Image.fromarray(np.random.default_rng(1).integers(0, 256, (30, 40, 3), dtype=np.uint8))
    for turns in (-0.1, -0.03, 0.0, 0.04, 0.1):
        assert np.array_equal(np.asarray(shift_hue(image, turns)), np.asarray(functional.adjust_hue(image, turns)))
    for sigma in (0.1, 0.5, 1.0):
        ours = np.asarray(gaussian_blur(image, sigma), dtype=int)
        theirs = np.asarray(functional.gaussian_blur(image, [5, 5], [sigma, sigma]), dtype=int)
        assert np.abs(ours - theirs).max() <= 1, sigma


def test_a_batch_view_count_gives_that_many_views(synthetic_root):
    single = OPV2VDataset(synthetic_root / "opv2v", synthetic_root / "opv2v_depth", "train", (154, 112), seed=0,
                          variable_num_views=True)
    assert single.view_counts == [2, 3, 4]
    two = single[(0, 0, 2)]
    cameras = [v["instance"].rsplit("camera", 1)[1] for v in two]
    assert len(two) == 2 and cameras == sorted(set(cameras))  # a subset of the 4 cameras, in camera order
    assert len(single[0]) == 4  # a plain index: the configured count

    dataset = coop(synthetic_root, variable_num_views=True, num_views=16, resolution=(154, 112))
    assert dataset.view_counts == list(range(2, 17))
    main = dataset[(0, 0, 3)]
    assert [v["instance"].split("/")[-1] for v in main] == ["camera0", "camera1", "camera2"]
    filled = dataset[(0, 0, 16)]  # 3 vehicles: 12 views, 4 of them repeated
    assert len(filled) == 16 and len({v["instance"] for v in filled}) == 12 and dataset.filled_samples == 1


def test_the_training_loader_gives_batches_of_the_drawn_resolution_and_view_count(synthetic_root):
    dataset = OPV2VDataset(synthetic_root / "opv2v", synthetic_root / "opv2v_depth", "train", RESOLUTIONS, seed=0,
                           variable_num_views=True, aug_crop=16, transform="colorjitter+grayscale+gaublur")
    params = TrainParams(max_num_of_imgs_per_gpu=8)
    loader = build_loader(dataset, params, train=True, rank=0, world_size=1, num_workers=0)
    shapes = set()
    for epoch in range(4):
        loader.batch_sampler.set_epoch(epoch)
        for batch, items in zip(loader, loader.batch_sampler._global_batches()):
            _, resolution_index, count = items[0]
            width, height = RESOLUTIONS[resolution_index]
            assert len(batch) == count and len(items) == max(1, 8 // count)
            assert all(view["img"].shape == (len(items), 3, height, width) for view in batch)
            shapes.add((count, resolution_index))
    assert len(shapes) > 2, shapes
    with pytest.raises(ValueError, match="need train_params.batching=mapanything"):
        build_loader(dataset, TrainParams(max_num_of_imgs_per_gpu=8, batching="by_view_count"), True, 0, 1, 0)
