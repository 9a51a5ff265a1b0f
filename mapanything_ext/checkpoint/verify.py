"""Is a checkpoint file good enough to resume from? One reason when it is not.

Checks, cheapest first: exists and non-empty; is a zip archive as torch.save writes
(else: text, legacy or truncated file); every record's CRC-32 matches (streamed: bit
rot, a flipped byte, a torn write); loads with weights_only=True and mmap=True (a
pickle that would run code is refused here, never executed; tensors stay on disk);
is one of our checkpoints (required keys, format version); the tensor manifest
matches; every floating tensor is finite; epoch and position are in range.

Only such a proven content fault makes a file invalid. An error of the machine while reading (an
OSError such as EIO or ESTALE on NFS, ENOMEM from mmap under `ulimit -v` or Slurm's VSizeFactor, a
MemoryError) says nothing about the file: it is retried (READ_ATTEMPTS, a second apart), then the
result says `read_error` (valid False), and nothing may quarantine the file for it.
"""

from __future__ import annotations

import errno
import os
import pickle
import struct
import time
import zipfile
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from mapanything_ext.checkpoint.format import FORMAT_VERSION, REQUIRED_KEYS, iter_tensors, tensor_manifest


@dataclass
class CheckResult:
    path: str
    valid: bool
    reason: str
    epoch: int | None = None
    size: int = 0
    # The position it resumes at (None for files without one): newer = larger (global_step, epoch_complete).
    global_step: int | None = None
    epoch_complete: bool | None = None
    # The machine failed to read it (OS or memory error), which proves nothing about its content.
    read_error: bool = False
    # A whole archive that is not in our format (MapAnything's own checkpoints, a plain state dict).
    foreign: bool = False

    def position_key(self) -> tuple:
        return (self.global_step if self.global_step is not None else -1, bool(self.epoch_complete))

    def to_dict(self) -> dict:
        return asdict(self)


READ_ATTEMPTS = 3
# torch reports some OS errors of a load (mmap) inside a RuntimeError's text only.
_OS_ERROR_TEXTS = tuple(os.strerror(code) for code in (errno.ENOMEM, errno.EIO, errno.ESTALE, errno.EAGAIN,
                                                       errno.EINTR, errno.ENOBUFS, errno.ETIMEDOUT))


class CheckpointReadError(OSError):
    """The machine could not read the file (not a fault of the file): never a reason to quarantine it."""


def verify_checkpoint(path) -> CheckResult:
    """The file's verdict; a read error of the machine is retried, then reported as `read_error`."""
    for attempt in range(READ_ATTEMPTS):
        try:
            return _verify_once(Path(path))
        except CheckpointReadError as err:
            failure = err
            if attempt + 1 < READ_ATTEMPTS:
                time.sleep(1.0)
    size = Path(path).stat().st_size if Path(path).is_file() else 0
    return CheckResult(str(path), False, f"read error (not a fault of the file; {READ_ATTEMPTS} attempts): "
                                         f"{failure}", size=size, read_error=True)


def _read_failure(err: BaseException) -> CheckpointReadError | None:
    """err as a read failure of the machine, or None when it speaks about the file's content."""
    if isinstance(err, MemoryError):
        # Its text is often empty: then say what a MemoryError is.
        return CheckpointReadError(f"MemoryError: {_first_line(err) if str(err).strip() else os.strerror(errno.ENOMEM)}")
    if isinstance(err, OSError) and err.errno is not None:
        return CheckpointReadError(f"{errno.errorcode.get(err.errno, err.errno)}: {err.strerror or err}")
    if isinstance(err, RuntimeError) and any(text in str(err) for text in _OS_ERROR_TEXTS):
        return CheckpointReadError(_first_line(err))
    return None


def _verify_once(path: Path) -> CheckResult:
    if not path.is_file():
        return CheckResult(str(path), False, "unreadable: no such file")
    size = path.stat().st_size
    if size == 0:
        return CheckResult(str(path), False, "truncated: empty file (0 bytes)", size=size)
    problem = archive_problem(path)
    if problem:
        return CheckResult(str(path), False, problem, size=size)
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as err:
        return CheckResult(str(path), False, f"not a checkpoint we wrote: refuses weights_only loading ({_first_line(err)})", size=size,
                           foreign=True)
    except Exception as err:  # torch raises RuntimeError/EOFError/... for damaged archives
        if failure := _read_failure(err):
            raise failure from err
        return CheckResult(str(path), False, f"unreadable: {_first_line(err)}", size=size)
    except MemoryError as err:
        raise _read_failure(err) from err
    problem = _content_problem(ckpt)
    foreign = not isinstance(ckpt, dict) or "format_version" not in ckpt or "integrity" not in ckpt
    epoch = ckpt.get("epoch") if isinstance(ckpt, dict) else None
    resume = ckpt.get("resume") if isinstance(ckpt, dict) else None
    resume = resume if isinstance(resume, dict) else {}
    return CheckResult(str(path), problem is None, problem or "ok", epoch if isinstance(epoch, int) else None, size,
                       resume.get("global_step"), resume.get("epoch_complete"), foreign=foreign)


def archive_problem(path: Path) -> str | None:
    """Whether the file is a whole torch zip archive (every record's CRC-32 checked); None when it is."""
    try:
        with zipfile.ZipFile(path) as archive:
            bad = first_bad_record(path, archive)
    except zipfile.BadZipFile:
        return "truncated or not a checkpoint: not a torch zip archive (torn write, text or legacy file)"
    except (OSError, MemoryError) as err:
        if failure := _read_failure(err):
            raise failure from err
        return f"unreadable: {err}"
    except EOFError as err:
        return f"unreadable: {err}"
    if bad is not None:
        return f"integrity mismatch: CRC-32 of record {bad!r} does not match (corrupted bytes)"
    return None


