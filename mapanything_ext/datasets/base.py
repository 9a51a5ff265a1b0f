"""What every multi-view dataset shares: view-count policy, resize/crop, augmentation, the view dict.

A subclass lists its samples and returns, for a sample, a list of RawView (image,
z-depth, intrinsics, cam2world in the sample's right-handed frame, bookkeeping). This
class turns them into MapAnything's ground-truth contract (shared/specs/mapanything.md):
resized and centre-cropped to the resolution with intrinsics updated (aug_crop: a random
zoom), colours augmented (transform), points, rays and masks derived from depth +
intrinsics + pose, image normalised for the encoder (datasets/augment.py says how).

What to load (MapAnything's dataset options; the training sampler draws them per batch)
  resolution          [width, height], or a list of them: MapAnything's aspect ratios. An
                      item (index, resolution_index, num_views) picks one; a plain index
                      takes the first.
  variable_num_views  True: each training batch asks for a view count drawn in 2..num_views
                      (`view_counts`); a sample gives exactly that many views, a sample with
                      fewer repeating some of its own (seeded, counted), as MapAnything's
                      datasets do for scenes short of views.

View-count policy
  allow_variable_view_count=False  a sample must have exactly num_views views; anything
                                   else is an error that names the sample.
  allow_variable_view_count=True   a sample may have min_num_views_allowed..num_views
                                   views. Subclasses leave out samples that cannot reach the
                                   minimum when they build their index (counted and printed).
                                   A sample that still comes up short when loaded is replaced
                                   by the next index (deterministic), at most 10 times, and
                                   each replacement is printed with a running count: a worker
                                   never crashes on one bad sample.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from mapanything_ext.console import say
from mapanything_ext.datasets.augment import apply_transform, check_transform, crop_margin
from mapanything_ext.datasets.device_geometry import GEOMETRY_KEY, pack_cameras
from mapanything_ext.datasets.image_norm import normalise_image
from mapanything_ext.geometry.projection import pixel_rays, resize_crop_intrinsics
from mapanything_ext.geometry.rotations import matrix_to_quaternion

_MAX_REPLACEMENTS = 10
_AUGMENT_STREAM = 1  # the last word of the augmentation generator's seed (datasets/augment.py)


# Each view says how many unreadable samples were skipped to give it (on_bad_sample=skip).
BAD_SAMPLES_KEY = "bad_samples_skipped"


class BadSampleError(ValueError):
    """A sample's files exist but cannot be used (wrong image size, broken frame YAML, bad depth)."""


class ViewCountError(ValueError):
    """A sample has a number of views outside what the dataset is configured for."""


@dataclass
class RawView:
    image: Image.Image  # RGB
    depth: np.ndarray  # (H, W) float32 z-depth in metres, 0 = invalid
    intrinsics: np.ndarray  # 3x3, pixels of `image`
    cam2world: np.ndarray  # 4x4, OpenCV camera axes, right-handed sample frame
    label: str
    instance: str
    is_synthetic: bool


