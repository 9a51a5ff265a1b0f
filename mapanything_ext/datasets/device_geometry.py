"""Per-pixel geometry derived where the batch trains, not in the loader's worker processes.

A view at 518x392 holds 11.8 MB, 8.1 MB of which (`pts3d`, `pts3d_cam`, `ray_directions_cam`,
`depth_along_ray`) follow from the depth map, the intrinsics and the pose, and 1.8 MB more are the
float32 image of 8-bit pixels. A loader worker spends a good part of each view computing those
arrays in float64 and handing them through shared memory. With `train_params.geometry_on_device`
the dataset sends a lean view instead (the image as uint8, the depth map, the masks, the cameras,
and the float64 intrinsics and pose the arrays are computed from, under `GEOMETRY_KEY`), and
`complete_view` computes the same arrays after the batch reached its device: the same float64
operations in the same order as the dataset's own path (`BaseMultiViewDataset._finalize`), one
PyTorch operation each, so the numbers are the same to the bit (tests/test_device_geometry.py).
"""

from __future__ import annotations

import torch

from mapanything_ext.datasets.image_norm import NORMALISE_LUT

GEOMETRY_KEY = "geometry_f64"  # (B, 25) float64: the 3x3 intrinsics, then the 4x4 camera-to-world pose
DERIVED_KEYS = ("pts3d", "pts3d_cam", "ray_directions_cam", "depth_along_ray")

_luts: dict[torch.device, torch.Tensor] = {}


def pack_cameras(intrinsics, cam2world) -> torch.Tensor:
    """The float64 intrinsics and pose of one view, as the lean view carries them."""
    return torch.cat([torch.as_tensor(intrinsics, dtype=torch.float64).reshape(9),
                      torch.as_tensor(cam2world, dtype=torch.float64).reshape(16)])


def complete_view(view: dict) -> dict:
    """A collated lean view (batch first) -> the full view: the normalised float32 image and the
    derived arrays, computed on the view's device; the camera pack is dropped."""
    view = dict(view)
    cameras = view.pop(GEOMETRY_KEY).to(torch.float64)
    intrinsics, pose = cameras[:, :9].reshape(-1, 3, 3), cameras[:, 9:].reshape(-1, 4, 4)
    depth = view["depthmap"][..., 0].to(torch.float64)  # (B, H, W), 0 where invalid
    invalid = ~view["valid_mask"]
    rays_z1 = _rays_z1(intrinsics, *depth.shape[1:])
    pts_cam = rays_z1 * depth[..., None]
    pts_world = _rigid_transform_f32(pts_cam, pose)
    pts_world[invalid] = 0.0
    view["img"] = _normalised(view["img"])
    view["pts3d"] = pts_world
    view["pts3d_cam"] = pts_cam.to(torch.float32)
    view["ray_directions_cam"] = (rays_z1 / _norm(rays_z1)[..., None]).to(torch.float32)
    view["depth_along_ray"] = _norm(pts_cam)[..., None].to(torch.float32)
    return view


def _rays_z1(intrinsics: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(B, H, W, 3) directions with z = 1 through every pixel centre (geometry.pixel_rays)."""
    kwargs = {"dtype": torch.float64, "device": intrinsics.device}
    v, u = torch.meshgrid(torch.arange(height, **kwargs), torch.arange(width, **kwargs), indexing="ij")
    fx, fy = intrinsics[:, 0, 0, None, None], intrinsics[:, 1, 1, None, None]
    cx, cy = intrinsics[:, 0, 2, None, None], intrinsics[:, 1, 2, None, None]
    x, y = (u - cx) / fx, (v - cy) / fy
    return torch.stack([x, y, torch.ones_like(x)], dim=-1)


def _norm(vectors: torch.Tensor) -> torch.Tensor:
    """|v| summed in np.linalg.norm's order, (x^2 + y^2) + z^2, as the dataset does."""
    squares = vectors * vectors
    return torch.sqrt(squares[..., 0] + squares[..., 1] + squares[..., 2])


def _rigid_transform_f32(points: torch.Tensor, pose: torch.Tensor) -> torch.Tensor:
    """float32(R p + t), each axis summed in float64 as R[i,0] x + R[i,1] y + R[i,2] z + t[i]."""
    x, y, z = points[..., 0], points[..., 1], points[..., 2]
    axes = []
    for i in range(3):
        row = [pose[:, i, j, None, None] for j in range(4)]
        axes.append(((x * row[0] + y * row[1]) + z * row[2]) + row[3])
    return torch.stack(axes, dim=-1).to(torch.float32)


def _normalised(image: torch.Tensor) -> torch.Tensor:
    """uint8 (B, 3, H, W) -> float32 normalised for the encoder, through the dataset's own table."""
    lut = _luts.get(image.device)
    if lut is None:
        lut = _luts[image.device] = torch.from_numpy(NORMALISE_LUT).to(image.device)
    index = image.long()
    return torch.stack([lut[c][index[:, c]] for c in range(3)], dim=1)
