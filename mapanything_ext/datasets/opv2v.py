"""OPV2V readers: one vehicle's 4 cameras (OPV2VDataset) or every vehicle of a timestamp
(OPV2VCoopDataset), each view in a right-handed frame with OpenCV camera axes.

Layout (docs/data.md): <root>/<split>/<scenario>/<cav>/<frame>.yaml + <frame>_camera{0..3}.png,
depth in a parallel tree <depth_root>/<split>/<scenario>/<cav>/<frame>_depth{0..3}.png.
Folders are listed, never guessed (frame ids are CARLA's, not 0..N).

Reference frame of a sample: the body frame of its main vehicle at that timestamp
(`true_ego_pos`), mirrored to right-handed: x forward, y left, z up, origin on the ground
under the vehicle centre. For OPV2VDataset the main vehicle is the sample's vehicle.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import yaml
from PIL import Image

from mapanything_ext.console import say
from mapanything_ext.datasets.base import BadSampleError, BaseMultiViewDataset, RawView
from mapanything_ext.datasets.depth_codec import decode_depth
from mapanything_ext.datasets.png_io import read_rgb
from mapanything_ext.geometry.projection import (carla_body_to_right_handed, carla_camera_to_opencv, inverse_rigid,
                                                 x_to_world)

NUM_CAMERAS = 4
# Scenarios known to be broken in the public release (no camera3 images).
KNOWN_BAD_SCENARIOS = {("train", "2021_09_09_13_20_58")}
# libyaml's parser when PyYAML has it (10x faster on a 5-10 kB frame YAML), same SafeLoader semantics.
_YAML_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class FrameMetadataError(BadSampleError):
    """A per-frame YAML that is missing, unreadable or lacks what we need."""


def cords_to_pose(cords) -> np.ndarray:
    """CARLA [x, y, z, roll, yaw, pitch] (degrees) -> 4x4 local-to-world in CARLA's world."""
    return x_to_world(cords)


def _convert_pose_to_opencv(pose: np.ndarray) -> np.ndarray:
    """CARLA camera pose (4x4, cords_to_pose) -> right-handed cam2world with OpenCV axes (det +1)."""
    return carla_camera_to_opencv(pose)


def _check_pose6(values, where: str) -> list[float]:
    if not isinstance(values, (list, tuple)) or len(values) != 6:
        raise FrameMetadataError(f"{where} must be 6 numbers [x, y, z, roll, yaw, pitch], got {values!r}")
    out = [float(v) for v in values]
    if not all(math.isfinite(v) for v in out):
        raise FrameMetadataError(f"{where} is not finite: {out}")
    return out


def load_frame_metadata(yaml_path) -> dict:
    """Read and check one per-frame YAML: true_ego_pos, lidar_pose and camera0..3
    (cords, intrinsic; extrinsic kept when present). Extra keys (RSU, ...) are kept."""
    path = Path(yaml_path)
    try:
        data = yaml.load(path.read_text(), Loader=_YAML_LOADER)
    except FileNotFoundError:
        raise FrameMetadataError(f"frame YAML missing: {path}") from None
    except (OSError, yaml.YAMLError) as err:
        raise FrameMetadataError(f"frame YAML unreadable: {path}: {err}") from None
    if not isinstance(data, dict):
        raise FrameMetadataError(f"frame YAML {path} does not hold a mapping")
    for key in ("true_ego_pos", "lidar_pose"):
        if key not in data:
            raise FrameMetadataError(f"frame YAML {path} has no {key}")
        data[key] = _check_pose6(data[key], f"{path}: {key}")
    for k in range(NUM_CAMERAS):
        cam = data.get(f"camera{k}")
        if not isinstance(cam, dict) or "cords" not in cam or "intrinsic" not in cam:
            raise FrameMetadataError(f"frame YAML {path} lacks camera{k} (with cords and intrinsic)")
        cam["cords"] = _check_pose6(cam["cords"], f"{path}: camera{k}.cords")
        intrinsic = np.asarray(cam["intrinsic"], dtype=np.float64)
        if intrinsic.shape != (3, 3) or not np.isfinite(intrinsic).all() or intrinsic[0, 0] <= 0:
            raise FrameMetadataError(f"{path}: camera{k}.intrinsic must be a finite 3x3 pinhole matrix")
        cam["intrinsic"] = intrinsic
    return data


