"""Atomic checkpoint writes: the target path only ever holds a complete file.

temp file in the target's directory -> torch.save -> flush + fsync -> os.replace over the
target -> fsync of the directory (so the rename itself survives a power cut). A crash
at any point leaves either the previous checkpoint or the new one at the target, plus
at worst a `<name>.<writer>.tmp` leftover that prepare_resume quarantines.

Before writing, the free space of the target's filesystem is checked against the bytes the
state needs (its tensors plus a margin): a save that cannot fit fails at once, naming the path
and the numbers, and the previous checkpoint stays as it was.

One state under several names (last, best, final, numbered): `link_on_master` gives the file a
second name as a hard link (no second copy on disk, no second write), atomically like a save.
Files are never changed in place (a save replaces the name with a new file), so a linked file
keeps its content whatever happens to its other names, and moving one name into quarantine
leaves the others untouched. Where hard links are impossible the file is copied instead.
"""

from __future__ import annotations

import os
import shutil
import socket
import threading
from pathlib import Path

import torch
from torch.utils.serialization import config as serialization_config

from mapanything_ext.checkpoint.format import stamp, tensor_manifest
from mapanything_ext.cluster import distributed as dist

# Beyond the tensors' bytes: the pickled structure, zip headers and alignment, the config
# (about 1 MB for MapAnything's ~3,000 tensors with their optimizer state).
SIZE_MARGIN_BYTES = 4 * 2**20
SIZE_MARGIN_FRACTION = 0.01


class CheckpointWriteError(OSError):
    """A checkpoint could not be written; the previous file at the target is untouched."""


def temp_path_for(path: Path) -> Path:
    """A temporary name no other writer can have (host and pid), ending in .tmp."""
    return path.with_name(f"{path.name}.{socket.gethostname()}-{os.getpid()}.tmp")


def check_free_space(obj: dict, path: Path) -> int:
    """Bytes the state needs; raises CheckpointWriteError when the filesystem has fewer free."""
    tensor_bytes = tensor_manifest(obj)["num_bytes"]
    needed = int(tensor_bytes * (1 + SIZE_MARGIN_FRACTION)) + SIZE_MARGIN_BYTES
    free = shutil.disk_usage(path.parent).free
    if free < needed:
        raise CheckpointWriteError(
            f"not enough free disk space to write checkpoint {path}: it needs about {needed:,} bytes "
            f"({needed / 1e9:.2f} GB), the filesystem has {free:,} bytes free. Nothing was written; the previous "
            f"file at that path (if any) is untouched. Free space or move output_dir."
        )
    return needed


def save_on_master(obj: dict, path, keep_previous_as=None, before_rename=None) -> Path | None:
    """Write obj atomically to path on global rank 0; other ranks do nothing (and return None).
    keep_previous_as: the file path held before keeps this name (a hard link: no copy), so one older
    state survives a damaged new one; without hard links it is not kept. before_rename(): called
    with the temporary file complete, before it takes the name (fault injection)."""
    if dist.get_rank() != 0:
        return None
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    check_free_space(obj, path)
    tmp = temp_path_for(path)
    # The zip records' CRC-32 is our integrity record: make sure torch computes it.
    serialization_config.save.compute_crc32 = True
    retired = None
    try:
        with open(tmp, "wb") as handle:
            torch.save(stamp(obj), handle)
            handle.flush()
            os.fsync(handle.fileno())
        if before_rename is not None:
            before_rename()
        retired = _retire(path)
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except (OSError, RuntimeError) as err:  # leave nothing of ours behind: the temp file, the retired name
        _remove_quietly(tmp)
        if retired is not None:
            _remove_quietly(retired)
        raise CheckpointWriteError(
            f"could not write checkpoint {path}: {err}. The previous file at that path (if any) is untouched."
        ) from err
    if retired is not None and keep_previous_as is not None:
        os.replace(retired, keep_previous_as)
        _fsync_dir(path.parent)
    elif retired is not None:
        # Freeing a multi-GB file's blocks takes ~1 s on some filesystems: do it off the training path.
        threading.Thread(target=_remove_quietly, args=(retired,), daemon=True).start()
    return path


def link_on_master(source, path) -> Path | None:
    """Give rank 0's finished checkpoint `source` the name `path` too (a hard link, else a copy),
    atomically: path holds its old file or the new one, never a partial one."""
    if dist.get_rank() != 0:
        return None
    source, path = Path(source), Path(path)
    tmp = temp_path_for(path)
    retired = None
    try:
        _remove_quietly(tmp)
        try:
            os.link(source, tmp)
        except OSError:  # no hard links here (some network filesystems): a full copy, fsynced
            _check_room_for_copy(source, tmp)
            shutil.copyfile(source, tmp)
            with open(tmp, "rb+") as handle:
                os.fsync(handle.fileno())
        retired = _retire(path)
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except OSError as err:
        _remove_quietly(tmp)
        if retired is not None:
            _remove_quietly(retired)
        raise CheckpointWriteError(f"could not give checkpoint {source} the name {path}: {err}. The previous file "
                                   f"at that path (if any) is untouched.") from err
    if retired is not None:
        threading.Thread(target=_remove_quietly, args=(retired,), daemon=True).start()
    return path


def _check_room_for_copy(source: Path, tmp: Path) -> None:
    needed = int(source.stat().st_size * (1 + SIZE_MARGIN_FRACTION)) + SIZE_MARGIN_BYTES
    free = shutil.disk_usage(tmp.parent).free
    if free < needed:
        raise OSError(f"no hard links on this file system, and a copy of {source.name} needs about {needed:,} bytes "
                      f"while {free:,} are free")


def _retire(path: Path) -> Path | None:
    """Keep the previous checkpoint's data alive under a second name (a hard link, instant) so the
    rename does not free its blocks; the caller deletes that name afterwards. The name ends in .tmp:
    if the process dies first, prepare_resume quarantines it like any other leftover."""
    if not path.exists():
        return None
    retired = path.with_name(f"{path.name}.retired-{socket.gethostname()}-{os.getpid()}.tmp")
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
