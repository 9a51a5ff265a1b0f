"""Independent geometry check used by the dataset tests: lift depth from one camera,
project it into another, compare with that camera's own depth."""

import numpy as np

from mapanything_ext.geometry.projection import depth_to_points, project

# A point counts as seen by both cameras when the two depths agree within this (it excludes
# occlusions); the test then asks for a median error far below it and enough such points.
COVISIBLE_GATE = 0.10


def reprojection_stats(depth_a, k_a, pose_a, depth_b, k_b, pose_b) -> dict:
    valid = depth_a > 0
    pts = depth_to_points(depth_a.astype(np.float64), k_a.astype(np.float64), pose_a.astype(np.float64))[valid]
    uv, z = project(pts, k_b.astype(np.float64), pose_b.astype(np.float64))
    height, width = depth_b.shape
    u, v = np.rint(uv[:, 0]).astype(int), np.rint(uv[:, 1]).astype(int)
    inside = (z > 0) & (u >= 0) & (u < width) & (v >= 0) & (v < height)
    seen = depth_b[v[inside], u[inside]]
    z = z[inside]
    has_depth = seen > 0
    rel = np.abs(seen[has_depth] - z[has_depth]) / z[has_depth]
    both = rel < COVISIBLE_GATE
    return {
        "projected": int(inside.sum()),
        "covisible": int(both.sum()),
        "covisible_fraction": float(both.mean()) if len(both) else 0.0,
        "median_rel_error": float(np.median(rel[both])) if both.any() else float("inf"),
    }
