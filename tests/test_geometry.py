"""Pose conventions against independent formulas (the spec's matrix, rotations, projection)."""

import numpy as np
import pytest
import torch

from mapanything_ext.geometry.projection import (M_CV_TO_UE, S4, carla_camera_to_opencv, depth_to_points,
                                                 pose6_from_matrix, project, resize_crop_intrinsics, x_to_world)
from mapanything_ext.geometry.rotations import matrix_to_quaternion

RNG = np.random.default_rng(0)
POSES = [np.concatenate([RNG.uniform(-300, 300, 3), RNG.uniform([-10, -180, -10], [10, 180, 10])]) for _ in range(20)]


def opencood_matrix(roll, yaw, pitch):
    """The matrix written out in shared/specs/opv2v.md (OpenCOOD's x_to_world)."""
    cr, sr, cy, sy, cp, sp = (
        np.cos(np.radians(roll)), np.sin(np.radians(roll)), np.cos(np.radians(yaw)), np.sin(np.radians(yaw)),
        np.cos(np.radians(pitch)), np.sin(np.radians(pitch)))
    return np.array([
        [cp * cy, cy * sp * sr - sy * cr, -cy * sp * cr - sy * sr],
        [sy * cp, sy * sp * sr + cy * cr, -sy * sp * cr + cy * sr],
        [sp, -cp * sr, cp * cr],
    ])


@pytest.mark.parametrize("pose", POSES)
def test_x_to_world_matches_the_written_out_matrix(pose):
    mat = x_to_world(pose)
    assert np.allclose(mat[:3, :3], opencood_matrix(pose[3], pose[4], pose[5]), atol=1e-12)
    assert np.allclose(mat[:3, 3], pose[:3])


@pytest.mark.parametrize("pose", POSES)
def test_pose6_round_trip(pose):
    back = pose6_from_matrix(x_to_world(pose))
    assert np.allclose(back[:3], pose[:3])
    assert np.allclose((np.array(back[3:]) - pose[3:] + 180) % 360 - 180, 0, atol=1e-9)


@pytest.mark.parametrize("pose", POSES)
def test_opencv_camera_pose_is_a_proper_rotation(pose):
    cv = carla_camera_to_opencv(x_to_world(pose))
    rot = cv[:3, :3]
    assert np.allclose(rot @ rot.T, np.eye(3), atol=1e-12)
    assert np.linalg.det(rot) == pytest.approx(1.0)
    # the left-handed input composed with the axis swap alone would be a reflection
    assert np.linalg.det(x_to_world(pose)[:3, :3] @ M_CV_TO_UE) == pytest.approx(-1.0)


def test_camera_optical_axis_points_along_carla_forward_after_mirroring():
    yaw = 30.0
    cv = carla_camera_to_opencv(x_to_world([0, 0, 0, 0, yaw, 0]))
    forward_carla = np.array([np.cos(np.radians(yaw)), np.sin(np.radians(yaw)), 0.0])
    assert np.allclose(cv[:3, 2], S4[:3, :3] @ forward_carla)
    # image "down" (OpenCV +y) is world down
    assert np.allclose(cv[:3, 1], [0, 0, -1])


def test_naive_angle_order_differs_when_pitch_and_roll_are_not_zero():
    pose = [0, 0, 0, 5.0, 40.0, 3.0]
    r, y, p = np.radians(pose[3:])
    cz, sz, cy_, sy_, cx, sx = np.cos(y), np.sin(y), np.cos(p), np.sin(p), np.cos(r), np.sin(r)
    naive = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]]) @ np.array([[cy_, 0, sy_], [0, 1, 0], [-sy_, 0, cy_]]) @ \
        np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    assert not np.allclose(naive, x_to_world(pose)[:3, :3], atol=1e-3)


def test_quaternion_matches_axis_angle():
    angle = np.radians(70.0)
    axis = np.array([1.0, 2.0, 2.0]) / 3.0
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    rot = np.eye(3) + np.sin(angle) * k + (1 - np.cos(angle)) * k @ k
    q = matrix_to_quaternion(torch.from_numpy(rot)).numpy()
    assert np.allclose(q, np.concatenate([axis * np.sin(angle / 2), [np.cos(angle / 2)]]))


def test_depth_lift_and_projection_are_inverse():
    k = np.array([[100.0, 0, 40], [0, 100.0, 30], [0, 0, 1]])
    pose = carla_camera_to_opencv(x_to_world([3, -2, 1.5, 2, 50, -4]))
    depth = RNG.uniform(2, 50, size=(60, 80))
    uv, z = project(depth_to_points(depth, k, pose), k, pose)
    v, u = np.mgrid[0:60, 0:80]
    assert np.allclose(uv[..., 0], u) and np.allclose(uv[..., 1], v) and np.allclose(z, depth)


def test_resized_intrinsics_project_points_to_the_resized_pixels():
    k = np.array([[335.64, 0, 400], [0, 335.64, 300], [0, 0, 1]])
    pts = RNG.uniform([-5, -3, 4], [5, 3, 40], size=(50, 3))
    scale_x, scale_y, cx0, cy0 = 523 / 800, 392 / 600, 2, 0
    k2 = resize_crop_intrinsics(k, scale_x, scale_y, cx0, cy0)
    u1 = k[0, 0] * pts[:, 0] / pts[:, 2] + k[0, 2]
    u2 = k2[0, 0] * pts[:, 0] / pts[:, 2] + k2[0, 2]
    # pixel-centre convention: continuous coordinate x maps to (x + 0.5) * s - 0.5, then the crop shifts it
    assert np.allclose(u2, (u1 + 0.5) * scale_x - 0.5 - cx0)
