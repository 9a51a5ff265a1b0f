"""Coloured point clouds (binary PLY) of one sample's reconstruction in the main vehicle's frame.

Written files, readable by MeshLab, Open3D and CloudCompare:

  <stem>_gt.ply            true points of all views, image colours, cameras as green frusta
  <stem>_pred.ply          predicted points placed with the first view's true pose, red frusta
  <stem>_side_by_side.ply  both, the prediction shifted sideways (+y) next to the truth

Frusta are drawn as points sampled along their edges, since viewers differ in how they
show PLY edges.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from mapanything_ext.evaluation.plots import image_rgb
from mapanything_ext.geometry.rotations import quaternion_to_matrix

GT_CAMERA_RGB = (40, 200, 60)
PRED_CAMERA_RGB = (230, 40, 40)
FRUSTUM_DEPTH_M = 1.5


def write_ply(path: Path, points: np.ndarray, colors: np.ndarray) -> Path:
    """Binary little-endian PLY of float32 x, y, z and uint8 red, green, blue."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    vertices = np.empty(len(points), dtype=[("x", "<f4"), ("y", "<f4"), ("z", "<f4"),
                                            ("red", "u1"), ("green", "u1"), ("blue", "u1")])
    for i, axis in enumerate("xyz"):
        vertices[axis] = points[:, i]
    for i, channel in enumerate(("red", "green", "blue")):
        vertices[channel] = colors[:, i]
    header = ("ply\nformat binary_little_endian 1.0\ncomment mapanything-ext reconstruction\n"
              f"element vertex {len(points)}\nproperty float x\nproperty float y\nproperty float z\n"
              "property uchar red\nproperty uchar green\nproperty uchar blue\nend_header\n")
    with open(path, "wb") as f:
        f.write(header.encode("ascii"))
        f.write(vertices.tobytes())
    return path


def read_ply(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Points and colours of a PLY written by write_ply (used by the tests)."""
    data = Path(path).read_bytes()
    end = data.index(b"end_header\n") + len(b"end_header\n")
    count = int(next(line for line in data[:end].decode().splitlines() if line.startswith("element vertex")).split()[2])
    vertices = np.frombuffer(data[end:], dtype=[("x", "<f4"), ("y", "<f4"), ("z", "<f4"),
                                                ("red", "u1"), ("green", "u1"), ("blue", "u1")], count=count)
    return np.stack([vertices[a] for a in "xyz"], 1), np.stack([vertices[c] for c in ("red", "green", "blue")], 1)


def frustum_points(cam_to_main: np.ndarray, intrinsics: np.ndarray, height: int, width: int,
                   depth: float = FRUSTUM_DEPTH_M, per_edge: int = 40) -> np.ndarray:
    """Points along the 8 edges of a camera's viewing pyramid (apex at the camera, base at depth)."""
    inv_k = np.linalg.inv(intrinsics)
    corners = np.array([[0, 0, 1], [width, 0, 1], [width, height, 1], [0, height, 1]], dtype=np.float64)
    base = (inv_k @ corners.T).T * depth
    apex = np.zeros(3)
    edges = [(apex, c) for c in base] + [(base[i], base[(i + 1) % 4]) for i in range(4)]
    t = np.linspace(0.0, 1.0, per_edge)[:, None]
    cam_points = np.concatenate([a + t * (b - a) for a, b in edges])
    return cam_points @ cam_to_main[:3, :3].T + cam_to_main[:3, 3]


def export_sample(views: list[dict], preds: list[dict], out_dir: Path, stem: str = "sample",
                  max_points_per_view: int = 20000, seed: int = 0) -> dict[str, Path]:
    """Write the three PLY files of one sample; returns their paths."""
    rng = np.random.default_rng(seed)
    ref_to_main = views[0]["camera_pose"][0].double().numpy()
    gt_pts, pred_pts, colors = [], [], []
    gt_cams, pred_cams = [], []
    for view, pred in zip(views, preds):
        valid = (view["valid_mask"][0].bool() & (view["depthmap"][0, ..., 0] > 0)).numpy().reshape(-1)
        index = np.flatnonzero(valid)
        if len(index) > max_points_per_view:
            index = rng.choice(index, max_points_per_view, replace=False)
        rgb = (image_rgb(view).reshape(-1, 3)[index] * 255).astype(np.uint8)
        gt_pts.append(view["pts3d"][0].double().numpy().reshape(-1, 3)[index])
        pred_ref = pred["pts3d"][0].double().numpy().reshape(-1, 3)[index]
        pred_pts.append(pred_ref @ ref_to_main[:3, :3].T + ref_to_main[:3, 3])
        colors.append(rgb)
        h, w = view["img"].shape[-2:]
        k = view["camera_intrinsics"][0].double().numpy()
        gt_cams.append(frustum_points(view["camera_pose"][0].double().numpy(), k, h, w))
        pred_pose = np.eye(4)
        pred_pose[:3, :3] = quaternion_to_matrix(pred["cam_quats"][0].double()).numpy()
        pred_pose[:3, 3] = pred["cam_trans"][0].double().numpy()
        pred_cams.append(frustum_points(ref_to_main @ pred_pose, k, h, w))
    gt_cloud = _with_cameras(np.concatenate(gt_pts), np.concatenate(colors), np.concatenate(gt_cams), GT_CAMERA_RGB)
    pred_cloud = _with_cameras(np.concatenate(pred_pts), np.concatenate(colors), np.concatenate(pred_cams),
                               PRED_CAMERA_RGB)
    offset = np.array([0.0, np.ptp(gt_cloud[0][:, 1]) + 5.0, 0.0])
    out_dir = Path(out_dir)
    return {
        "gt": write_ply(out_dir / f"{stem}_gt.ply", *gt_cloud),
        "pred": write_ply(out_dir / f"{stem}_pred.ply", *pred_cloud),
        "side_by_side": write_ply(out_dir / f"{stem}_side_by_side.ply",
                                  np.concatenate([gt_cloud[0], pred_cloud[0] + offset]),
                                  np.concatenate([gt_cloud[1], pred_cloud[1]])),
    }


def _with_cameras(points, colors, camera_points, camera_rgb):
    cam_colors = np.tile(np.array(camera_rgb, dtype=np.uint8), (len(camera_points), 1))
    return np.concatenate([points, camera_points]), np.concatenate([colors, cam_colors])
