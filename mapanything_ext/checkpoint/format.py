"""What every checkpoint we write carries besides the training state.

Integrity: torch.save writes a zip archive whose every record (pickle, each tensor's
bytes) carries a CRC-32 that torch computes anyway while writing; torch.load never
checks it, verify_checkpoint does (streaming, so a 15 GB file is read once, in
chunks). On top, a manifest of the tensors (count and total bytes) catches a file that
is a valid archive of the wrong content, and `format_version` names the layout.
"""

from __future__ import annotations

import torch

FORMAT_VERSION = 1
REQUIRED_KEYS = ("model", "epoch", "args", "format_version", "integrity")


def iter_tensors(obj):
    """Every tensor inside nested dicts / lists / tuples, in a stable order."""
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for key in obj:
            yield from iter_tensors(obj[key])
    elif isinstance(obj, (list, tuple)):
        for item in obj:
            yield from iter_tensors(item)


def tensor_manifest(obj) -> dict:
    count = nbytes = 0
    for tensor in iter_tensors(obj):
        count += 1
        nbytes += tensor.numel() * tensor.element_size()
    return {"method": "zip-crc32+manifest", "num_tensors": count, "num_bytes": nbytes}


def stamp(obj: dict) -> dict:
    """obj plus format version and integrity manifest (a new dict; obj is not changed)."""
    stamped = {k: v for k, v in obj.items() if k not in ("format_version", "integrity")}
    stamped["format_version"] = FORMAT_VERSION
    stamped["integrity"] = tensor_manifest(stamped)
    return stamped