def _load_image(path: Path, intrinsic: np.ndarray) -> Image.Image:
    """RGB camera PNG whose size must match what its intrinsic assumes (principal point at the centre)."""
    try:
        image = read_rgb(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"camera image missing: {path}") from None
    except OSError as err:
        raise FrameMetadataError(f"camera image unreadable: {path}: {err}") from None
    expected = (round(2 * intrinsic[0, 2]), round(2 * intrinsic[1, 2]))
    if image.size != expected:
        raise FrameMetadataError(f"camera image {path} is {image.size[0]}x{image.size[1]} but its YAML intrinsic "
                                 f"expects {expected[0]}x{expected[1]}")
    return image


def _is_synthetic(scenario_dir: Path) -> bool:
    protocol = scenario_dir / "data_protocol.yaml"
    try:
        return bool((yaml.safe_load(protocol.read_text()) or {}).get("synthetic", False))
    except (OSError, yaml.YAMLError):
        return False


class _OPV2VIndex:
    """Folder listing of one split: {scenario: {cav: [frames]}}, with skips announced."""

    def __init__(self, root, depth_root, split: str):
        self.root = Path(root)
        self.depth_root = Path(depth_root)
        self.split = split
        split_dir = self.root / split
        if not split_dir.is_dir():
            raise FileNotFoundError(f"OPV2V split folder not found: {split_dir} (check machine.opv2v_root)")
        if not (self.depth_root / split).is_dir():
            raise FileNotFoundError(f"OPV2V depth folder not found: {self.depth_root / split} "
                                    f"(check machine.opv2v_depth_root)")
        self.frames: dict[str, dict[str, list[str]]] = {}
        self.synthetic: dict[str, bool] = {}
        for scenario_dir in sorted(p for p in split_dir.iterdir() if p.is_dir()):
            if (split, scenario_dir.name) in KNOWN_BAD_SCENARIOS:
                say("opv2v", f"skipping {scenario_dir}: known broken in the release (no camera3 images)")
                continue
            cavs = {}
            for cav_dir in sorted(p for p in scenario_dir.iterdir() if p.is_dir()):
                frames = sorted(p.stem for p in cav_dir.glob("*.yaml"))
                if not frames:
                    say("opv2v", f"skipping {cav_dir}: vehicle folder without frame YAML")
                    continue
                cavs[cav_dir.name] = frames
            if cavs:
                self.frames[scenario_dir.name] = cavs
                self.synthetic[scenario_dir.name] = _is_synthetic(scenario_dir)
        if not self.frames:
            raise FileNotFoundError(f"no OPV2V scenario with frames under {split_dir}")

    def raw_views(self, scenario: str, cav: str, frame: str, reference: np.ndarray | None = None,
                  meta: dict | None = None, cameras=range(NUM_CAMERAS)) -> tuple[list[RawView], dict]:
        """The views of one vehicle at one frame (`cameras`, default all 4, in that order), posed in
        `reference` (default: its own body frame). Only the listed cameras' files are read."""
        cav_dir = self.root / self.split / scenario / cav
        meta = meta or load_frame_metadata(cav_dir / f"{frame}.yaml")
        world_to_ref = inverse_rigid(reference if reference is not None else body_frame(meta))
        views = []
        for k in cameras:
            cam = meta[f"camera{k}"]
            image = _load_image(cav_dir / f"{frame}_camera{k}.png", cam["intrinsic"])
            depth = decode_depth(self.depth_root / self.split / scenario / cav / f"{frame}_depth{k}.png",
                                 expected_size=image.size)
            pose = world_to_ref @ _convert_pose_to_opencv(cords_to_pose(cam["cords"]))
            views.append(RawView(image, depth, cam["intrinsic"], pose, f"{self.split}/{scenario}",
                                 f"{scenario}/{cav}/{frame}/camera{k}", self.synthetic[scenario]))
        return views, meta


def body_frame(meta: dict) -> np.ndarray:
    """Right-handed body-to-world of the vehicle a frame YAML describes."""
    return carla_body_to_right_handed(cords_to_pose(meta["true_ego_pos"]))


