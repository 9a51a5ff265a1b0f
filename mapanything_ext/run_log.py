"""What a run leaves for people to read: console.log, log.txt, TensorBoard scalars."""

from __future__ import annotations

import json
import math
import os
import re
import socket
import sys
from pathlib import Path

from mapanything_ext.console import say


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


def write_hydra_record(output_dir: Path, cfg) -> None:
    """<output_dir>/.hydra/{config,overrides,hydra}.yaml, as Hydra's output_subdir would write them, by
    the job that holds the run folder's lock (Hydra itself writes nothing there: configs/train.yaml)."""
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf

    if not HydraConfig.initialized():  # train() called from Python: no Hydra run to record
        return
    hydra_cfg = HydraConfig.get()
    folder = Path(output_dir) / ".hydra"
    folder.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(cfg, folder / "config.yaml")
    OmegaConf.save(OmegaConf.create(list(hydra_cfg.overrides.task)), folder / "overrides.yaml")
    OmegaConf.save(OmegaConf.create({"hydra": hydra_cfg}), folder / "hydra.yaml")


def read_epoch_records(run: Path) -> list[dict]:
    """The epoch records of a run's log.txt (a run folder, or the log file itself: ours or one written
    by MapAnything's own loop), oldest first."""
    log = Path(run) if Path(run).is_file() else Path(run) / "log.txt"
    if not log.is_file():
        raise FileNotFoundError(f"no log.txt in {run}: is it a training output folder?")
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
    """TensorBoard scalars on rank 0 (a no-op elsewhere), with MapAnything's tags and x-axis: the
    fractional epoch x 1000 (`epoch_1000x`, which lines up runs of different batch sizes). Every
    `accum_iter x print_freq` steps: `train_loss`, `train_grad_norm`, `train_lr` (`train_lr_<submodule>`
    per configured submodule), `train_iter` and `train_<term>` per loss term; after each evaluation
    `<test set>_<key>_avg/_med` at 1000 x the epochs trained. A resumed run given `resume_x` (the
    x of the step it continues with) hides whatever an earlier process wrote from there on: no point
    twice (the engine writes the finished epoch's test statistics at that x again)."""

    def __init__(self, output_dir: Path, enabled: bool, resume_x: int = 0, also=None):
        self._writer = None
        self._also = also  # another sink of the same scalars (wandb_log.WandbScalars), or None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            purge = resume_x if resume_x else None
            self._writer = SummaryWriter(log_dir=str(output_dir / "tensorboard"), purge_step=purge)

    def train_step(self, epoch_f: float, values, lrs: dict) -> None:
        x = int(epoch_f * 1000)
        scalars = {"train_loss": values.loss, "train_iter": x, **{f"train_{k}": v for k, v in lrs.items()},
                   **{f"train_{k}": v for k, v in values.details.items()}}
        if values.grad_norm is not None:
            scalars["train_grad_norm"] = values.grad_norm
        self._add(scalars, x)

    def test(self, epochs_trained: int, test_name: str, stats: dict) -> None:
        self._add({f"{test_name}_{k}": v for k, v in stats.items()}, 1000 * epochs_trained)

    def _add(self, scalars: dict, x: int) -> None:
        if self._writer is None:
            return
        numbers = {tag: value for tag, value in scalars.items() if isinstance(value, (int, float))}
        for tag, value in numbers.items():
            self._writer.add_scalar(tag, value, x)
        self._writer.flush()
        if self._also is not None:
            self._also.add(numbers, x)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
        if self._also is not None:
            self._also.close()


def test_statistic(record: dict, stat: str) -> float | None:
    """`<test set>_<stat>` of a log.txt record (ours or MapAnything's), or None. Loss terms end the same
    way (`<test set>_depth_loss_med` beside `<test set>_loss_med`): the shortest such key is the
    statistic itself."""
    keys = [key for key in record if key.endswith(f"_{stat}") and not key.startswith("train_")]
    return record[min(keys, key=len)] if keys else None


def test_loss_of(record: dict) -> float | None:
    """The test loss checkpoint-best follows (`<test set>_loss_med`) in a log.txt record, if any;
    `test_loss` in records written before the MapAnything recipe."""
    value = test_statistic(record, "loss_med")
    return value if value is not None else record.get("test_loss")


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
        say("mapanything_ext", f"previous job {jobs[-1].name} of this run ended with:\n" +
            "\n".join(f"  {line}" for line in dict.fromkeys(lines)))
