"""The encoder's image normalisation (DINOv2's: ImageNet mean and std), shared by the loader's
workers (datasets/base.py) and the device (datasets/device_geometry.py), so both give the same bits."""

from __future__ import annotations

import numpy as np

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)

# (pixel / 255 - mean) / std in float32 for every 8-bit value of each channel: the same float32
# operations as on the whole image, done once.
NORMALISE_LUT = np.stack([(np.arange(256, dtype=np.float32) / 255.0 - IMAGENET_MEAN[c]) / IMAGENET_STD[c]
                          for c in range(3)])


def normalise_image(rgb: np.ndarray) -> np.ndarray:
    """uint8 (H, W, 3) -> float32 (3, H, W) normalised for the encoder (ImageNet mean and std)."""
    out = np.empty((3,) + rgb.shape[:2], dtype=np.float32)
    for c in range(3):
        np.take(NORMALISE_LUT[c], rgb[..., c], out=out[c])
    return out