class BaseMultiViewDataset(Dataset):
    dataset_name = "multiview"
    # True: views leave the loader lean and device_geometry.complete_view derives their per-pixel
    # geometry where the batch trains (train_params.geometry_on_device; the engine sets it).
    geometry_on_device = False

    def __init__(self, num_views: int, resolution=(518, 392), seed: int | None = None,
                 allow_variable_view_count: bool = False, min_num_views_allowed: int | None = None,
                 max_depth_m: float = 250.0, variable_num_views: bool = False, transform: str = "imgnorm",
                 aug_crop: int = 0, on_bad_sample: str = "error"):
        self.num_views = int(num_views)
        self.resolutions = parse_resolutions(resolution)
        # MapAnything's variable_num_views: the counts a training batch may ask for (None: num_views always)
        self.view_counts = list(range(2, self.num_views + 1)) if variable_num_views and self.num_views > 2 else None
        self.transform = check_transform(transform)
        self.aug_crop = int(aug_crop)
        if on_bad_sample not in ("error", "skip"):
            raise ValueError(f"on_bad_sample={on_bad_sample!r}: error (stop at a sample that cannot be read) or skip")
        self.on_bad_sample = on_bad_sample
        self.bad_samples = 0  # skipped in this process (on_bad_sample=skip)
        if self.aug_crop < 0:
            raise ValueError(f"aug_crop={aug_crop}: it must be 0 (off) or a positive number of pixels")
        self.seed = 0 if seed is None else int(seed)
        self.allow_variable_view_count = bool(allow_variable_view_count)
        self.min_num_views_allowed = int(min_num_views_allowed or (1 if allow_variable_view_count else num_views))
        self.max_depth_m = float(max_depth_m)
        self.replaced_samples = 0
        self.filled_samples = 0  # samples short of a requested view count, topped up with repeated views
        self.epoch = 0  # the training set's random choices change with it (set_epoch); a test set stays at 0

    # -- subclass interface -------------------------------------------------------------
    def __len__(self) -> int:
        raise NotImplementedError

    def sample_name(self, index: int) -> str:
        raise NotImplementedError

    def load_raw_views(self, index: int, rng: np.random.Generator, num_views: int | None) -> list[RawView]:
        """The raw views of sample `index`: `num_views` of them where it has that many (None: as the
        dataset's view-count policy says)."""
        raise NotImplementedError

    # -- shared -------------------------------------------------------------------------
    def set_epoch(self, epoch: int) -> None:
        """New random choices (which cameras of the other vehicles, say) for every epoch, as
        MapAnything's training sets draw them; reproducible, so a resumed epoch draws the same."""
        self.epoch = int(epoch)

    def sample_rng(self, index: int, repetition: int = 0) -> np.random.Generator:
        """Randomness of one sample depends on (seed, index, epoch, repetition: its n-th appearance in an
        epoch of datasets/epoch_size.py) only: workers and resumes agree."""
        if self.epoch == 0 and repetition == 0:
            return np.random.default_rng([self.seed, index])
        return np.random.default_rng([self.seed, index, self.epoch, repetition])

    def augment_rng(self, index: int, repetition: int = 0) -> np.random.Generator:
        """The generator of a sample's crops, colours and repeated views: a stream apart from its view
        choice, so turning augmentation on or off changes no view choice."""
        return np.random.default_rng([self.seed, index, self.epoch, repetition, _AUGMENT_STREAM])

    def __getitem__(self, item):
        return self.get(*parse_item(item))

    def get(self, index: int, repetition: int = 0, resolution_index: int = 0,
            num_views: int | None = None) -> list[dict]:
        """The views of sample `index`, drawn for its `repetition`-th appearance in the epoch, at
        resolution `resolution_index`, `num_views` of them (None: the view-count policy's)."""
        resolution = self.resolutions[resolution_index]
        skipped = 0
        for attempt in range(_MAX_REPLACEMENTS + 1):
            candidate = (index + attempt) % len(self)
            try:
                raw = self.load_raw_views(candidate, self.sample_rng(candidate, repetition), num_views)
            except (OSError, BadSampleError) as err:  # a missing or unreadable file, a broken frame YAML
                if self.on_bad_sample != "skip":
                    raise
                skipped += 1
                self.bad_samples += 1
                say("dataset", f"skipping {self.sample_name(candidate)}: {err} (dataset.on_bad_sample=skip; "
                    f"{self.bad_samples} skipped in this process)", every_rank=True)
                continue
            if self._count_ok(len(raw), candidate, num_views):
                rng = self.augment_rng(candidate, repetition)
                raw = self._fill_to(raw, num_views, rng)
                return [self._finalize(view, candidate, i, resolution, rng, skipped) for i, view in enumerate(raw)]
            self.replaced_samples += 1
            say("dataset", f"{self.sample_name(candidate)} has {len(raw)} views, below "
                  f"min_num_views_allowed={self.min_num_views_allowed}: replaced by the next sample "
                  f"({self.replaced_samples} replaced so far in this process)")
        raise ViewCountError(f"{_MAX_REPLACEMENTS + 1} consecutive samples from index {index} are short of views")

    def _fill_to(self, raw: list[RawView], num_views: int | None, rng: np.random.Generator) -> list[RawView]:
        """`num_views` views: a sample with fewer repeats some of its own (MapAnything repeats views of a
        scene short of them), so that a batch of it and of fuller samples still stacks."""
        if num_views is None or len(raw) >= num_views:
            return raw
        self.filled_samples += 1
        if self.filled_samples in (1, 10, 100, 1000):
            say("dataset", f"a sample had {len(raw)} of the {num_views} views its batch asks for: some of its views "
                  f"repeat ({self.filled_samples} such samples so far in this process)")
        return raw + [raw[int(i)] for i in rng.integers(len(raw), size=num_views - len(raw))]

    def _count_ok(self, count: int, index: int, requested: int | None = None) -> bool:
        if requested is not None:  # the batch's view count; a short sample is filled up (_fill_to)
            if count > requested:
                raise ViewCountError(f"{self.sample_name(index)} gave {count} views for a batch of {requested}")
            return count >= min(self.min_num_views_allowed, requested)
        if not self.allow_variable_view_count:
            if count != self.num_views:
                raise ViewCountError(
                    f"{self.sample_name(index)} has {count} views but num_views={self.num_views} and "
                    f"allow_variable_view_count is off"
                )
            return True
        if count > self.num_views:
            raise ViewCountError(f"{self.sample_name(index)} has {count} views, more than num_views={self.num_views}")
        return count >= self.min_num_views_allowed

    def _finalize(self, raw: RawView, index: int, view_index: int, resolution: tuple[int, int],
                  rng: np.random.Generator, skipped: int = 0) -> dict:
        # The numbers of the plain float64 formulas (geometry.depth_to_points, pixel_rays, a norm;
        # tests/test_dataset_fast_path.py compares with a copy of them), computed faster: rays
        # cached per intrinsics, the image normalised through a 256-entry table, the rigid
        # transform written out per axis instead of a (H*W, 3) @ (3, 3) matmul.
        image, depth, intrinsics = self._resize_crop(raw, resolution, crop_margin(self.aug_crop, rng))
        image = apply_transform(self.transform, image, rng)
        valid = np.isfinite(depth) & (depth > 0) & (depth <= self.max_depth_m)
        invalid = ~valid
        depth[invalid] = 0.0  # a fresh array from _resize_crop
        pose = raw.cam2world
        view = self._view_without_geometry(raw, index, view_index, depth, valid, intrinsics)
        # Unreadable samples skipped to give this one (on_bad_sample=skip): the epoch loop counts them, as
        # the workers' own counts do not reach it. Here, so lean and full views keep one key order.
        view[BAD_SAMPLES_KEY] = skipped
        if self.geometry_on_device:  # device_geometry.complete_view derives the rest after the transfer
            view["img"] = torch.from_numpy(np.ascontiguousarray(np.asarray(image).transpose(2, 0, 1)))
            view[GEOMETRY_KEY] = pack_cameras(intrinsics, pose)
            return view
        height, width = depth.shape
        rays_z1, rays_unit = _pixel_rays_cached(intrinsics, height, width)
        pts_cam = rays_z1 * depth[..., None]  # float64, as geometry.depth_to_points
        pts_world = _rigid_transform_f32(pts_cam, pose)
        pts_world[invalid] = 0.0
        squares = pts_cam * pts_cam  # |pts_cam| summed in np.linalg.norm's order: (x^2 + y^2) + z^2
        depth_along_ray = squares[..., 0] + squares[..., 1]
        depth_along_ray += squares[..., 2]
        np.sqrt(depth_along_ray, out=depth_along_ray)
        view["img"] = torch.from_numpy(normalise_image(np.asarray(image)))
        view["pts3d"] = pts_world
        view["pts3d_cam"] = pts_cam.astype(np.float32)
        view["ray_directions_cam"] = rays_unit.copy()
        view["depth_along_ray"] = depth_along_ray[..., None].astype(np.float32)
        return view

    def _view_without_geometry(self, raw: RawView, index: int, view_index: int, depth: np.ndarray,
                               valid: np.ndarray, intrinsics: np.ndarray) -> dict:
        """The view's entries other than the image and the arrays derived from depth and camera."""
        pose = raw.cam2world
        return {
            "img": None,  # set by the caller: first, as in every view dict
            "data_norm_type": "dinov2",
            "true_shape": np.array(depth.shape, dtype=np.int32),
            "camera_intrinsics": intrinsics.astype(np.float32),
            "camera_pose": pose.astype(np.float32),
            "depthmap": depth[..., None],
            "valid_mask": valid,
            "non_ambiguous_mask": valid.copy(),  # invalid depth here is sky / beyond range
            "camera_pose_quats": matrix_to_quaternion(torch.from_numpy(pose[:3, :3])).numpy().astype(np.float32),
            "camera_pose_trans": pose[:3, 3].astype(np.float32),
            "is_metric_scale": True,
            "is_synthetic": raw.is_synthetic,
            "dataset": self.dataset_name,
            "label": raw.label,
            "instance": raw.instance,
            "idx": (index, view_index),
        }

    def _resize_crop(self, raw: RawView, resolution: tuple[int, int], margin: int = 0):
        """Scale so the target plus `margin` pixels on each side is covered, then centre-crop to the
        target; depth uses nearest neighbour.

        Image: Pillow's LANCZOS resize, then the crop. Depth: the pixels Pillow's NEAREST resize
        + crop would pick (their indices come from Pillow itself, cached per geometry), gathered
        in one pass: float32 values copied, never interpolated. Returns a fresh float32 depth."""
        width, height = resolution
        w0, h0 = raw.image.size
        scale = max((width + margin) / w0, (height + margin) / h0)
        new_w, new_h = max(width, round(w0 * scale)), max(height, round(h0 * scale))
        crop_x, crop_y = (new_w - width) // 2, (new_h - height) // 2
        box = (crop_x, crop_y, crop_x + width, crop_y + height)
        image = raw.image.resize((new_w, new_h), Image.Resampling.LANCZOS).crop(box)
        depth_h, depth_w = raw.depth.shape
        depth = np.take(np.ascontiguousarray(raw.depth, dtype=np.float32),
                        _nearest_source_index(depth_w, depth_h, new_w, new_h, box))
        intrinsics = resize_crop_intrinsics(raw.intrinsics, new_w / w0, new_h / h0, crop_x, crop_y)
        return image, depth, intrinsics


