"""Where a run of three stages stands: one line per stage (or per run folder given).

    python -m mapanything_ext.status machine=<profile> [more training overrides ...]
    python -m mapanything_ext.status <run folder> [<run folder> ...]

A sweep's folder (one run folder per job, mapanything_ext/cluster/sweeps.py) is listed job by job.

Per stage: its state, from Slurm where it is reachable (`sacct` when the cluster keeps
accounting, `scontrol show job` otherwise, `squeue` for queued jobs) and from the run folder
(not started / queued / running / requeued N times / done / failed); the epoch and step
reached; the newest checkpoint (age, size; its structure read, not its CRC: `--verify` reads
every byte); the best test loss; the recent images/s; and an estimate of the time left.
Exit code 0 when nothing failed, 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from mapanything_ext.checkpoint import verify_checkpoint
from mapanything_ext.checkpoint.load import load_checkpoint
from mapanything_ext.checkpoint.quarantine import resume_order
from mapanything_ext.cluster.slurm_jobs import job_state
from mapanything_ext.run_log import read_epoch_records

STAGES = ("stage1", "stage2", "stage3")
_SLURM_STATES = {"PENDING": "queued", "CONFIGURING": "running", "RUNNING": "running", "COMPLETING": "running",
                 "COMPLETED": "done", "FAILED": "failed", "TIMEOUT": "failed", "CANCELLED": "failed",
                 "NODE_FAIL": "failed", "OUT_OF_MEMORY": "failed", "REQUEUED": "requeued", "REQUEUE_FED": "requeued",
                 "BOOT_FAIL": "failed", "DEADLINE": "failed", "REVOKED": "failed", "SIGNALING": "running",
                 "STAGE_OUT": "running", "RESIZING": "running", "SUSPENDED": "suspended", "STOPPED": "stopped by Slurm",
                 "REQUEUE_HOLD": "queued (held)", "SPECIAL_EXIT": "queued (held)", "RESV_DEL_HOLD": "queued (held)",
                 # a requeued job's latest record is PENDING/RUNNING again: PREEMPTED is a preemption that cancelled
                 "PREEMPTED": "stopped (preempted by Slurm, not requeued; resubmit the command to resume)"}


@dataclass
class StageStatus:
    name: str
    folder: Path
    state: str = "not started"
    job: str = ""
    restarts: int = 0
    epoch: str = "-"
    step: str = "-"
    checkpoint: str = "-"
    best_loss: str = "-"
    images_per_s: str = "-"
    eta: str = "-"
    notes: list = field(default_factory=list)

    @property
    def failed(self) -> bool:
        return self.state.startswith("failed")


def newest_job(folder: Path) -> str:
    jobs = folder / ".submitit"
    ids = [p.name for p in jobs.iterdir() if p.is_dir() and p.name.split("_")[0].isdigit()] if jobs.is_dir() else []
    return max(ids, key=lambda i: int(i.split("_")[0])) if ids else ""


def status_of(name: str, folder: Path, epochs: int | None, verify: bool = False) -> StageStatus:
    status = StageStatus(name, folder)
    if not folder.is_dir():
        return status
    status.job = newest_job(folder)
    slurm = job_state(status.job) if status.job else None
    slurm = slurm if slurm and slurm.state else None  # unknown to Slurm (any more): judge by the folder
    _progress(status, folder, epochs, verify)
    console = folder / "console.log"
    text = console.read_text(errors="replace") if console.is_file() else ""
    if slurm:
        state, status.restarts = slurm.state, slurm.restarts
        status.state = _SLURM_STATES.get(state, state.lower())
        if status.restarts and status.state in ("running", "queued", "done"):
            status.state += f", requeued {status.restarts} time{'s' * (status.restarts != 1)}"
        status.notes.append(f"Slurm job {status.job}: {state}")
    elif (holder := _live_local_holder(folder)) is not None:
        status.state = f"running (pid {holder.get('pid')} on {holder.get('host')}, no Slurm job)"
    elif (folder / "checkpoint-final.pth").exists():
        status.state = "done"
    elif " FAILED: " in (latest := _latest_attempt(text)):
        status.state = "failed"
    elif "[preemption] SIGINT (Ctrl-C" in latest:
        status.state = "interrupted (Ctrl-C; rerun the command to resume)"
    elif text:
        status.state = "stopped (no job known to Slurm; rerun the command to resume)"
    if status.failed:
        lines = [ln for ln in text.splitlines() if " FAILED: " in ln]
        if lines:  # the cause: the part after the last carriage return (a progress bar's fragments go)
            status.notes.append(lines[-1].rsplit("\r", 1)[-1].strip()[:400])
    return status


def _live_local_holder(folder: Path) -> dict | None:
    """The holder of the run folder's lock when it is a live process without a Slurm job, else None."""
    from mapanything_ext.cluster import run_lock

    lock = folder / run_lock.LOCK_NAME
    if not lock.is_file():
        return None
    holder = run_lock.read_holder(lock)
    return holder if not holder.get("slurm_job_id") and run_lock.judge(holder) == "alive" else None


def _latest_attempt(text: str) -> str:
    """console.log from the start of its latest job (each starts with its `output_dir:` line): an earlier
    failure of a folder that has been rerun since is history, not its state."""
    marker = "[mapanything_ext] output_dir: "
    return text[text.rfind(marker):] if marker in text else text


