"""Atomic checkpoint writes: the target path only ever holds a complete file.

temp file in the target's directory -> torch.save -> flush + fsync -> os.replace over the
target -> fsync of the directory (so the rename itself survives a power cut). A crash
at any point leaves either the previous checkpoint or the new one at the target, plus
at worst a `<name>.tmp` leftover that prepare_resume quarantines.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

import torch
from torch.utils.serialization import config as serialization_config

from mapanything_ext import distributed as dist
from mapanything_ext.checkpoint.format import stamp


class CheckpointWriteError(OSError):
    """A checkpoint could not be written; the previous file at the target is untouched."""


def temp_path_for(path: Path) -> Path:
    return path.with_name(path.name + ".tmp")


def save_on_master(obj: dict, path) -> Path | None:
    """Write obj atomically to path on global rank 0; other ranks do nothing (and return None)."""
    if dist.get_rank() != 0:
        return None
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path_for(path)
    # The zip records' CRC-32 is our integrity record: make sure torch computes it.
    serialization_config.save.compute_crc32 = True
    try:
        with open(tmp, "wb") as handle:
            torch.save(stamp(obj), handle)
            handle.flush()
            os.fsync(handle.fileno())
        retired = _retire(path)
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except (OSError, RuntimeError) as err:
        _remove_quietly(tmp)
        raise CheckpointWriteError(
            f"could not write checkpoint {path}: {err}. The previous file at that path (if any) is untouched."
        ) from err
    if retired is not None:
        # Freeing a multi-GB file's blocks takes ~1 s on some filesystems: do it off the training path.
        threading.Thread(target=_remove_quietly, args=(retired,), daemon=True).start()
    return path


def _retire(path: Path) -> Path | None:
    """Keep the previous checkpoint's data alive under a second name (a hard link, instant) so the
    rename does not free its blocks; the caller deletes that name afterwards. The name ends in .tmp:
    if the process dies first, prepare_resume quarantines it like any other leftover."""
    if not path.exists():
        return None
    retired = path.with_name(path.name + f".retired-{os.getpid()}.tmp")
    _remove_quietly(retired)
    try:
        os.link(path, retired)
    except OSError:  # no hard links on this filesystem: the rename frees the blocks inline
        return None
    return retired


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove_quietly(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass
