"""Repair of a compile cache folder at a job's start: what a killed or crashed job left broken.

Inductor loads what it finds and fails on a broken file: a C++ kernel library cut short by a SIGKILL
during its build (its ELF section table lies beyond the file's end), a truncated Python or JSON file.
Those are removed and listed; damaged pickled entries (FX graph, AOTAutograd, Dynamo's profile)
Inductor skips itself; a C++ library that another process is building (its Inductor lock is held)
is left alone; temporary files of an atomic write are removed once no live writer can still rename
them. `prepare` also refuses a folder that cannot be made or whose file system refuses flock
(Lustre without `flock`), which Inductor's locks need.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import struct
import time
from pathlib import Path

# A directory holding this file is a cache (https://bford.info/cachedir/): backup tools skip it, and
# so do check_ckpt and everything else here that walks a run folder.
TAG_NAME = "CACHEDIR.TAG"
_TAG = ("Signature: 8a477f597d28d172789f06886806bc55\n"
        "# torch.compile caches of mapanything_ext (train_params.compile_cache); delete to clear.\n")
_ELF_SUFFIXES = (".so", ".cubin", ".hsaco", ".o")
_JSON_SUFFIXES = (".json", ".best_config")
# Temporary files of an atomic write (Inductor: .<pid>.<thread>.tmp; Triton: tmp.pid_*): never read;
# removed once old enough that no live writer can still rename them.
_TEMPORARY = re.compile(r"^\.\d+\.\d+\.tmp$|^tmp\.pid_")
_TEMPORARY_AGE_S = 3600


def is_cache_dir(path: Path) -> bool:
    """True for a folder this module made (marked with CACHEDIR.TAG)."""
    return (Path(path) / TAG_NAME).is_file()


def check_folder(folder: Path) -> tuple[int, int, int, list[str]]:
    """Walk one rank's folder: (files, bytes, cached graphs, removed) after removing files that would
    fail when loaded (see the module docstring) and stale temporary files."""
    files = size = graphs = 0
    removed = []
    stale = time.time() - _TEMPORARY_AGE_S
    for dirpath, dirnames, filenames in os.walk(folder):
        here = Path(dirpath)
        for name in [d for d in dirnames if d == "locks" or _TEMPORARY.search(d)]:
            dirnames.remove(name)
            if name != "locks" and _mtime(here / name) < stale:
                shutil.rmtree(here / name, ignore_errors=True)
        for name in filenames:
            path = here / name
            if name.endswith(".lock") or name == TAG_NAME:
                continue
            try:
                stat = path.stat()
            except FileNotFoundError:  # removed meanwhile (another job sharing the folder)
                continue
            if _TEMPORARY.search(name):
                if stat.st_mtime < stale:
                    _remove(path)
                continue
            problem = _problem(path, stat.st_size)
            if problem:
                if name.endswith(".so"):
                    if not _remove_if_still_broken(folder, path):
                        continue  # built meanwhile, or being built now, by another process
                else:
                    _remove(path)
                removed.append(f"{path.relative_to(folder)} ({problem})")
                continue
            files += 1
            size += stat.st_size
            graphs += path.relative_to(folder).parts[0] == "fxgraph"
    return files, size, graphs, removed


def prepare(root: Path, folder: Path) -> str | None:
    """Create the folders (the root tagged as a cache); None if usable, else why not."""
    parts = folder.relative_to(root).parts
    chain = [root] + [root.joinpath(*parts[:i]) for i in range(1, len(parts) + 1)]  # root down to folder
    made = [path for path in chain if not path.exists() and not path.is_symlink()]
    try:
        folder.mkdir(parents=True, exist_ok=True)
        for path in made:  # ours, made now: nobody else may write code into them
            path.chmod(0o700)
        tag = root / TAG_NAME
        if not tag.is_file():
            tag.write_text(_TAG)
    except OSError as err:
        return f"cannot create it: {err}"
    if problem := unsafe(chain):
        return problem
    probe = folder / f".flock-probe-{os.getpid()}"
    try:
        with open(probe, "w") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            fcntl.flock(handle, fcntl.LOCK_UN)
    except OSError as err:
        return f"its file system refuses file locks (flock: {err.strerror or err}), which Inductor's cache needs"
    finally:
        probe.unlink(missing_ok=True)
    return None


def unsafe(paths: list[Path]) -> str | None:
    """Why code must not be loaded from these folders (Inductor and Triton import what they find there):
    a symbolic link, a folder of another user, or one that group or others may write; else None."""
    for path in paths:
        if path.is_symlink():
            return f"{path} is a symbolic link: the cache runs code from it, so it must be a folder of yours"
        status = path.stat()
        if status.st_uid != os.geteuid():
            return (f"{path} belongs to uid {status.st_uid}, not to you (uid {os.geteuid()}): the cache runs code "
                    f"from it")
        if status.st_mode & 0o022:
            return (f"{path} is writable by group or others (mode {oct(status.st_mode & 0o777)}): the cache runs "
                    f"code from it; chmod go-w it if only you write there")
    return None


def _problem(path: Path, size: int) -> str | None:
    """Why loading this cache file would fail, or None."""
    name = path.name
    try:
        if name.endswith(_ELF_SUFFIXES):
            return _elf_problem(path, size)
        if name.endswith(".py"):
            source = path.read_bytes()
            if not source:
                return "empty"
            compile(source, str(path), "exec", dont_inherit=True)
        elif name.endswith(_JSON_SUFFIXES):
            json.loads(path.read_bytes())
    except (SyntaxError, ValueError) as err:  # json.JSONDecodeError and UnicodeDecodeError are ValueErrors
        return f"{type(err).__name__}: {str(err).splitlines()[0][:80]}"
    return None


def _elf_problem(path: Path, size: int) -> str | None:
    """A shared library or kernel binary cut short: its section table (at the end) lies beyond the file."""
    with open(path, "rb") as handle:
        head = handle.read(64)
    if len(head) < 52 or head[:4] != b"\x7fELF":
        return "empty" if not head else "not a complete ELF file"
    order = "<" if head[5] == 1 else ">"
    if head[4] == 2:
        (offset,) = struct.unpack_from(order + "Q", head, 0x28)
        entry, count = struct.unpack_from(order + "HH", head, 0x3A)
    else:
        (offset,) = struct.unpack_from(order + "I", head, 0x20)
        entry, count = struct.unpack_from(order + "HH", head, 0x2E)
    if offset + entry * count > size:
        return f"truncated: {size} bytes, its section table ends at byte {offset + entry * count}"
    return None


def _remove_if_still_broken(folder: Path, library: Path) -> bool:
    """Remove a broken C++ kernel library under Inductor's own lock for it (the one its build holds);
    False while another process holds that lock, or when the library is whole by now."""
    lock = folder / "locks" / (library.name.split(".")[0] + ".lock")
    try:
        lock.parent.mkdir(exist_ok=True)
        with open(lock, "a") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return False
            try:
                if not _problem(library, library.stat().st_size):
                    return False
                _remove(library)
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)
    except OSError:
        return False
    return True


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return time.time()


def _remove(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass
