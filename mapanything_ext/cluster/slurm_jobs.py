"""What Slurm says about a job: the one place that asks (status command, pipeline --wait, run lock).

`sacct` first, where the cluster keeps accounting (it also knows jobs that ended long ago), then
`scontrol show job` (which forgets a job MinJobAge after it ended).
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass

# States in which a job has not ended yet (it may still run, or run again after a requeue).
ACTIVE = frozenset({"PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "SUSPENDED", "REQUEUED", "REQUEUE_HOLD",
                    "REQUEUE_FED", "RESIZING", "PREEMPTED"})


@dataclass
class JobState:
    state: str  # as Slurm spells it (RUNNING, COMPLETED, ...); "" when Slurm no longer knows the job
    restarts: int = 0

    @property
    def active(self) -> bool:
        return self.state in ACTIVE


def job_state(job_id: str) -> JobState | None:
    """The job's state, or None when no Slurm controller answers from here."""
    if shutil.which("sacct"):
        out = _run(["sacct", "-n", "-X", "-P", "-j", job_id, "-o", "State"])
        if out is not None and out.stdout.strip():
            shown = _run(["scontrol", "show", "job", job_id])
            return JobState(out.stdout.split()[0].split("+")[0], _restarts(shown.stdout if shown else ""))
    shown = _run(["scontrol", "show", "job", job_id])
    if shown is None:
        return None
    if "JobState=" in shown.stdout:
        return JobState(shown.stdout.split("JobState=")[1].split()[0], _restarts(shown.stdout))
    if "Invalid job id" in shown.stderr:
        return JobState("")
    return None


def _restarts(text: str) -> int:
    return int(text.split("Restarts=")[1].split()[0]) if "Restarts=" in text else 0


def _run(cmd: list[str]) -> subprocess.CompletedProcess | None:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