def parse_resolutions(resolution) -> list[tuple[int, int]]:
    """[width, height] or a list of them (MapAnything's aspect ratios) -> [(width, height), ...]."""
    pairs = [resolution] if len(resolution) == 2 and all(isinstance(v, (int, float)) for v in resolution) \
        else list(resolution)
    if not pairs:
        raise ValueError("resolution: give [width, height] or a list of [width, height] pairs")
    out = []
    for pair in pairs:
        if len(pair) != 2:
            raise ValueError(f"resolution {pair!r}: expected [width, height]")
        width, height = (int(v) for v in pair)
        if width % 14 or height % 14 or width <= 0 or height <= 0:
            raise ValueError(f"resolution {width}x{height}: both sides must be positive multiples of 14 (the patch "
                             f"size)")
        out.append((width, height))
    return out


def parse_item(item) -> tuple[int, int, int, int | None]:
    """(index, repetition, resolution_index, num_views) of a loader item: a plain index, or a training
    sampler's (index, resolution_index, num_views) with num_views None for the policy's count."""
    if isinstance(item, (tuple, list)):
        index, resolution_index, num_views = (list(item) + [0, None])[:3]
        return int(index), 0, int(resolution_index), None if num_views is None else int(num_views)
    return int(item), 0, 0, None