# Reads of 16 MiB in VERIFY_THREADS threads: a record's CRC-32 (zlib.crc32) and the positional reads release the
# GIL, so the check keeps its speed beside a busy main thread. zipfile.testzip's 1 MiB reads waited
# for the GIL at every chunk while a job's start traced its compiled parts (bench/bench_verify.py:
# two 1.6 GB files of 1,500 tensors on 2 cores, 18.2 s beside a busy Python thread before, 6.0 s now).
CRC_CHUNK = 16 << 20
VERIFY_THREADS = 8
_LOCAL_HEADER = struct.Struct("<4s22xHH")  # signature, then file name and extra field lengths at 26


def first_bad_record(path: Path, archive: zipfile.ZipFile) -> str | None:
    """The name of the first record whose bytes do not match its CRC-32 (or end early), else None."""
    infos = archive.infolist()
    if any(info.compress_type != zipfile.ZIP_STORED for info in infos):  # not torch.save's archive
        return archive.testzip()
    fd = os.open(path, os.O_RDONLY)
    try:
        matches = _in_threads(lambda info: _record_matches(fd, info), infos)
    finally:
        os.close(fd)
    return next((info.filename for info, ok in zip(infos, matches) if not ok), None)


def _in_threads(function, items: list) -> list:
    """function over items in VERIFY_THREADS threads, or in this one where no thread can start (an
    address space capped by ulimit -v or Slurm's VSizeFactor may have no room for their stacks)."""
    try:
        with ThreadPoolExecutor(VERIFY_THREADS) as pool:
            return list(pool.map(function, items))
    except RuntimeError as err:
        if "can't start new thread" not in str(err):
            raise
        return [function(item) for item in items]


def _record_matches(fd: int, info: zipfile.ZipInfo) -> bool:
    """Whether a stored record's bytes, read from its local header on, have its CRC-32."""
    header = os.pread(fd, _LOCAL_HEADER.size, info.header_offset)
    if len(header) < _LOCAL_HEADER.size:
        return False
    signature, name_length, extra_length = _LOCAL_HEADER.unpack(header)
    if signature != b"PK\x03\x04":
        return False
    start = info.header_offset + _LOCAL_HEADER.size + name_length + extra_length
    crc = done = 0
    while done < info.file_size:
        data = os.pread(fd, min(CRC_CHUNK, info.file_size - done), start + done)
        if not data:  # the file ends inside the record
            return False
        crc = zlib.crc32(data, crc)
        done += len(data)
    return crc == info.CRC


def _all_finite(tensors: list[torch.Tensor]) -> bool:
    """No NaN or Inf in any of the tensors, checked by numpy in VERIFY_THREADS threads of a share of
    the tensors each (numpy releases the GIL; torch's isfinite ran at ~1 GB/s here, numpy's >10)."""
    shares = [tensors[i::VERIFY_THREADS] for i in range(VERIFY_THREADS)]
    return all(_in_threads(lambda share: all(_finite(tensor) for tensor in share), shares))


def _finite(tensor: torch.Tensor) -> bool:
    if tensor.dtype == torch.bfloat16:  # no numpy dtype: Inf and NaN have every exponent bit set
        bits = tensor.view(torch.int16).numpy()
        return not bool(np.any((bits & 0x7F80) == 0x7F80))
    if tensor.dtype in (torch.float16, torch.float32, torch.float64):
        return bool(np.isfinite(tensor.numpy()).all())
    return bool(torch.isfinite(tensor).all())


def _content_problem(ckpt) -> str | None:
    if not isinstance(ckpt, dict):
        return f"not a checkpoint: top-level object is {type(ckpt).__name__}, not a dict"
    missing = [k for k in REQUIRED_KEYS if k not in ckpt]
    if missing:
        return f"missing required keys: {', '.join(missing)}"
    if ckpt["format_version"] != FORMAT_VERSION:
        return f"unknown format_version {ckpt['format_version']!r} (this code reads {FORMAT_VERSION})"
    body = {k: v for k, v in ckpt.items() if k not in ("format_version", "integrity")}
    expected = ckpt["integrity"]
    actual = tensor_manifest({**body, "format_version": FORMAT_VERSION})
    if not isinstance(expected, dict) or any(expected.get(k) != actual[k] for k in ("num_tensors", "num_bytes")):
        return f"integrity mismatch: manifest says {expected}, file holds {actual}"
    floats = [tensor for tensor in iter_tensors(body) if tensor.is_floating_point()]
    if not _all_finite(floats):
        return "non-finite tensors: NaN or Inf in the saved state"
    return _range_problem(ckpt)


def _range_problem(ckpt: dict) -> str | None:
    epoch = ckpt["epoch"]
    if not isinstance(epoch, int) or epoch < 0:
        return f"epoch out of range: {epoch!r}"
    args = ckpt.get("args")
    max_epochs = args.get("train_params", {}).get("epochs") if isinstance(args, dict) else None
    if isinstance(max_epochs, int) and epoch > max_epochs:
        return f"epoch out of range: {epoch} > train_params.epochs={max_epochs}"
    resume = ckpt.get("resume")
    if isinstance(resume, dict):
        # consumed: global batches of the epoch done; iteration: the same per rank, in older files
        for key in ("consumed", "iteration", "global_step"):
            if not isinstance(resume.get(key, 0), int) or resume.get(key, 0) < 0:
                return f"step out of range: {key} {resume.get(key)!r}"
    return None


def _first_line(err: Exception) -> str:
    text = str(err).strip().splitlines()
    return text[0][:200] if text else type(err).__name__
