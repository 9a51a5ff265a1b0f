"""OPV2V depth PNGs <-> metres. One decoder, chosen by the PNG's mode.

  mode 'L' (8-bit, one channel)   HEAL's OPV2V-H convention: pixel value = z-depth in metres
                                  (HEAL reads it with PIL and uses ToTensor(img) * 255 as metres;
                                  inferred from its code, 1 m steps, 255 m at most)
  mode 'RGB' (8-bit, 3 channels)  CARLA's depth-camera encoding, 24 bits over 1000 m:
                                  metres = 1000 * (R + 256 G + 65536 B) / (256^3 - 1)
                                  (sub-millimetre steps; what our synthetic generator writes)

0 means invalid (sky / no return) in both. Anything else is an error naming the file.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from mapanything_ext.datasets.base import BadSampleError
from mapanything_ext.datasets.png_io import read_png8

CARLA_FAR_M = 1000.0
_CARLA_SCALE = 256**3 - 1


class DepthFormatError(BadSampleError):
    """A depth PNG in a mode or size we do not know how to read."""


def decode_depth(path, expected_size: tuple[int, int] | None = None) -> np.ndarray:
    """Depth PNG -> float32 (H, W) z-depth in metres; expected_size is (width, height).

    Files are decoded by png_io.read_png8 (OpenCV for 8-bit PNGs, else Pillow: same bytes)."""
    path = Path(path)
    try:
        mode, data = read_png8(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"depth file missing: {path}") from None
    except OSError as err:
        raise DepthFormatError(f"depth file unreadable: {path}: {err}") from None
    size = (data.shape[1], data.shape[0]) if data.ndim >= 2 else data.shape
    if expected_size is not None and tuple(size) != tuple(expected_size):
        raise DepthFormatError(f"depth file {path} is {size[0]}x{size[1]}, expected {expected_size[0]}x{expected_size[1]}")
    if mode == "L":
        return data.astype(np.float32)
    if mode == "RGB":
        return carla_code_to_metres(data)
    raise DepthFormatError(
        f"depth file {path} has PNG mode {mode!r}; expected 'L' (8-bit metres, HEAL) or 'RGB' (CARLA 24-bit)"
    )


def carla_code_to_metres(rgb: np.ndarray) -> np.ndarray:
    """uint8 (..., 3) RGB in CARLA's 24-bit encoding -> float32 metres.

    The same numbers as float32(1000.0 * (R + 256 G + 65536 B) / (256^3 - 1)) in float64, with
    the 24-bit code built by shifts in int32 (exact) rather than int64 arithmetic."""
    code = rgb[..., 2].astype(np.int32)
    code <<= 8
    code |= rgb[..., 1]
    code <<= 8
    code |= rgb[..., 0]
    return (CARLA_FAR_M * code / _CARLA_SCALE).astype(np.float32)


def encode_depth_carla(depth_m: np.ndarray) -> Image.Image:
    """float metres (H, W) -> RGB PNG image in CARLA's 24-bit encoding (0 stays 0)."""
    code = np.rint(np.clip(depth_m, 0.0, CARLA_FAR_M) / CARLA_FAR_M * _CARLA_SCALE).astype(np.int64)
    rgb = np.stack([code % 256, (code // 256) % 256, code // 65536], axis=-1).astype(np.uint8)
    return Image.fromarray(rgb, mode="RGB")


def encode_depth_heal8(depth_m: np.ndarray) -> Image.Image:
    """float metres (H, W) -> 8-bit PNG image, pixel = metres (HEAL convention; > 255 m becomes 0)."""
    metres = np.rint(depth_m)
    metres[(metres > 255) | (metres < 0)] = 0
    return Image.fromarray(metres.astype(np.uint8), mode="L")
