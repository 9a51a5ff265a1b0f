"""The loader's fast path gives the numbers of the plain path it replaced.

Fast path: PNGs decoded by OpenCV (Pillow as fallback), depth resized by gathering the pixels
Pillow's NEAREST resize picks, rays cached per intrinsics, the image normalised through a
lookup table, the rigid transform written out per axis, only the cameras a cooperative sample
keeps decoded, frame YAMLs parsed by libyaml. Tolerance: every array is bit-identical to the
plain formulas except pts3d, which may differ by 1 float32 ulp (a float64 matmul through BLAS
and a per-axis sum may round the last float64 bit differently).
"""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from mapanything_ext.datasets import opv2v, png_io
from mapanything_ext.datasets.base import BaseMultiViewDataset, RawView
from mapanything_ext.datasets.depth_codec import decode_depth, encode_depth_carla, encode_depth_heal8
from mapanything_ext.datasets.image_norm import IMAGENET_MEAN, IMAGENET_STD
from mapanything_ext.datasets.opv2v import NUM_CAMERAS, OPV2VCoopDataset, body_frame
from mapanything_ext.geometry.projection import depth_to_points, pixel_rays, resize_crop_intrinsics
from mapanything_ext.geometry.rotations import matrix_to_quaternion

OPV2V_K = np.array([[335.639852470912, 0, 400], [0, 335.639852470912, 300], [0, 0, 1]])


def plain_view(raw: RawView, resolution, max_depth_m=250.0) -> dict:
    """The per-view arrays as the loader computed them before the fast path (the reference)."""
    width, height = resolution
    w0, h0 = raw.image.size
    scale = max(width / w0, height / h0)
    new_w, new_h = max(width, round(w0 * scale)), max(height, round(h0 * scale))
    crop_x, crop_y = (new_w - width) // 2, (new_h - height) // 2
    box = (crop_x, crop_y, crop_x + width, crop_y + height)
    image = raw.image.resize((new_w, new_h), Image.Resampling.LANCZOS).crop(box)
    depth = np.asarray(Image.fromarray(raw.depth.astype(np.float32))
                       .resize((new_w, new_h), Image.Resampling.NEAREST).crop(box))
    intrinsics = resize_crop_intrinsics(raw.intrinsics, new_w / w0, new_h / h0, crop_x, crop_y)
    valid = np.isfinite(depth) & (depth > 0) & (depth <= max_depth_m)
    depth = np.where(valid, depth, 0.0).astype(np.float32)
    pts_cam = depth_to_points(depth, intrinsics)
    pose = raw.cam2world
    pts_world = pts_cam @ pose[:3, :3].T + pose[:3, 3]
    rays = pixel_rays(intrinsics, height, width)
    rays /= np.linalg.norm(rays, axis=-1, keepdims=True)
    img = (np.asarray(image, dtype=np.float32) / 255.0 - IMAGENET_MEAN) / IMAGENET_STD
    return {
        "img": np.ascontiguousarray(img.transpose(2, 0, 1)),
        "camera_intrinsics": intrinsics.astype(np.float32),
        "camera_pose": pose.astype(np.float32),
        "depthmap": depth[..., None],
        "pts3d": np.where(valid[..., None], pts_world, 0.0).astype(np.float32),
        "pts3d_cam": pts_cam.astype(np.float32),
        "ray_directions_cam": rays.astype(np.float32),
        "depth_along_ray": np.linalg.norm(pts_cam, axis=-1, keepdims=True).astype(np.float32),
        "valid_mask": valid,
        "camera_pose_quats": matrix_to_quaternion(torch.from_numpy(pose[:3, :3])).numpy().astype(np.float32),
    }


def assert_view_matches(view: dict, reference: dict) -> None:
    for key, expected in reference.items():
        got = view[key].numpy() if isinstance(view[key], torch.Tensor) else view[key]
        assert got.dtype == expected.dtype and got.shape == expected.shape, key
        if key == "pts3d":
            np.testing.assert_array_max_ulp(got, expected, maxulp=1)
        else:
            assert np.array_equal(got.view(np.uint8), expected.view(np.uint8)), f"{key} differs"  # bitwise
    assert np.array_equal(view["non_ambiguous_mask"], reference["valid_mask"])


class OneView(BaseMultiViewDataset):
    def __init__(self, raw, resolution):
        super().__init__(num_views=1, resolution=resolution)
        self.raw = raw

    def __len__(self):
        return 1

    def load_raw_views(self, index, rng, num_views=None):
        return [self.raw]


def awkward_view(seed: int) -> RawView:
    """An 800x600 view like OPV2V's, with every kind of invalid depth (0, NaN, inf, negative, too far)."""
    rng = np.random.default_rng(seed)
    smooth = np.kron(rng.integers(0, 256, (60, 80, 3)), np.ones((10, 10, 1)))
    image = np.clip(smooth + rng.normal(0, 20, smooth.shape), 0, 255).astype(np.uint8)
    depth = (rng.random((600, 800)) * 300).astype(np.float32)
    for bad, fraction in ((0.0, 0.1), (np.nan, 0.02), (np.inf, 0.02), (-3.0, 0.02)):
        depth[rng.random(depth.shape) < fraction] = bad
    rotation = np.linalg.qr(rng.normal(size=(3, 3)))[0]
    pose = np.eye(4)
    pose[:3, :3] = rotation * np.sign(np.linalg.det(rotation))
    pose[:3, 3] = rng.normal(0, 30, 3)
    return RawView(Image.fromarray(image), depth, OPV2V_K.copy(), pose, "l", "i", True)