class OPV2VDataset(BaseMultiViewDataset):
    """Single vehicle: one sample = the 4 cameras of one vehicle at one timestamp."""

    dataset_name = "OPV2V"

    def __init__(self, root, depth_root, split: str = "train", resolution=(518, 392), seed: int | None = None,
                 num_views: int = 4, max_depth_m: float = 250.0, variable_num_views: bool = False,
                 transform: str = "imgnorm", aug_crop: int = 0, on_bad_sample: str = "error"):
        super().__init__(num_views=num_views, resolution=resolution, seed=seed, max_depth_m=max_depth_m,
                         variable_num_views=variable_num_views, transform=transform, aug_crop=aug_crop,
                         on_bad_sample=on_bad_sample)
        if self.num_views != NUM_CAMERAS:
            raise ValueError(f"OPV2VDataset has exactly {NUM_CAMERAS} views per sample, got num_views={num_views}")
        self.index = _OPV2VIndex(root, depth_root, split)
        self.samples = [(s, c, f) for s, cavs in self.index.frames.items() for c, frames in cavs.items() for f in frames]

    def __len__(self) -> int:
        return len(self.samples)

    def sample_name(self, index: int) -> str:
        scenario, cav, frame = self.samples[index]
        return f"{self.index.split}/{scenario}/{cav}/{frame}"

    def load_raw_views(self, index: int, rng: np.random.Generator, num_views: int | None) -> list[RawView]:
        """All 4 cameras, or a seeded random subset of `num_views` of them (in camera order)."""
        cameras = range(NUM_CAMERAS)
        if num_views is not None and num_views < NUM_CAMERAS:
            cameras = [int(k) for k in sorted(rng.choice(NUM_CAMERAS, size=num_views, replace=False))]
        return self.index.raw_views(*self.samples[index], cameras=cameras)[0]


