"""What Slurm says about a job: the one place that asks (status command, pipeline --wait, run lock).

`sacct` first, where the cluster keeps accounting (it also knows jobs that ended long ago), then
`scontrol show job` (which forgets a job MinJobAge after it ended).
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass

# Every job state of Slurm's documentation (squeue(1) and sacct(1), JOB STATE CODES; tests compare with
# the installed man pages), in two classes. ACTIVE: the job has not ended: it runs, waits, is held, or may
# run again after a requeue (SPECIAL_EXIT: requeued and held until released).
ACTIVE = frozenset({"PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "SUSPENDED", "REQUEUED", "REQUEUE_HOLD",
                    "REQUEUE_FED", "RESIZING", "SIGNALING", "STAGE_OUT", "STOPPED", "RESV_DEL_HOLD",
                    "SPECIAL_EXIT"})
# ENDED: final. PREEMPTED is final too: a requeued job's latest record is PENDING or RUNNING again, so a
# job whose latest record says PREEMPTED was cancelled by the preemption (PreemptMode=CANCEL).
ENDED = frozenset({"BOOT_FAIL", "CANCELLED", "COMPLETED", "DEADLINE", "FAILED", "NODE_FAIL", "OUT_OF_MEMORY",
                   "PREEMPTED", "REVOKED", "TIMEOUT"})


@dataclass
class JobState:
    state: str  # as Slurm spells it (RUNNING, COMPLETED, ...); "" when Slurm no longer knows the job
    restarts: int = 0

    @property
    def active(self) -> bool:
        """Not ended; a state Slurm adds after these lists counts as not ended (never judged dead)."""
        return self.state in ACTIVE or (self.state != "" and self.state not in ENDED)


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
