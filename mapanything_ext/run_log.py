"""What a run leaves for people to read: console.log, log.txt, TensorBoard scalars."""

from __future__ import annotations

import json
import math
import os
import re
import socket
import sys
from pathlib import Path


class _Tee:
    """Writes to the original stream and to console.log (line-buffered, so a kill loses little)."""

    def __init__(self, stream, log_file):
        self._stream = stream
        self._log = log_file

    def write(self, text):
        self._stream.write(text)
        self._log.write(text)
        return len(text)

    def flush(self):
        self._stream.flush()
        self._log.flush()

    def isatty(self):
        return self._stream.isatty()

    def __getattr__(self, name):
        return getattr(self._stream, name)


def tee_console(output_dir: Path):
    """Copy stdout and stderr into <output_dir>/console.log (appending across resumes); returns the
    function that stops it (jobs of an in-process sweep must not write into each other's log)."""
    log_file = open(output_dir / "console.log", "a", buffering=1, encoding="utf-8")
    stdout, stderr = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = _Tee(stdout, log_file), _Tee(stderr, log_file)

    def stop() -> None:
        sys.stdout.flush()
        sys.stderr.flush()
        sys.stdout, sys.stderr = stdout, stderr
        log_file.close()

    return stop


def read_epoch_records(run_dir: Path) -> list[dict]:
    """The epoch records of a run's log.txt, oldest first."""
    log = Path(run_dir) / "log.txt"
    if not log.is_file():
        raise FileNotFoundError(f"no log.txt in {run_dir}: is it a training output folder?")
    return [json.loads(line) for line in log.read_text().splitlines() if line.strip()]


def append_epoch_record(log_path: Path, record: dict) -> None:
    """Write one JSON line per epoch; a replayed epoch (resume after a kill between the log
    write and the checkpoint) replaces its earlier line instead of duplicating it."""
    lines = []
    if log_path.exists():
        for line in log_path.read_text().splitlines():
            if line.strip() and json.loads(line).get("epoch") != record["epoch"]:
                lines.append(line)
    lines.append(json.dumps(_finite(record)))
    tmp = log_path.with_name(f"{log_path.name}.{socket.gethostname()}-{os.getpid()}.tmp")  # unique per writer
    tmp.write_text("\n".join(lines) + "\n")
    os.replace(tmp, log_path)


def _finite(record: dict) -> dict:
    return {k: (v if not isinstance(v, float) or math.isfinite(v) else str(v)) for k, v in record.items()}


class Scalars:
    """TensorBoard scalars on rank 0; a no-op elsewhere. Every scalar's x-axis is the global step
    (epoch scalars at the step that ended the epoch), so a resumed run given `resume_step` (the step
    of its checkpoint) hides whatever an earlier process wrote past that step: no step twice."""

    def __init__(self, output_dir: Path, enabled: bool, resume_step: int = 0):
        self._writer = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            purge = resume_step + 1 if resume_step else None
            self._writer = SummaryWriter(log_dir=str(output_dir / "tensorboard"), purge_step=purge)

    def add(self, prefix: str, values: dict, step: int) -> None:
        if self._writer is None:
            return
        for key, value in values.items():
            if isinstance(value, (int, float)):
                self._writer.add_scalar(f"{prefix}/{key}", value, step)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()


def report_failure(output_dir: Path, rank: int, world_size: int, err: BaseException) -> None:
    """Name this rank and the cause in console.log, whichever rank failed: a job killed for one
    rank's error (srun --kill-on-bad-exit) would otherwise leave only rank 0's view of it."""
    line = (f"[mapanything_ext] rank {rank} of {world_size} on {socket.gethostname()} (pid {os.getpid()}) "
            f"FAILED: {type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}\n")
    sys.stderr.write(line)  # rank 0's stderr is already copied into console.log
    sys.stderr.flush()
    if rank != 0 and Path(output_dir).is_dir():
        with open(Path(output_dir) / "console.log", "a", encoding="utf-8") as log:  # O_APPEND: whole lines
            log.write(line)


# Slurm's own lines, also where they follow a progress bar on the same line.
_SLURM_ERROR = re.compile(r"(srun: error: .*|slurmstepd[\w.-]*: error: .*|\*\*\* .*(CANCELLED|TIME LIMIT|OUT_OF_MEMORY).*"
                          r"|.*oom-kill.*)")


def report_previous_job(output_dir: Path) -> None:
    """At a (re)start under submitit: what Slurm said about how the previous job of this run ended
    (a task killed outright cannot say it itself), from that job's logs in <output_dir>/.submitit/."""
    folder = Path(output_dir) / ".submitit"
    current = os.environ.get("SLURM_JOB_ID")
    if not folder.is_dir():
        return
    jobs = sorted((p for p in folder.iterdir() if p.is_dir() and p.name != current), key=lambda p: p.stat().st_mtime)
    if not jobs:
        return
    lines = []
    for log in sorted(jobs[-1].glob("*_log.*")):
        lines += [m.group(0).strip() for m in map(_SLURM_ERROR.search, log.read_text(errors="replace").splitlines()) if m]
    if lines:
        print(f"[mapanything_ext] previous job {jobs[-1].name} of this run ended with:")
        for line in dict.fromkeys(lines):
            print(f"  {line}")
