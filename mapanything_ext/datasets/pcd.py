"""OPV2V's LiDAR sweeps (`<frame>.pcd`): points in the LiDAR's own frame, CARLA/UE axes (x forward,
y right, z up, metres), placed in the world by the frame YAML's `lidar_pose`.

Training never reads them; the preflight does, to check decoded depth against an independent sensor
(preflight/lidar_depth.py). PCD files come as `DATA ascii` or `DATA binary` with float fields x, y, z
(and usually intensity); both are read. The synthetic generator writes ascii.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


class PCDError(ValueError):
    """A .pcd file this reader cannot read (names the file and what is wrong)."""


def read_pcd_xyz(path) -> np.ndarray:
    """(N, 3) float64 points of a PCD file, in the sensor's frame."""
    path = Path(path)
    raw = path.read_bytes()
    header, offset = {}, 0
    while "DATA" not in header:
        end = raw.find(b"\n", offset)
        if end < 0:
            raise PCDError(f"{path}: no DATA line in the PCD header")
        line = raw[offset:end].decode("ascii", errors="replace").strip()
        offset = end + 1
        if line and not line.startswith("#"):
            key, _, value = line.partition(" ")
            header[key.upper()] = value.split()
    fields = [f.lower() for f in header.get("FIELDS", [])]
    if not {"x", "y", "z"} <= set(fields):
        raise PCDError(f"{path}: fields {fields} lack x, y, z")
    count = int(header.get("POINTS", ["0"])[0])
    kind = header["DATA"][0].lower()
    if kind == "ascii":
        values = np.loadtxt(raw[offset:].decode("ascii").splitlines(), dtype=np.float64, ndmin=2)
    elif kind == "binary":
        sizes = [int(s) for s in header.get("SIZE", [])]
        types = header.get("TYPE", [])
        if any(t != "F" for t in types) or any(s != 4 for s in sizes):
            raise PCDError(f"{path}: binary PCD with fields other than float32 ({types}, {sizes})")
        values = np.frombuffer(raw, dtype="<f4", count=count * len(fields), offset=offset).reshape(count, len(fields))
    else:
        raise PCDError(f"{path}: DATA {kind} is not supported (ascii or binary)")
    points = values[:, [fields.index("x"), fields.index("y"), fields.index("z")]].astype(np.float64)
    return points[np.isfinite(points).all(axis=1)]


def write_pcd_ascii(path, points: np.ndarray, intensity: np.ndarray) -> None:
    """Points (N, 3) and intensity (N,) as an ascii PCD, as OPV2V's sweeps are written."""
    lines = [f"{x:.3f} {y:.3f} {z:.3f} {i:.3f}" for (x, y, z), i in zip(points, intensity)]
    header = ("# .PCD v0.7 - Point Cloud Data file format\nVERSION 0.7\nFIELDS x y z intensity\nSIZE 4 4 4 4\n"
              f"TYPE F F F F\nCOUNT 1 1 1 1\nWIDTH {len(lines)}\nHEIGHT 1\nVIEWPOINT 0 0 0 1 0 0 0\n"
              f"POINTS {len(lines)}\nDATA ascii\n")
    Path(path).write_text(header + "\n".join(lines) + "\n")
