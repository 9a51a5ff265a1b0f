"""Every coordinate convention of the project, in one place.

CARLA / OPV2V (left-handed: x forward, y right, z up, angles in degrees)
  pose6 = [x, y, z, roll, yaw, pitch]; x_to_world(pose6) = T(x, y, z) @ Rz(yaw) Ry(-pitch) Rx(-roll)
  (the sign flips are how CARLA's left-handed angles map onto textbook matrices; a naive
  Rz(yaw) Ry(pitch) Rx(roll) is wrong whenever pitch or roll is non-zero).

Our frames (right-handed, what MapAnything wants)
  world_rh = S @ world_carla with S = diag(1, -1, 1): mirror the y axis once, everywhere.
  OpenCV camera axes (x right, y down, z forward) relate to a UE camera's (x forward, y right,
  z up) by p_ue = M @ p_cv with M = [[0,0,1],[1,0,0],[0,-1,0]] (det -1).
  cam2world_cv = S4 @ x_to_world(cords) @ M4, a proper rotation (det +1).
  A vehicle's body frame (right-handed: x forward, y left, z up) is S4 @ x_to_world(pose6) @ S4.

Pixels: OpenCV convention, pixel (col j, row i) has its centre at (u, v) = (j, i).
"""

from __future__ import annotations

import numpy as np

S3 = np.diag([1.0, -1.0, 1.0])
S4 = np.diag([1.0, -1.0, 1.0, 1.0])
M_CV_TO_UE = np.array([[0.0, 0.0, 1.0], [1.0, 0.0, 0.0], [0.0, -1.0, 0.0]])
M4_CV_TO_UE = np.eye(4)
M4_CV_TO_UE[:3, :3] = M_CV_TO_UE


def _rot_x(a):
    c, s = np.cos(a), np.sin(a)
    return np.array([[1, 0, 0], [0, c, -s], [0, s, c]])


def _rot_y(a):
    c, s = np.cos(a), np.sin(a)
    return np.array([[c, 0, s], [0, 1, 0], [-s, 0, c]])


def _rot_z(a):
    c, s = np.cos(a), np.sin(a)
    return np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]])


def x_to_world(pose6) -> np.ndarray:
    """CARLA [x, y, z, roll, yaw, pitch] (metres, degrees) -> 4x4 local-to-world (left-handed world)."""
    x, y, z, roll, yaw, pitch = (float(v) for v in pose6)
    r, yw, p = np.radians([roll, yaw, pitch])
    out = np.eye(4)
    out[:3, :3] = _rot_z(yw) @ _rot_y(-p) @ _rot_x(-r)
    out[:3, 3] = (x, y, z)
    return out


def pose6_from_matrix(matrix: np.ndarray) -> list[float]:
    """Inverse of x_to_world: 4x4 -> [x, y, z, roll, yaw, pitch] in degrees."""
    rot = matrix[:3, :3]
    pitch = np.arcsin(np.clip(rot[2, 0], -1.0, 1.0))
    roll = np.arctan2(-rot[2, 1], rot[2, 2])
    yaw = np.arctan2(rot[1, 0], rot[0, 0])
    x, y, z = matrix[:3, 3]
    return [float(x), float(y), float(z), *np.degrees([roll, yaw, pitch]).tolist()]


def carla_camera_to_opencv(cam_to_world_carla: np.ndarray) -> np.ndarray:
    """CARLA camera x_to_world -> right-handed cam2world with OpenCV camera axes."""
    return S4 @ cam_to_world_carla @ M4_CV_TO_UE


def carla_body_to_right_handed(body_to_world_carla: np.ndarray) -> np.ndarray:
    """CARLA body x_to_world -> body-to-world in the mirrored world with a right-handed body frame."""
    return S4 @ body_to_world_carla @ S4


def inverse_rigid(t: np.ndarray) -> np.ndarray:
    out = np.eye(4)
    out[:3, :3] = t[:3, :3].T
    out[:3, 3] = -t[:3, :3].T @ t[:3, 3]
    return out




def pixel_rays(intrinsics: np.ndarray, height: int, width: int) -> np.ndarray:
    """(H, W, 3) camera-frame directions with z = 1 through every pixel centre."""
    v, u = np.mgrid[0:height, 0:width].astype(np.float64)
    fx, fy, cx, cy = intrinsics[0, 0], intrinsics[1, 1], intrinsics[0, 2], intrinsics[1, 2]
    return np.stack([(u - cx) / fx, (v - cy) / fy, np.ones_like(u)], axis=-1)


def depth_to_points(depth: np.ndarray, intrinsics: np.ndarray, cam2world: np.ndarray | None = None):
    """z-depth (H, W) -> points (H, W, 3) in the camera frame, or the world frame when cam2world is given."""
    pts = pixel_rays(intrinsics, *depth.shape) * depth[..., None]
    if cam2world is None:
        return pts
    return pts @ cam2world[:3, :3].T + cam2world[:3, 3]


def project(points_world: np.ndarray, intrinsics: np.ndarray, cam2world: np.ndarray):
    """World points (..., 3) -> pixel coordinates (..., 2) and z-depth (...) in that camera."""
    world2cam = inverse_rigid(cam2world)
    cam = points_world @ world2cam[:3, :3].T + world2cam[:3, 3]
    z = cam[..., 2]
    with np.errstate(divide="ignore", invalid="ignore"):
        u = intrinsics[0, 0] * cam[..., 0] / z + intrinsics[0, 2]
        v = intrinsics[1, 1] * cam[..., 1] / z + intrinsics[1, 2]
    return np.stack([u, v], axis=-1), z


def resize_crop_intrinsics(intrinsics: np.ndarray, scale_x: float, scale_y: float, crop_x: int, crop_y: int) -> np.ndarray:
    """Intrinsics after resizing by (scale_x, scale_y) (pixel-centre convention), then cropping at (crop_x, crop_y)."""
    k = np.array(intrinsics, dtype=np.float64)
    k[0, 0] *= scale_x
    k[1, 1] *= scale_y
    k[0, 2] = (k[0, 2] + 0.5) * scale_x - 0.5 - crop_x
    k[1, 2] = (k[1, 2] + 0.5) * scale_y - 0.5 - crop_y
    return k
