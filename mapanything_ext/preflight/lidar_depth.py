"""Decoded depth against the LiDAR: the check that catches a wrong depth encoding on real data.

A frame's `<frame>.pcd` holds the LiDAR's points in its own frame (UE axes); the YAML's `lidar_pose`
and each camera's `cords` place sensor and camera in the world (docs/data.md). Each point is moved
into the camera (camera-from-world x world-from-LiDAR, both from the YAML, not from our dataset's
poses), projected with the camera's intrinsic, and where it lands on a pixel with valid depth the
decoded depth is divided by the point's depth along the optical axis. The median of those ratios
is 1 when depth, poses and intrinsics agree; occlusion between the two sensors moves single points,
not the median. A wrong encoding (another scale, swapped channels) moves it far from 1.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mapanything_ext.geometry.projection import M_CV_TO_UE, inverse_rigid, x_to_world

TOLERANCE = 0.05  # |median ratio - 1| above this is a problem
MIN_POINTS = 50  # fewer points on valid pixels: not judged


@dataclass
class CameraAgreement:
    camera: int
    points: int  # LiDAR points landing on a pixel with valid depth
    median_ratio: float  # decoded depth / LiDAR depth (nan: too few points)

    @property
    def judged(self) -> bool:
        return self.points >= MIN_POINTS

    @property
    def agrees(self) -> bool:
        return not self.judged or abs(self.median_ratio - 1.0) <= TOLERANCE


def agreement(points_lidar: np.ndarray, lidar_pose, cords, intrinsic: np.ndarray, depth: np.ndarray,
              camera: int) -> CameraAgreement:
    """Median of decoded depth / LiDAR z-depth over the LiDAR points one camera sees."""
    cam_from_lidar = inverse_rigid(x_to_world(cords)) @ x_to_world(lidar_pose)  # UE axes both sides
    ue = points_lidar @ cam_from_lidar[:3, :3].T + cam_from_lidar[:3, 3]
    cv = ue @ M_CV_TO_UE  # UE camera axes -> OpenCV (x right, y down, z forward)
    z = cv[:, 2]
    ahead = z > 0.5
    u = intrinsic[0, 0] * cv[ahead, 0] / z[ahead] + intrinsic[0, 2]
    v = intrinsic[1, 1] * cv[ahead, 1] / z[ahead] + intrinsic[1, 2]
    height, width = depth.shape
    col, row = np.floor(u).astype(np.int64), np.floor(v).astype(np.int64)
    inside = (col >= 0) & (col < width) & (row >= 0) & (row < height)
    decoded = depth[row[inside], col[inside]]
    lidar_z = z[ahead][inside]
    valid = decoded > 0
    if valid.sum() < MIN_POINTS:
        return CameraAgreement(camera, int(valid.sum()), float("nan"))
    return CameraAgreement(camera, int(valid.sum()), float(np.median(decoded[valid] / lidar_z[valid])))