@pytest.mark.parametrize("resolution", [(518, 392), (224, 168), (98, 84), (154, 112)])
def test_views_match_the_plain_formulas(resolution):
    raw = awkward_view(seed=resolution[0])
    assert_view_matches(OneView(raw, resolution)[0][0], plain_view(raw, resolution))


def test_views_of_the_synthetic_dataset_match_the_plain_formulas(synthetic_root):
    ds = OPV2VCoopDataset(synthetic_root / "opv2v", synthetic_root / "opv2v_depth", "train", (98, 84), seed=0,
                          num_views=12, min_num_views=4)
    raws = ds.load_raw_views(0, ds.sample_rng(0), None)
    for view, raw in zip(ds[0], raws):
        assert_view_matches(view, plain_view(raw, (98, 84)))


def _png_files(tmp_path):
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)
    depth = rng.random((30, 40)) * 300
    depth[:5] = 0
    files = {
        "rgb": Image.fromarray(rgb),
        "grey": Image.fromarray(rgb[..., 0]),
        "carla_depth": encode_depth_carla(depth),
        "heal8_depth": encode_depth_heal8(depth),
        "rgba": Image.fromarray(np.dstack([rgb, rgb[..., :1]])),
        "palette": Image.fromarray(rgb).convert("P"),
        "uint16": Image.fromarray((depth * 100).astype(np.uint16)),
    }
    paths = {}
    for name, image in files.items():
        paths[name] = tmp_path / f"{name}.png"
        image.save(paths[name])
    transparent = tmp_path / "rgb_trns.png"
    files["rgb"].save(transparent, transparency=(1, 2, 3))  # 8-bit RGB with a tRNS chunk
    paths["rgb_trns"] = transparent
    return paths


def test_opencv_and_pillow_decode_the_same_pixels(tmp_path, monkeypatch):
    pytest.importorskip("cv2")
    assert png_io.PNG_DECODER == "opencv"
    paths = _png_files(tmp_path)
    fast = {name: (png_io.read_png8(p), np.asarray(png_io.read_rgb(p)), decode_depth(p) if "depth" in name else None)
            for name, p in paths.items()}
    monkeypatch.setattr(png_io, "_cv2", None)
    for name, p in paths.items():
        (mode, array), rgb, depth = fast[name]
        slow_mode, slow_array = png_io.read_png8(p)
        with Image.open(p) as img:
            assert mode == slow_mode == img.mode, name
            assert np.array_equal(rgb, np.asarray(img.convert("RGB"))), name
        assert np.array_equal(array, slow_array), name
        if depth is not None:
            assert np.array_equal(depth.view(np.uint32), decode_depth(p).view(np.uint32)), name


def test_carla_depth_decodes_to_the_formula_bit_for_bit(tmp_path):
    rng = np.random.default_rng(1)
    rgb = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "d.png")
    wide = rgb.astype(np.int64)
    code = wide[..., 0] + 256 * wide[..., 1] + 65536 * wide[..., 2]
    expected = (1000.0 * code / (256**3 - 1)).astype(np.float32)
    assert np.array_equal(decode_depth(tmp_path / "d.png").view(np.uint32), expected.view(np.uint32))


def test_pillow_can_be_forced():
    code = "from mapanything_ext.datasets import png_io; print(png_io.PNG_DECODER)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "MAPANYTHING_EXT_PNG_DECODER": "pillow"})
    assert out.stdout.strip() == "pillow"


class AllCamerasCoop(OPV2VCoopDataset):
    """The cooperative view choice as it was: every camera of a vehicle read, the subset taken afterwards."""

    def load_raw_views(self, index, rng, num_views=None):
        scenario, frame, present = self.samples[index]
        main = self._choose_main_agent(present, rng)
        main_views, main_meta = self.index.raw_views(scenario, main, frame)
        reference = body_frame(main_meta)
        views = list(main_views)
        others = [present[i] for i in rng.permutation(len(present)) if present[i] != main]
        for cav in others:
            room = self.cap - len(views)
            if room <= 0:
                break
            cav_views, _ = self.index.raw_views(scenario, cav, frame, reference)
            if room < NUM_CAMERAS:
                cav_views = [cav_views[i] for i in sorted(rng.choice(NUM_CAMERAS, size=room, replace=False))]
            views.extend(cav_views)
        return views[:self.cap]


@pytest.mark.parametrize("kw", [{"num_views": 10}, {"num_views": 6, "main_agent_mode": "random"}, {"num_views": 3}])
def test_coop_reads_only_the_cameras_it_keeps_and_keeps_the_same(synthetic_root, monkeypatch, kw):
    args = dict(root=synthetic_root / "opv2v", depth_root=synthetic_root / "opv2v_depth", split="train",
                resolution=(56, 42), seed=3, min_num_views=3, **kw)
    fast, plain = OPV2VCoopDataset(**args), AllCamerasCoop(**args)
    reads = []
    monkeypatch.setattr(opv2v, "read_rgb", lambda path: reads.append(path) or png_io.read_rgb(path))
    for i in range(len(fast)):
        reads.clear()
        views = fast[i]
        assert len(reads) == len(views) == fast.num_views_of(i)
        expected = plain[i]
        assert [v["instance"] for v in views] == [v["instance"] for v in expected]
        for a, b in zip(views, expected):
            assert np.array_equal(a["img"], b["img"]) and np.array_equal(a["pts3d"], b["pts3d"])


def test_libyaml_and_python_yaml_read_frames_alike(synthetic_root):
    files = sorted((synthetic_root / "opv2v" / "train").glob("*/*/*.yaml"))[:3]
    real = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "real_samples"
    files += sorted(real.glob("v2xset_*/*/*.yaml"))
    for path in files:
        text = path.read_text()
        assert yaml.load(text, Loader=opv2v._YAML_LOADER) == yaml.safe_load(text), path
