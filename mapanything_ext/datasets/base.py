"""What every multi-view dataset shares: view-count policy, resize/crop, the view dict.

A subclass lists its samples and returns, for a sample, a list of RawView (image,
z-depth, intrinsics, cam2world in the sample's right-handed frame, bookkeeping). This
class turns them into MapAnything's ground-truth contract (shared/specs/mapanything.md):
resized and centre-cropped to `resolution` with intrinsics updated, points, rays and
masks derived from depth + intrinsics + pose, image normalised for the encoder.

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

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from mapanything_ext.geometry import depth_to_points, pixel_rays, resize_crop_intrinsics
from mapanything_ext.rotations import matrix_to_quaternion

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)
_MAX_REPLACEMENTS = 10


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

    def __init__(self, num_views: int, resolution=(518, 392), seed: int | None = None,
                 allow_variable_view_count: bool = False, min_num_views_allowed: int | None = None,
                 max_depth_m: float = 250.0):
        width, height = (int(v) for v in resolution)
        if width % 14 or height % 14:
            raise ValueError(f"resolution {width}x{height}: both sides must be multiples of 14 (the patch size)")
        self.num_views = int(num_views)
        self.resolution = (width, height)
        self.seed = 0 if seed is None else int(seed)
        self.allow_variable_view_count = bool(allow_variable_view_count)
        self.min_num_views_allowed = int(min_num_views_allowed or (1 if allow_variable_view_count else num_views))
        self.max_depth_m = float(max_depth_m)
        self.replaced_samples = 0

    # -- subclass interface -------------------------------------------------------------
    def __len__(self) -> int:
        raise NotImplementedError

    def sample_name(self, index: int) -> str:
        raise NotImplementedError

    def load_raw_views(self, index: int, rng: np.random.Generator) -> list[RawView]:
        raise NotImplementedError

    # -- shared -------------------------------------------------------------------------
    def sample_rng(self, index: int) -> np.random.Generator:
        """Randomness of one sample depends on (seed, index) only: workers and resumes agree."""
        return np.random.default_rng([self.seed, index])

    def __getitem__(self, index):
        index = int(index[0] if isinstance(index, (tuple, list)) else index)
        for attempt in range(_MAX_REPLACEMENTS + 1):
            candidate = (index + attempt) % len(self)
            raw = self.load_raw_views(candidate, self.sample_rng(candidate))
            if self._count_ok(len(raw), candidate):
                return [self._finalize(view, candidate, i) for i, view in enumerate(raw)]
            self.replaced_samples += 1
            print(f"[dataset] {self.sample_name(candidate)} has {len(raw)} views, below "
                  f"min_num_views_allowed={self.min_num_views_allowed}: replaced by the next sample "
                  f"({self.replaced_samples} replaced so far in this process)", flush=True)
        raise ViewCountError(f"{_MAX_REPLACEMENTS + 1} consecutive samples from index {index} are short of views")

    def _count_ok(self, count: int, index: int) -> bool:
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

    def _finalize(self, raw: RawView, index: int, view_index: int) -> dict:
        image, depth, intrinsics = self._resize_crop(raw)
        height, width = depth.shape
        valid = np.isfinite(depth) & (depth > 0) & (depth <= self.max_depth_m)
        depth = np.where(valid, depth, 0.0).astype(np.float32)
        pts_cam = depth_to_points(depth, intrinsics)
        pose = raw.cam2world
        pts_world = pts_cam @ pose[:3, :3].T + pose[:3, 3]
        rays = pixel_rays(intrinsics, height, width)
        rays /= np.linalg.norm(rays, axis=-1, keepdims=True)
        img = (np.asarray(image, dtype=np.float32) / 255.0 - IMAGENET_MEAN) / IMAGENET_STD
        return {
            "img": torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1))),
            "data_norm_type": "dinov2",
            "true_shape": np.array([height, width], dtype=np.int32),
            "camera_intrinsics": intrinsics.astype(np.float32),
            "camera_pose": pose.astype(np.float32),
            "depthmap": depth[..., None],
            "pts3d": np.where(valid[..., None], pts_world, 0.0).astype(np.float32),
            "pts3d_cam": pts_cam.astype(np.float32),
            "ray_directions_cam": rays.astype(np.float32),
            "depth_along_ray": np.linalg.norm(pts_cam, axis=-1, keepdims=True).astype(np.float32),
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

    def _resize_crop(self, raw: RawView):
        """Scale so the target is covered, then centre-crop; depth uses nearest neighbour."""
        width, height = self.resolution
        w0, h0 = raw.image.size
        scale = max(width / w0, height / h0)
        new_w, new_h = max(width, round(w0 * scale)), max(height, round(h0 * scale))
        crop_x, crop_y = (new_w - width) // 2, (new_h - height) // 2
        box = (crop_x, crop_y, crop_x + width, crop_y + height)
        image = raw.image.resize((new_w, new_h), Image.Resampling.LANCZOS).crop(box)
        depth = np.asarray(Image.fromarray(raw.depth.astype(np.float32), mode="F")
                           .resize((new_w, new_h), Image.Resampling.NEAREST).crop(box))
        intrinsics = resize_crop_intrinsics(raw.intrinsics, new_w / w0, new_h / h0, crop_x, crop_y)
        return image, depth, intrinsics
