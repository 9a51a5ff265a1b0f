"""Synthetic OPV2V: a small dataset in the real on-disk layout, rendered from one 3-D scene.

python -m mapanything_ext.datasets.synthetic OUT_DIR [--scenarios N] [--frames F] [--agents A]
    [--seed S] [--width W] [--height H] [--splits train,validate] [--depth-encoding carla|heal8]

writes
  OUT_DIR/opv2v/<split>/<scenario>/data_protocol.yaml
  OUT_DIR/opv2v/<split>/<scenario>/<cav>/<frame>.yaml, <frame>_camera{0..3}.png, <frame>.pcd (LiDAR)
  OUT_DIR/opv2v_depth/<split>/<scenario>/<cav>/<frame>_depth{0..3}.png

Each scenario is one procedural world in CARLA's coordinates (left-handed, x forward,
y right, z up): a ground plane with a textured road, buildings along it, parked and
moving cars, and A connected vehicles (the main one is '641') driving in convoy. Every
camera image and depth map is ray-cast from that same world, with the cameras mounted
where OPV2V mounts them, so depth lifted from any camera and projected into any other
(same or other vehicle, same timestamp) agrees wherever both see the same surface.
Vehicles carry small random pitch and roll so that pose-convention sign errors show.
Frames are named like CARLA's (6 digits, stepping by 2, not starting at 0). The output
is byte-identical for a given seed and arguments.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml
from PIL import Image

from mapanything_ext.datasets.depth_codec import encode_depth_carla, encode_depth_heal8
from mapanything_ext.datasets.pcd import write_pcd_ascii
from mapanything_ext.geometry.projection import M_CV_TO_UE, inverse_rigid, pixel_rays, pose6_from_matrix, x_to_world

MAIN_AGENT = "641"
# (x, y, z, yaw) of each camera relative to the vehicle, UE axes (OPV2V's mounts).
CAMERA_MOUNTS = ((2.5, 0.0, 1.0, 0.0), (0.0, 0.3, 1.8, 100.0), (0.0, -0.3, 1.8, -100.0), (-2.0, 0.0, 1.5, 180.0))
LIDAR_MOUNT = (-0.5, 0.0, 1.9)
# A 32-beam spinning LiDAR like OPV2V's (its sweeps are in <frame>.pcd; only the preflight reads them).
LIDAR_BEAMS, LIDAR_AZIMUTHS, LIDAR_ELEVATION_DEG = 32, 360, (-25.0, 5.0)
HORIZONTAL_FOV_DEG = 100.0
CAR_HALF_EXTENT = (1.95, 0.95, 0.7)  # below the roof cameras, ending in front of the back one
MAX_DEPTH_M = 250.0
FRAME_DT_S = 0.1
FIRST_FRAME = 69
# Half-angle of a cone holding every pixel ray (100 deg horizontal FOV at 4:3 -> ~57 deg diagonal).
_CULL_HALF_ANGLE = np.radians(62.0)
_RAY_CHUNK = 20000  # rays per slab-test batch: bounds memory at any image size
SUN = np.array([0.4, -0.3, 0.85]) / np.linalg.norm([0.4, -0.3, 0.85])


@dataclass
class Box:
    """An obstacle: centre (world), half extents (local x, y, z), yaw (degrees), colour, texture kind."""

    center: np.ndarray
    half: np.ndarray
    yaw: float
    color: np.ndarray
    kind: str  # "building" | "car"


@dataclass
class Actor:
    actor_id: int
    lane_offset: float
    start: float  # along-road position at frame 0 (m)
    speed: float  # m/s along the road direction (negative: opposite lane)
    color: np.ndarray


def intrinsics_for(width: int, height: int) -> np.ndarray:
    focal = width / (2.0 * np.tan(np.radians(HORIZONTAL_FOV_DEG / 2)))
    return np.array([[focal, 0.0, width / 2.0], [0.0, focal, height / 2.0], [0.0, 0.0, 1.0]])


class Scenario:
    """One procedural world and the motion of every actor in it."""

    def __init__(self, rng: np.random.Generator, num_agents: int):
        self.road_yaw = float(rng.uniform(-180, 180))
        self.origin = rng.uniform(-300, 300, size=2)
        heading = np.radians(self.road_yaw)
        self.forward = np.array([np.cos(heading), np.sin(heading)])
        self.lateral = np.array([-np.sin(heading), np.cos(heading)])
        self.cav_ids = [MAIN_AGENT] + [str(650 + 9 * k) for k in range(1, num_agents)]
        # CAVs drive in convoy, 9-14 m apart, alternating the two lanes of their direction.
        gaps = np.cumsum(rng.uniform(9, 14, size=num_agents))
        self.cavs = [Actor(int(cid), (-1.75 if k % 2 else -5.25) + rng.uniform(-0.3, 0.3), 20.0 - gaps[k],
                           rng.uniform(7, 10), rng.uniform(0.2, 0.9, size=3)) for k, cid in enumerate(self.cav_ids)]
        self.traffic = [Actor(3000 + k, float(rng.choice([-5.25, -1.75, 1.75, 5.25])), rng.uniform(-40, 120), 0.0,
                              rng.uniform(0.1, 0.9, size=3)) for k in range(int(rng.integers(5, 9)))]
        for actor in self.traffic:  # right-hand traffic: positive offsets drive the other way
            actor.speed = (-1 if actor.lane_offset > 0 else 1) * rng.uniform(0, 9)
        self.buildings = self._buildings(rng)
        self.wobble = rng.normal(0.0, 1.2, size=(512, 2))  # per (actor, frame) pitch / roll in degrees

    def _buildings(self, rng) -> list[Box]:
        boxes = []
        for side in (-1, 1):
            along = -80.0
            while along < 160.0:
                length, depth, height = rng.uniform(6, 14), rng.uniform(6, 12), rng.uniform(5, 22)
                offset = side * (rng.uniform(11, 16) + depth / 2)
                xy = self.origin + self.forward * (along + length / 2) + self.lateral * offset
                boxes.append(Box(np.array([xy[0], xy[1], height / 2]), np.array([length / 2, depth / 2, height / 2]),
                                 self.road_yaw, rng.uniform(0.3, 0.85, size=3), "building"))
                along += length + rng.uniform(2, 8)
        return boxes

    def actor_pose6(self, actor: Actor, frame_index: int) -> list[float]:
        along = actor.start + actor.speed * frame_index * FRAME_DT_S * 2
        xy = self.origin + self.forward * along + self.lateral * actor.lane_offset
        yaw = self.road_yaw + (180.0 if actor.speed < 0 else 0.0)
        yaw = (yaw + 180.0) % 360.0 - 180.0
        pitch, roll = self.wobble[(actor.actor_id * 7 + frame_index) % len(self.wobble)]
        return [float(xy[0]), float(xy[1]), 0.03, float(roll), float(yaw), float(pitch)]

    def actors(self) -> list[Actor]:
        return self.cavs + self.traffic

    def boxes_at(self, frame_index: int) -> list[Box]:
        cars = []
        for actor in self.actors():
            x, y, z, _, yaw, _ = self.actor_pose6(actor, frame_index)
            cars.append(Box(np.array([x, y, z + CAR_HALF_EXTENT[2]]), np.array(CAR_HALF_EXTENT), yaw, actor.color, "car"))
        return self.buildings + cars


def _cell_noise(a: np.ndarray, b: np.ndarray, cell: float) -> np.ndarray:
    """Deterministic pseudo-random value in [0, 1) per (a, b) cell of the given size."""
    ia, ib = np.floor(a / cell), np.floor(b / cell)
    return np.modf(np.abs(np.sin(ia * 12.9898 + ib * 78.233)) * 43758.5453)[0]


class Renderer:
    """Vectorised ray casting of a Scenario at one frame."""

    def __init__(self, scenario: Scenario, boxes: list[Box]):
        self.scenario = scenario
        self.boxes = boxes
        yaws = np.radians([b.yaw for b in boxes])
        cos, sin = np.cos(yaws), np.sin(yaws)
        # world -> box-local rotation (transpose of the yaw rotation), one per box
        self.rot = np.stack([np.stack([cos, sin, np.zeros_like(cos)], -1), np.stack([-sin, cos, np.zeros_like(cos)], -1),
                             np.tile([0.0, 0.0, 1.0], (len(boxes), 1))], axis=1)
        self.centers = np.stack([b.center for b in boxes])
        self.halves = np.stack([b.half for b in boxes])

    def render(self, cam_to_world: np.ndarray, intrinsics: np.ndarray, width: int, height: int):
        """-> (RGB uint8 (H, W, 3), z-depth float64 (H, W), 0 where nothing within MAX_DEPTH_M)."""
        rays_cv = pixel_rays(intrinsics, height, width).reshape(-1, 3)  # z = 1: ray parameter = z-depth
        dirs = rays_cv @ (cam_to_world[:3, :3] @ M_CV_TO_UE).T
        origin = cam_to_world[:3, 3]
        visible = self._visible_boxes(origin, cam_to_world[:3, :3] @ M_CV_TO_UE[:, 2])
        t_best, use_box, box_idx, normal_local = self._cast(origin, dirs, visible)
        valid = np.isfinite(t_best) & (t_best <= MAX_DEPTH_M)
        points = origin + dirs * np.where(valid, t_best, 0.0)[:, None]
        color = self._sky(dirs)
        ground = valid & ~use_box
        color[ground] = self._ground_color(points[ground])
        on_box = valid & use_box
        color[on_box] = self._box_color(points[on_box], box_idx[on_box], normal_local[on_box])
        depth = np.where(valid, t_best, 0.0)
        rgb = (np.clip(color, 0, 1) * 255 + 0.5).astype(np.uint8).reshape(height, width, 3)
        return rgb, depth.reshape(height, width)

    def lidar_sweep(self, lidar_to_world: np.ndarray) -> np.ndarray:
        """A spinning LiDAR's hits (LIDAR_BEAMS x LIDAR_AZIMUTHS rays) in the sensor's frame, UE axes."""
        elevation = np.radians(np.linspace(*LIDAR_ELEVATION_DEG, LIDAR_BEAMS))[:, None]
        azimuth = np.radians(np.arange(LIDAR_AZIMUTHS) * 360.0 / LIDAR_AZIMUTHS)[None, :]
        local = np.stack(np.broadcast_arrays(np.cos(elevation) * np.cos(azimuth), np.cos(elevation) * np.sin(azimuth),
                                             np.sin(elevation)), axis=-1).reshape(-1, 3)
        origin = lidar_to_world[:3, 3]
        t, *_ = self._cast(origin, local @ lidar_to_world[:3, :3].T, np.arange(len(self.boxes)))
        hit = np.isfinite(t) & (t <= MAX_DEPTH_M) & (t > 3.0)  # not the vehicle's own roof
        return local[hit] * t[hit, None]

    def _cast(self, origin, dirs, visible):
        """Nearest hit along each ray (ground or box): ray parameter t (inf: none), whether a box,
        which box, its local face normal."""
        t_best = np.where(dirs[:, 2] < -1e-9, -origin[2] / np.where(dirs[:, 2] < -1e-9, dirs[:, 2], -1.0), np.inf)
        hits = [self._cast_boxes(origin, dirs[i:i + _RAY_CHUNK], visible) for i in range(0, len(dirs), _RAY_CHUNK)]
        t_box, box_idx, normal_local = (np.concatenate(parts) for parts in zip(*hits))
        use_box = t_box < t_best
        return np.where(use_box, t_box, t_best), use_box, box_idx, normal_local

    def _visible_boxes(self, origin, forward) -> np.ndarray:
        """Indices of boxes whose bounding sphere meets a cone around the optical axis (culling)."""
        to_box = self.centers - origin
        dist = np.linalg.norm(to_box, axis=1)
        radius = np.linalg.norm(self.halves, axis=1)
        cos_angle = (to_box @ forward) / np.maximum(dist, 1e-9)
        angle = np.arccos(np.clip(cos_angle, -1, 1))
        slack = np.arcsin(np.clip(radius / np.maximum(dist, 1e-9), 0, 1))
        return np.flatnonzero((dist <= radius) | (angle <= _CULL_HALF_ANGLE + slack))

    def _cast_boxes(self, origin, dirs, visible):
        """Slab test against the visible yawed boxes; rays starting inside a box ignore it."""
        n_rays = dirs.shape[0]
        if len(visible) == 0:
            return np.full(n_rays, np.inf), np.zeros(n_rays, dtype=np.int64), np.zeros((n_rays, 3))
        rot, halves = self.rot[visible], self.halves[visible][:, None, :]
        p = np.matmul(rot, (origin - self.centers[visible])[:, :, None])[:, None, :, 0]  # (M, 1, 3)
        d = np.matmul(dirs[None], rot.transpose(0, 2, 1))  # (M, N, 3)
        with np.errstate(divide="ignore", invalid="ignore"):
            inv = 1.0 / d
            t1 = (-halves - p) * inv
            t2 = (halves - p) * inv
        t_near_axes = np.fmin(t1, t2)
        t_near = np.fmax.reduce(t_near_axes, axis=2)
        t_far = np.fmin.reduce(np.fmax(t1, t2), axis=2)
        t_hit = np.where((t_far >= t_near) & (t_near > 1e-6), t_near, np.inf)  # (M, N)
        best = np.argmin(t_hit, axis=0)
        n = np.arange(n_rays)
        axis = np.argmax(np.nan_to_num(t_near_axes[best, n], nan=-np.inf), axis=1)
        normal = np.zeros((n_rays, 3))
        normal[n, axis] = -np.sign(d[best, n, axis])
        return t_hit[best, n], visible[best], normal

    def _sky(self, dirs):
        elevation = dirs[:, 2] / np.linalg.norm(dirs, axis=1)
        t = np.clip(elevation, 0, 1)[:, None]
        return (1 - t) * np.array([0.75, 0.82, 0.92]) + t * np.array([0.35, 0.55, 0.9])

    def _ground_color(self, pts):
        sc = self.scenario
        rel = pts[:, :2] - sc.origin
        along, lateral = rel @ sc.forward, rel @ sc.lateral
        grain = _cell_noise(pts[:, 0], pts[:, 1], 0.5)[:, None]
        grass = np.where((_cell_noise(pts[:, 0], pts[:, 1], 2.0) > 0.5)[:, None], [0.30, 0.50, 0.22], [0.38, 0.58, 0.28])
        color = grass * (0.8 + 0.4 * grain)
        sidewalk = (np.abs(lateral) >= 7.0) & (np.abs(lateral) < 10.0)
        color[sidewalk] = (np.array([0.62, 0.60, 0.56]) * (0.85 + 0.3 * grain[sidewalk]))
        road = np.abs(lateral) < 7.0
        color[road] = np.array([0.22, 0.22, 0.24]) * (0.8 + 0.4 * grain[road])
        lane_lines = road & (np.abs(np.abs(lateral) - 3.5) < 0.12) & (np.mod(along, 6.0) < 3.0)
        centre_line = road & (np.abs(lateral) < 0.15)
        edge_lines = road & (np.abs(np.abs(lateral) - 6.8) < 0.12)
        color[lane_lines | edge_lines] = [0.92, 0.92, 0.9]
        color[centre_line] = [0.95, 0.8, 0.2]
        return color

    def _box_color(self, pts, idx, normal_local):
        local = np.einsum("nij,nj->ni", self.rot[idx], pts - self.centers[idx])
        half = self.halves[idx]
        base = np.stack([self.boxes[i].color for i in range(len(self.boxes))])[idx]
        is_car = np.array([b.kind == "car" for b in self.boxes])[idx]
        # face coordinate running along the face, for window and panel patterns
        along_face = np.where(np.abs(normal_local[:, 0]) > 0.5, local[:, 1], local[:, 0])
        height = local[:, 2] + half[:, 2]
        windows = (~is_car) & (np.abs(normal_local[:, 2]) < 0.5) & (np.mod(along_face, 3.0) < 1.7) & \
            (np.mod(height, 3.2) > 1.0) & (np.mod(height, 3.2) < 2.3)
        car_glass = is_car & (height > 1.0) & (np.abs(normal_local[:, 2]) < 0.5)
        color = base * (0.85 + 0.3 * _cell_noise(along_face, height, 0.7))[:, None]
        color[windows] = [0.15, 0.2, 0.35]
        color[car_glass] = [0.1, 0.12, 0.15]
        world_normal = np.einsum("nji,nj->ni", self.rot[idx], normal_local)
        shade = 0.45 + 0.55 * np.clip(world_normal @ SUN, 0, 1)
        return color * shade[:, None]


def _pose_yaml(scenario: Scenario, cav: Actor, frame_index: int, intrinsics: np.ndarray, rng) -> tuple[dict, list]:
    """Per-frame YAML content of one CAV, and its 4 camera x_to_world matrices."""
    ego6 = scenario.actor_pose6(cav, frame_index)
    body = x_to_world(ego6)
    lidar = body @ x_to_world([*LIDAR_MOUNT, 0.0, 0.0, 0.0])
    record, cams = {}, []
    for k, (mx, my, mz, myaw) in enumerate(CAMERA_MOUNTS):
        cam = body @ x_to_world([mx, my, mz, 0.0, myaw, 0.0])
        cams.append(cam)
        record[f"camera{k}"] = {
            "cords": pose6_from_matrix(cam),
            "extrinsic": (inverse_rigid(cam) @ lidar).tolist(),
            "intrinsic": intrinsics.tolist(),
        }
    speed_kmh = abs(cav.speed) * 3.6
    heading = scenario.forward * np.sign(cav.speed or 1)
    record.update({
        "ego_speed": float(speed_kmh),
        "lidar_pose": pose6_from_matrix(lidar),
        "plan_trajectory": [[float(ego6[0] + heading[0] * d), float(ego6[1] + heading[1] * d), float(speed_kmh)]
                            for d in (2.0, 4.0, 6.0)],
        "predicted_ego_pos": [float(v + n) for v, n in zip(ego6, rng.normal(0, 0.05, size=6))],
        "true_ego_pos": ego6,
        "vehicles": _vehicles_seen_by(scenario, cav, frame_index),
    })
    return record, cams


def _vehicles_seen_by(scenario: Scenario, cav: Actor, frame_index: int) -> dict:
    """Every other actor within 60 m (OPV2V lists actors with LiDAR hits, never the vehicle itself)."""
    ego = scenario.actor_pose6(cav, frame_index)
    out = {}
    for actor in scenario.actors():
        if actor.actor_id == cav.actor_id:
            continue
        pose = scenario.actor_pose6(actor, frame_index)
        if np.hypot(pose[0] - ego[0], pose[1] - ego[1]) > 60.0:
            continue
        out[actor.actor_id] = {
            "angle": [pose[3], pose[4], pose[5]],
            "center": [0.0, 0.0, CAR_HALF_EXTENT[2]],
            "extent": list(CAR_HALF_EXTENT),
            "location": pose[:3],
            "speed": float(abs(actor.speed) * 3.6),
        }
    return out


def scenario_name(seed: int, index: int) -> str:
    stamp = time.gmtime(1629152814 + 86400 * (seed % 50) + 3607 * index)  # 2021-08-16 onwards
    return time.strftime("%Y_%m_%d_%H_%M_%S", stamp)


def generate(out_dir, scenarios: int = 2, frames: int = 6, agents: int = 3, seed: int = 0, width: int = 800,
             height: int = 600, splits=("train", "validate"), depth_encoding: str = "carla", verbose: bool = True) -> Path:
    """Write the dataset (see module docstring); returns out_dir."""
    if agents < 1 or frames < 1 or scenarios < 1:
        raise ValueError("scenarios, frames and agents must each be at least 1")
    encode = {"carla": encode_depth_carla, "heal8": encode_depth_heal8}[depth_encoding]
    out_dir = Path(out_dir)
    intrinsics = intrinsics_for(width, height)
    started, done, total = time.perf_counter(), 0, len(splits) * scenarios * frames * agents
    for split_index, split in enumerate(splits):
        for s in range(scenarios):
            rng = np.random.default_rng([seed, split_index, s])
            scene = Scenario(rng, agents)
            name = scenario_name(seed, split_index * scenarios + s)
            _write_protocol(out_dir / "opv2v" / split / name, seed, scene, width, height, depth_encoding)
            for f in range(frames):
                renderer = Renderer(scene, scene.boxes_at(f))
                frame = f"{FIRST_FRAME + 2 * f:06d}"
                for cav in scene.cavs:
                    _write_frame(out_dir, split, name, scene, cav, f, frame, renderer, intrinsics, width, height, rng,
                                 encode)
                    done += 1
                if verbose:
                    elapsed = time.perf_counter() - started
                    print(f"[synthetic] {split}/{name} frame {frame}: {done}/{total} vehicle-frames, "
                          f"{elapsed:.1f}s", flush=True)
    return out_dir


def _write_protocol(folder: Path, seed, scene: Scenario, width, height, depth_encoding) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    protocol = {"synthetic": True, "generator": "mapanything_ext.datasets.synthetic", "seed": int(seed),
                "cav_ids": scene.cav_ids, "image_size": [width, height], "depth_encoding": depth_encoding}
    (folder / "data_protocol.yaml").write_text(yaml.safe_dump(protocol, sort_keys=False))


def _write_frame(out_dir, split, name, scene, cav, frame_index, frame, renderer, intrinsics, width, height, rng,
                 encode) -> None:
    cav_dir = out_dir / "opv2v" / split / name / str(cav.actor_id)
    depth_dir = out_dir / "opv2v_depth" / split / name / str(cav.actor_id)
    cav_dir.mkdir(parents=True, exist_ok=True)
    depth_dir.mkdir(parents=True, exist_ok=True)
    record, cams = _pose_yaml(scene, cav, frame_index, intrinsics, rng)
    (cav_dir / f"{frame}.yaml").write_text(yaml.safe_dump(record, sort_keys=True))
    points = renderer.lidar_sweep(x_to_world(record["lidar_pose"]))
    write_pcd_ascii(cav_dir / f"{frame}.pcd", points, np.linalg.norm(points, axis=1) / MAX_DEPTH_M)
    for k, cam in enumerate(cams):
        rgb, depth = renderer.render(cam, intrinsics, width, height)
        Image.fromarray(rgb).save(cav_dir / f"{frame}_camera{k}.png", compress_level=3)
        encode(depth).save(depth_dir / f"{frame}_depth{k}.png", compress_level=3)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--scenarios", type=int, default=2, help="scenarios per split (default 2)")
    parser.add_argument("--frames", type=int, default=6, help="timestamps per scenario (default 6)")
    parser.add_argument("--agents", type=int, default=3, help="connected vehicles per scenario, '641' first (default 3)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--width", type=int, default=800, help="image width (real OPV2V: 800)")
    parser.add_argument("--height", type=int, default=600, help="image height (real OPV2V: 600)")
    parser.add_argument("--splits", default="train,validate", help="comma-separated split folders")
    parser.add_argument("--depth-encoding", choices=("carla", "heal8"), default="carla",
                        help="carla: 24-bit RGB over 1000 m (default); heal8: 8-bit metres")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    generate(args.out_dir, args.scenarios, args.frames, args.agents, args.seed, args.width, args.height,
             tuple(s for s in args.splits.split(",") if s), args.depth_encoding)
    print(f"[synthetic] wrote {args.out_dir / 'opv2v'} and {args.out_dir / 'opv2v_depth'} "
          f"in {time.perf_counter() - started:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
