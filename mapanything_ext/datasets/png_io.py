"""PNG decoding for the OPV2V readers: OpenCV when it is installed, Pillow otherwise.

OPV2V's files are plain 8-bit PNGs (camera: RGB, depth: RGB or grey). For exactly those
(IHDR bit depth 8, colour type 2 or 0) `read_png8` decodes with `cv2.imdecode` (libpng, a
single call, no per-row Python work; 2x faster than Pillow on our synthetic PNGs, about
the same on real OPV2V camera PNGs, whose cost is zlib itself). PNG decoding is lossless,
so both decoders give the same bytes (tests/test_dataset_fast_path.py checks it). Every
other file, and any file OpenCV cannot read, goes to Pillow, whose errors the callers turn
into their messages.

Which decoder runs: OpenCV (`opencv-python-headless`, a dependency of this package and of
MapAnything) if `import cv2` works, else Pillow; MAPANYTHING_EXT_PNG_DECODER=pillow forces
Pillow. `PNG_DECODER` says which one this process uses.
"""

from __future__ import annotations

import io
import os
import struct

import numpy as np
from PIL import Image

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_MODES = {2: "RGB", 0: "L"}  # IHDR colour type -> Pillow mode, for bit depth 8


def _load_cv2():
    if os.environ.get("MAPANYTHING_EXT_PNG_DECODER", "").lower() == "pillow":
        return None
    try:
        import cv2
    except ImportError:
        return None
    return cv2


_cv2 = _load_cv2()
PNG_DECODER = "opencv" if _cv2 is not None else "pillow"


def _png8_header(data: bytes) -> tuple[str, int, int] | None:
    """(mode, width, height) of an 8-bit RGB or grey PNG, else None."""
    if len(data) < 33 or data[:8] != _PNG_SIGNATURE or data[12:16] != b"IHDR":
        return None
    width, height, bit_depth, colour_type = struct.unpack(">IIBB", data[16:26])
    if bit_depth != 8 or colour_type not in _MODES:
        return None
    return _MODES[colour_type], width, height


def _decode_cv2(data: bytes) -> tuple[str, np.ndarray] | None:
    """OpenCV decode of an 8-bit RGB/grey PNG as (mode, BGR or grey array), None when not eligible.

    IMREAD_COLOR drops a tRNS alpha, as Pillow's RGB does, and EXIF orientation is ignored, as
    Pillow does. No OpenCV function that runs threads is called (safe in forked loader workers)."""
    header = _png8_header(data)
    if _cv2 is None or header is None:
        return None
    mode, width, height = header
    flag = _cv2.IMREAD_UNCHANGED if mode == "L" else _cv2.IMREAD_COLOR | _cv2.IMREAD_IGNORE_ORIENTATION
    array = _cv2.imdecode(np.frombuffer(data, dtype=np.uint8), flag)
    expected = (height, width, 3) if mode == "RGB" else (height, width)
    if array is None or array.shape != expected or array.dtype != np.uint8:
        return None
    return mode, array


def read_png8(path) -> tuple[str, np.ndarray]:
    """(Pillow mode, uint8 array) of an image file: OpenCV for 8-bit RGB/grey PNGs, else Pillow.

    The array is (H, W, 3) for 'RGB', (H, W) for 'L', whatever Pillow gives for other modes.
    Raises FileNotFoundError, or OSError when neither decoder can read the file."""
    with open(path, "rb") as f:
        data = f.read()
    decoded = _decode_cv2(data)
    if decoded is not None:
        mode, array = decoded
        return mode, (array[..., ::-1] if mode == "RGB" else array)  # BGR -> RGB as a view
    with Image.open(io.BytesIO(data)) as img:
        img.load()
        return img.mode, np.asarray(img)


def read_rgb(path) -> Image.Image:
    """An image file as an RGB Pillow image (Pillow's convert('RGB') for anything OpenCV does not take)."""
    with open(path, "rb") as f:
        data = f.read()
    decoded = _decode_cv2(data)
    if decoded is not None and decoded[0] == "RGB":
        bgr = decoded[1]
        # Pillow unpacks the BGR bytes into its own RGB layout in the one copy it makes anyway.
        return Image.frombuffer("RGB", (bgr.shape[1], bgr.shape[0]), bgr, "raw", "BGR", 0, 1)
    with Image.open(io.BytesIO(data)) as img:
        return img.convert("RGB")