def _progress(status: StageStatus, folder: Path, epochs: int | None, verify: bool) -> None:
    records = read_epoch_records(folder) if (folder / "log.txt").is_file() else []
    if records:
        last = records[-1]
        status.best_loss = f"{last['best_so_far']:.4g}" if isinstance(last.get("best_so_far"), float) else "-"
        if isinstance(last.get("train_images_per_s"), float):
            status.images_per_s = f"{last['train_images_per_s']:.1f}"
    ckpt = _newest_checkpoint(folder, verify)
    if ckpt:
        path, resume = ckpt
        age = time.time() - path.stat().st_mtime
        status.checkpoint = f"{path.name} ({_age(age)} old, {path.stat().st_size / 1e9:.2f} GB)"
        done = int(resume["epoch"]) + (1 if resume.get("epoch_complete") else 0)
        status.epoch = f"{done}/{epochs}" if epochs else str(done)
        status.step = str(resume.get("global_step", "-"))
        status.eta = _eta(records, done, epochs)


def _newest_checkpoint(folder: Path, verify: bool):
    """(path, resume state) of the checkpoint a resume would take, by the same order a resume uses."""
    best = None
    for path in folder.glob("checkpoint-*.pth"):
        try:
            if verify and not verify_checkpoint(path).valid:
                continue
            resume = load_checkpoint(path, mmap=True).get("resume") or {}  # the pickle only; tensors stay on disk
        except Exception:  # noqa: BLE001 -- a torn or foreign file is simply not the newest good one
            continue
        key = resume_order(path.name, (resume.get("global_step", -1), bool(resume.get("epoch_complete"))))
        if key and (best is None or key > best[0]):
            best = (key, path, resume)
    return best[1:] if best else None


def _eta(records: list[dict], done_epochs: int, epochs: int | None) -> str:
    timed = [r for r in records if r.get("epoch_seconds")]
    if not epochs or not timed:
        return "-"
    if done_epochs >= epochs:
        return "0"
    return _age(sum(r["epoch_seconds"] for r in timed) / len(timed) * (epochs - done_epochs))


def _age(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f}s"
    if seconds < 7200:
        return f"{seconds / 60:.0f}min"
    return f"{seconds / 3600:.1f}h"


def stage_folders(overrides: list[str]) -> list[tuple[str, Path, int]]:
    from mapanything_ext.config import compose_training

    rows = []
    for stage in STAGES:
        cfg = compose_training([f"stage={stage}", *overrides])
        folder = Path(cfg.output_dir)
        # the run's own epochs where it stored them (a run given other overrides than these): else the stage's
        rows.append((stage, folder, folder_epochs(folder) or int(cfg.train_params.epochs)))
    return rows


def folder_epochs(folder: Path) -> int | None:
    """The run's train_params.epochs: from its resolved config in the newest checkpoint, else from the
    config the job recorded when it started (.hydra/config.yaml)."""
    ckpt = _newest_checkpoint(folder, verify=False)
    try:
        if ckpt:
            return int(load_checkpoint(ckpt[0], mmap=True)["args"]["train_params"]["epochs"])
        recorded = folder / ".hydra" / "config.yaml"
        if recorded.is_file():
            from omegaconf import OmegaConf

            return int(OmegaConf.load(recorded).train_params.epochs)
    except Exception:  # noqa: BLE001 -- an unreadable record: the stage's default is shown instead
        return None
    return None


def run_folders(folder: Path) -> list[Path]:
    """The folder itself, or, for a sweep's base folder, each job's run folder."""
    if (folder / "console.log").is_file() or not folder.is_dir():
        return [folder]
    jobs = sorted(p for p in folder.iterdir() if p.is_dir() and (p / "console.log").is_file())
    return jobs or [folder]


def table(rows: list[StageStatus]) -> str:
    head = "| stage | state | epoch | step | newest checkpoint | best test loss | images/s | time left |"
    lines = [head, "|---" * 8 + "|"]
    for s in rows:
        lines.append(f"| {s.name} | {s.state} | {s.epoch} | {s.step} | {s.checkpoint} | {s.best_loss} | "
                     f"{s.images_per_s} | {s.eta} |")
    for s in rows:
        lines += [f"{s.name}: {note}" for note in s.notes]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--verify", action="store_true", help="verify each checkpoint fully (reads every byte)")
    parser.add_argument("--json", action="store_true", help="print one JSON document")
    parser.add_argument("args", nargs="*", help="training overrides (machine=<profile> ...) or run folders")
    args = parser.parse_intermixed_args(argv)
    folders = [Path(a) for a in args.args if "=" not in a]
    if folders:
        rows = [status_of(run.name, run, folder_epochs(run), args.verify) for f in folders for run in run_folders(f)]
    else:
        rows = [status_of(stage if run == folder else f"{stage}/{run.name}", run, epochs, args.verify)
                for stage, folder, epochs in stage_folders(args.args) for run in run_folders(folder)]
    if args.json:
        print(json.dumps([{**vars(r), "folder": str(r.folder)} for r in rows], indent=1))
    else:
        print(table(rows))
    return 1 if any(r.failed for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