class OPV2VCoopDataset(BaseMultiViewDataset):
    """Cooperative: one sample = one timestamp of one scenario, the main vehicle's cameras
    plus those of the other vehicles present, all in the main vehicle's body frame.

    num_views          upper bound of views per sample (the base class's num_views)
    min_num_views      fewest views a sample may have (frames that cannot reach it are left out)
    max_num_views      cap on views per sample (None: all available, still at most num_views)
    coop_min_agents    frames with fewer vehicles present are left out
    main_agent         the main vehicle id (default '641')
    main_agent_mode    'fixed': main_agent, falling back to the lowest non-negative vehicle id
                       present when main_agent is absent from the frame; 'first': the lowest
                       id present; 'random': a seeded choice per sample among the vehicles present
    variable_num_views, transform, aug_crop: MapAnything's options (datasets/base.py); a
                       training batch's view count is drawn in 2..min(num_views, max_num_views)
    View choice above the cap (the batch's view count where it asks for one): the main vehicle's 4 cameras always stay; the other vehicles
    are taken in a seeded random order, all 4 cameras each while room remains, and the last
    one contributes a seeded random subset of its cameras.
    Vehicles whose folders lack a frame that others have are simply absent from that
    timestamp (announced once per scenario).
    """

    dataset_name = "OPV2V-coop"

    def __init__(self, root, depth_root, split: str = "train", resolution=(518, 392), seed: int | None = None,
                 num_views: int = 10, min_num_views: int = 4, max_num_views: int | None = None,
                 coop_min_agents: int = 1, main_agent: str = "641", main_agent_mode: str = "fixed",
                 max_depth_m: float = 250.0, variable_num_views: bool = False, transform: str = "imgnorm",
                 aug_crop: int = 0, on_bad_sample: str = "error"):
        super().__init__(num_views=num_views, resolution=resolution, seed=seed, allow_variable_view_count=True,
                         min_num_views_allowed=min_num_views, max_depth_m=max_depth_m,
                         variable_num_views=variable_num_views, transform=transform, aug_crop=aug_crop,
                         on_bad_sample=on_bad_sample)
        if main_agent_mode not in ("fixed", "first", "random"):
            raise ValueError(f"main_agent_mode must be fixed, first or random, got {main_agent_mode!r}")
        if max_num_views is not None and int(max_num_views) < int(min_num_views):
            raise ValueError(f"max_num_views={max_num_views} is below min_num_views={min_num_views}")
        self.cap = min(self.num_views, int(max_num_views) if max_num_views is not None else self.num_views)
        if self.view_counts and self.cap > 2:  # a batch never asks for more views than the cap allows
            self.view_counts = list(range(2, self.cap + 1))
        self.coop_min_agents = int(coop_min_agents)
        self.main_agent = str(main_agent)
        self.main_agent_mode = main_agent_mode
        self.index = _OPV2VIndex(root, depth_root, split)
        self.samples, skipped = self._build_samples()
        if skipped:
            say("opv2v-coop", f"{split}: left out {skipped} timestamps with fewer than coop_min_agents="
                  f"{self.coop_min_agents} vehicles or min_num_views={min_num_views} views")
        if not self.samples:
            raise ValueError(f"no timestamp in {self.index.root / split} has at least {self.coop_min_agents} "
                             f"vehicles and {min_num_views} views")

    def _build_samples(self) -> tuple[list[tuple[str, str, tuple[str, ...]]], int]:
        samples, skipped = [], 0
        for scenario, cavs in self.index.frames.items():
            all_frames = sorted({f for frames in cavs.values() for f in frames})
            partial = 0
            for frame in all_frames:
                present = tuple(sorted((c for c, frames in cavs.items() if frame in frames), key=_cav_order))
                partial += len(present) < len(cavs)
                views = min(self.cap, NUM_CAMERAS * len(present))
                if len(present) < self.coop_min_agents or views < self.min_num_views_allowed:
                    skipped += 1
                    continue
                samples.append((scenario, frame, present))
            if partial:
                say("opv2v-coop", f"{self.index.split}/{scenario}: {partial} of {len(all_frames)} timestamps lack "
                      f"some vehicle's files (vehicles' timestamps do not match); those vehicles are left out there")
        return samples, skipped

    def __len__(self) -> int:
        return len(self.samples)

    def sample_name(self, index: int) -> str:
        scenario, frame, _ = self.samples[index]
        return f"{self.index.split}/{scenario}/{frame}"

    def num_views_of(self, index: int) -> int:
        """Views sample `index` will have (from the folder listing; no file is opened)."""
        return min(self.cap, NUM_CAMERAS * len(self.samples[index][2]))

    def _choose_main_agent(self, present: tuple[str, ...], rng: np.random.Generator) -> str:
        eligible = [c for c in present if not c.startswith("-")] or list(present)
        if self.main_agent_mode == "fixed":
            return self.main_agent if self.main_agent in present else eligible[0]
        if self.main_agent_mode == "first":
            return eligible[0]
        return eligible[int(rng.integers(len(eligible)))]

    def load_raw_views(self, index: int, rng: np.random.Generator, num_views: int | None) -> list[RawView]:
        scenario, frame, present = self.samples[index]
        cap = self.cap if num_views is None else min(self.cap, num_views)
        main = self._choose_main_agent(present, rng)
        # Only the cameras that end up in the sample are decoded; the random draws are the same
        # (and in the same order) as when every camera was read and the subset taken afterwards.
        main_views, main_meta = self.index.raw_views(scenario, main, frame, cameras=range(min(cap, NUM_CAMERAS)))
        reference = body_frame(main_meta)
        views = list(main_views)
        others = [present[i] for i in rng.permutation(len(present)) if present[i] != main]
        for cav in others:
            room = cap - len(views)
            if room <= 0:
                break
            cameras = range(NUM_CAMERAS)
            if room < NUM_CAMERAS:
                cameras = [int(i) for i in sorted(rng.choice(NUM_CAMERAS, size=room, replace=False))]
            cav_views, _ = self.index.raw_views(scenario, cav, frame, reference, cameras=cameras)
            views.extend(cav_views)
        return views[:cap]


def _cav_order(cav: str):
    """Vehicle ids in numeric order where numeric (roadside units with negative ids last)."""
    try:
        value = int(cav)
        return (value < 0, abs(value), cav)
    except ValueError:
        return (True, 0, cav)
