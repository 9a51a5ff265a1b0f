"""MapAnything's training-data augmentation, drawn from the sample's own generator.

`transform` (a view's colours, after its crop), with MapAnything's names and probabilities:
  imgnorm                         none: the image is only normalised (MapAnything's test sets)
  colorjitter                     always a colour jitter of brightness .5, contrast .5, saturation .5, hue .1
  colorjitter+grayscale+gaublur   with p .75 a colour jitter of brightness .3, contrast .4, saturation .2,
                                  hue .1; then with p .05 grey; then with p .05 a 5x5 Gaussian blur of
                                  sigma drawn in [0.1, 1.0] (MapAnything's training templates)

A colour jitter means what torchvision's ColorJitter means on a Pillow image: brightness, contrast and
saturation factors drawn uniformly in [max(0, 1 - x), 1 + x], a hue shift in [-h, h] of a turn, the four
applied in a random order, the first three with Pillow's ImageEnhance and the hue as a shift of the HSV hue
channel. The draws come from a numpy generator of (seed, sample, epoch, repetition), not from torch's
global generator as in MapAnything: a resumed epoch augments every sample exactly as before.

`aug_crop` (MapAnything's name): the image is scaled to cover its target size plus k pixels on each
side (k drawn in [0, aug_crop) per view; 0 or 1: off), then centre-cropped to the target: a random zoom.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageEnhance

TRANSFORMS = ("imgnorm", "colorjitter", "colorjitter+grayscale+gaublur")

# (brightness, contrast, saturation, hue) of each jitter, and the probability it is applied.
_STRONG_JITTER = ((0.5, 0.5, 0.5, 0.1), 1.0)
_TEMPLATE_JITTER = ((0.3, 0.4, 0.2, 0.1), 0.75)
_GREY_P, _BLUR_P, _BLUR_TAPS, _BLUR_SIGMA = 0.05, 0.05, 5, (0.1, 1.0)


def check_transform(name: str) -> str:
    if name not in TRANSFORMS:
        raise ValueError(f"unknown transform {name!r}: choose one of {', '.join(TRANSFORMS)} (MapAnything's names)")
    return name


def crop_margin(aug_crop: int, rng: np.random.Generator) -> int:
    """Pixels added to each side of the size the image is scaled to cover (MapAnything draws it only above 1)."""
    return int(rng.integers(0, aug_crop)) if aug_crop > 1 else 0


def apply_transform(name: str, image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """The view's image after the named transform (an RGB Pillow image either way)."""
    if name == "imgnorm":
        return image
    strengths, probability = _STRONG_JITTER if name == "colorjitter" else _TEMPLATE_JITTER
    if rng.random() < probability:
        image = colour_jitter(image, strengths, rng)
    if name == "colorjitter":
        return image
    if rng.random() < _GREY_P:
        image = image.convert("L").convert("RGB")
    if rng.random() < _BLUR_P:
        image = gaussian_blur(image, float(rng.uniform(*_BLUR_SIGMA)))
    return image


def colour_jitter(image: Image.Image, strengths, rng: np.random.Generator) -> Image.Image:
    brightness, contrast, saturation, hue = strengths
    factors = [rng.uniform(max(0.0, 1 - x), 1 + x) for x in (brightness, contrast, saturation)]
    shift = rng.uniform(-hue, hue)
    adjust = (lambda im: ImageEnhance.Brightness(im).enhance(factors[0]),
              lambda im: ImageEnhance.Contrast(im).enhance(factors[1]),
              lambda im: ImageEnhance.Color(im).enhance(factors[2]),
              lambda im: shift_hue(im, shift))
    for which in rng.permutation(4):
        image = adjust[which](image)
    return image


def shift_hue(image: Image.Image, turns: float) -> Image.Image:
    """Hue rotated by `turns` of a full circle (the hue channel is 8-bit and wraps around)."""
    hsv = np.array(image.convert("HSV"))
    delta = int(turns * 255) % 256  # truncated, as torchvision does; a negative shift wraps around
    hsv[..., 0] = (hsv[..., 0].astype(np.int16) + delta) % 256
    return Image.fromarray(hsv, "HSV").convert("RGB")


def gaussian_blur(image: Image.Image, sigma: float) -> Image.Image:
    """A separable 5-tap Gaussian of `sigma` pixels with mirrored borders, rounded back to 8 bits."""
    offsets = np.arange(_BLUR_TAPS) - _BLUR_TAPS // 2
    kernel = np.exp(-0.5 * (offsets / sigma) ** 2)
    kernel /= kernel.sum()
    pixels = np.asarray(image, dtype=np.float32)
    pad = _BLUR_TAPS // 2
    for axis in (0, 1):
        padded = np.pad(pixels, [(pad, pad) if a == axis else (0, 0) for a in range(3)], mode="reflect")
        length = pixels.shape[axis]
        pixels = sum(weight * np.take(padded, np.arange(i, i + length), axis=axis) for i, weight in enumerate(kernel))
    return Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8), "RGB")