def _rigid_transform_f32(points: np.ndarray, pose: np.ndarray) -> np.ndarray:
    """float32(points @ R.T + t) for float64 points (..., 3), summed per axis in float64
    (R[i,0] x + R[i,1] y + R[i,2] z + t[i]); a BLAS matmul may round the last float64 bit
    differently, which float32 almost never sees (at most 1 float32 ulp)."""
    out = np.empty(points.shape, dtype=np.float32)
    x, y, z = points[..., 0], points[..., 1], points[..., 2]
    for i in range(3):
        acc = x * pose[i, 0]
        acc += y * pose[i, 1]
        acc += z * pose[i, 2]
        acc += pose[i, 3]
        out[..., i] = acc
    return out


@functools.lru_cache(maxsize=16)
def _nearest_source_index(src_w: int, src_h: int, new_w: int, new_h: int, box: tuple[int, int, int, int]) -> np.ndarray:
    """(box height, box width) flat source index of each pixel of Pillow's NEAREST resize to
    (new_w, new_h) cropped to box: Pillow resizes an image of pixel indices (int32, mode 'I')."""
    flat = np.arange(src_h * src_w, dtype=np.int32).reshape(src_h, src_w)
    index = np.asarray(Image.fromarray(flat).resize((new_w, new_h), Image.Resampling.NEAREST).crop(box))
    index = index.astype(np.intp)
    index.setflags(write=False)
    return index


_RAYS_CACHE: dict[tuple, tuple[np.ndarray, np.ndarray]] = {}


def _pixel_rays_cached(intrinsics: np.ndarray, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """(rays with z = 1 as float64, unit rays as float32), both (H, W, 3), computed once per
    intrinsics and size (OPV2V's cameras share one intrinsic matrix). Read-only: copy to modify."""
    key = (np.asarray(intrinsics, dtype=np.float64).tobytes(), height, width)
    cached = _RAYS_CACHE.get(key)
    if cached is None:
        rays = pixel_rays(intrinsics, height, width)
        unit = (rays / np.linalg.norm(rays, axis=-1, keepdims=True)).astype(np.float32)
        for array in (rays, unit):
            array.setflags(write=False)
        if len(_RAYS_CACHE) >= 16:
            _RAYS_CACHE.clear()
        cached = _RAYS_CACHE[key] = (rays, unit)
    return cached
