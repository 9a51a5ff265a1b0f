"""Every Slurm job state is classified as ended or not, as Slurm's own documentation lists them."""

import gzip
import re
from pathlib import Path

import pytest

from mapanything_ext.cluster.slurm_jobs import ACTIVE, ENDED, JobState
from mapanything_ext.pipeline import PipelineError, wait_for_jobs

# JOB STATE CODES of squeue(1) and sacct(1), Slurm 23-24 (the installed man pages are compared below).
DOCUMENTED = {"BOOT_FAIL", "CANCELLED", "COMPLETED", "CONFIGURING", "COMPLETING", "DEADLINE", "FAILED", "NODE_FAIL",
              "OUT_OF_MEMORY", "PENDING", "PREEMPTED", "RUNNING", "RESV_DEL_HOLD", "REQUEUE_FED", "REQUEUE_HOLD",
              "REQUEUED", "RESIZING", "REVOKED", "SIGNALING", "SPECIAL_EXIT", "STAGE_OUT", "STOPPED", "SUSPENDED",
              "TIMEOUT"}


def installed_man_states() -> set[str]:
    states = set()
    for page in ("squeue", "sacct"):
        path = Path(f"/usr/share/man/man1/{page}.1.gz")
        if path.is_file():
            text = gzip.decompress(path.read_bytes()).decode(errors="replace")
            section = text.split('.SH "JOB STATE CODES"', 1)[-1].split("\n.SH ", 1)[0] if "JOB STATE CODES\"" in text else ""
            states |= set(re.findall(r"\\f[3B][A-Z]{1,3} +([A-Z_]{4,})\\f", section))
    return states


def test_every_documented_state_is_either_ended_or_not():
    assert not ACTIVE & ENDED
    assert DOCUMENTED == ACTIVE | ENDED


def test_the_installed_slurm_documents_no_state_we_do_not_classify():
    states = installed_man_states()
    if not states:
        pytest.skip("no squeue/sacct man pages here (Slurm not installed, or man pages excluded)")
    assert states <= ACTIVE | ENDED, states - (ACTIVE | ENDED)


def test_a_preempted_job_has_ended_and_held_or_stopped_ones_have_not():
    assert not JobState("PREEMPTED").active and not JobState("").active
    for state in ("STOPPED", "SIGNALING", "STAGE_OUT", "RESV_DEL_HOLD", "REQUEUE_HOLD", "SPECIAL_EXIT"):
        assert JobState(state).active, state
    assert JobState("A_STATE_OF_A_LATER_SLURM").active  # never judged dead on a guess


def test_pipeline_wait_gives_up_when_slurm_cannot_be_asked(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no sacct, no scontrol: no controller answers
    with pytest.raises(PipelineError, match="no Slurm controller has answered about job 41"):
        wait_for_jobs(["41"], poll_s=0.01, unreadable_s=0.2)
