"""What a run leaves for people to read: console.log, log.txt, TensorBoard scalars."""

from __future__ import annotations

import json
import math
import os
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


def tee_console(output_dir: Path) -> None:
    """Copy stdout and stderr into <output_dir>/console.log (appending across resumes)."""
    log_file = open(output_dir / "console.log", "a", buffering=1, encoding="utf-8")
    sys.stdout = _Tee(sys.stdout, log_file)
    sys.stderr = _Tee(sys.stderr, log_file)


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
    tmp = log_path.with_suffix(".txt.tmp")
    tmp.write_text("\n".join(lines) + "\n")
    os.replace(tmp, log_path)


def _finite(record: dict) -> dict:
    return {k: (v if not isinstance(v, float) or math.isfinite(v) else str(v)) for k, v in record.items()}


class Scalars:
    """TensorBoard scalars on rank 0; a no-op elsewhere."""

    def __init__(self, output_dir: Path, enabled: bool):
        self._writer = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(log_dir=str(output_dir / "tensorboard"))

    def add(self, prefix: str, values: dict, step: int) -> None:
        if self._writer is None:
            return
        for key, value in values.items():
            if isinstance(value, (int, float)):
                self._writer.add_scalar(f"{prefix}/{key}", value, step)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
