"""Sweeps that do not destroy each other: a run folder per job, one writer per run folder."""

import json
import os
import subprocess
import sys
import time

import pytest

from mapanything_ext.checkpoint import verify_checkpoint
from mapanything_ext.cluster import run_lock
from mapanything_ext.run_log import read_epoch_records as records
from tests.training_runs import REPO, run_training, tiny_overrides, train_command

pytestmark = pytest.mark.slow


def test_a_two_value_sweep_on_submitit_local_gives_two_complete_separate_runs(synthetic_root, tmp_path):
    base = tmp_path / "sweep"
    proc = run_training(["-m", "hydra/launcher=submitit_local",
                         *tiny_overrides(synthetic_root, base, "train_params.epochs=1", "train_params.lr=1e-3,2e-3")],
                        timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = {"job0_lr_0.001": 0.001, "job1_lr_0.002": 0.002}
    for name, lr in runs.items():
        run = base / name
        assert verify_checkpoint(run / "checkpoint-final.pth").valid
        assert [r["epoch"] for r in records(run)] == [1]  # one job's epochs in each log.txt
        console = (run / "console.log").read_text()
        assert f"lr: {lr}" in console and str(base / [n for n in runs if n != name][0]) not in console
        assert (run / ".hydra" / "overrides.yaml").is_file() and list((run / "tensorboard").iterdir())
        assert not (run / run_lock.LOCK_NAME).exists()  # given back at the end
    status = subprocess.run([sys.executable, "-m", "mapanything_ext.status", str(base)], cwd=REPO,
                            capture_output=True, text=True, timeout=120)
    assert status.returncode == 0 and "| job0_lr_0.001 | done |" in status.stdout and "| job1_lr_0.002 | done |" \
        in status.stdout, status.stdout


def test_two_identical_commands_one_trains_the_other_is_refused(synthetic_root, tmp_path):
    out = tmp_path / "shared"
    command = train_command(tiny_overrides(synthetic_root, out, "train_params.epochs=3"))
    first, second = (subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                     for _ in range(2))
    outputs = [p.communicate(timeout=300) for p in (first, second)]
    codes = sorted([first.returncode, second.returncode])
    assert codes[0] == 0 and codes[1] != 0, outputs
    refused = next(err for (_, err), p in zip(outputs, (first, second)) if p.returncode != 0)
    assert f"run folder {out} is in use by pid" in refused and "give this one another output_dir" in refused
    assert [r["epoch"] for r in records(out)] == [1, 2, 3]  # the first job is unharmed
    assert verify_checkpoint(out / "checkpoint-final.pth").valid


def test_the_lock_of_a_killed_job_is_taken_over_and_said(synthetic_root, tmp_path):
    out = tmp_path / "orphan"
    out.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    dead.kill()
    dead.wait()
    holder = {**run_lock.me(), "pid": dead.pid, "slurm_job_id": None}
    (out / run_lock.LOCK_NAME).write_text(json.dumps(holder))
    proc = run_training(tiny_overrides(synthetic_root, out, "train_params.epochs=1"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    console = (out / "console.log").read_text()
    assert f"took over the lock of {out} from pid {dead.pid}" in console and f"dead: pid {dead.pid} is gone" in console
    assert list(out.glob(".run.lock.stale-*"))


def test_a_requeued_slurm_job_takes_its_own_lock_back_and_another_live_one_is_refused(tmp_path, monkeypatch):
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / run_lock.LOCK_NAME).write_text(json.dumps({"host": "node7", "pid": 1, "slurm_job_id": "41",
                                                         "started": "earlier"}))
    monkeypatch.setenv("SLURM_JOB_ID", "41")  # the same job, started again by Slurm
    path, note = run_lock.acquire(folder)
    assert "our own job, requeued" in note and json.loads(path.read_text())["pid"] == os.getpid()
    run_lock.release(path)
    assert not path.exists()
    # a live holder on another host without Slurm cannot be checked: it is left alone
    (folder / run_lock.LOCK_NAME).write_text(json.dumps({"host": "elsewhere", "pid": 1, "started": "now"}))
    monkeypatch.delenv("SLURM_JOB_ID")
    with pytest.raises(run_lock.RunFolderBusy, match="in use by pid 1 on elsewhere"):
        run_lock.acquire(folder)


def test_temporary_names_are_unique_per_writer(tmp_path):
    from mapanything_ext.checkpoint.atomic import temp_path_for

    target = tmp_path / "checkpoint-last.pth"
    here = temp_path_for(target).name
    assert here.startswith("checkpoint-last.pth.") and str(os.getpid()) in here and here.endswith(".tmp")
    other = subprocess.run([sys.executable, "-c", "from pathlib import Path; from mapanything_ext.checkpoint.atomic "
                            f"import temp_path_for; print(temp_path_for(Path({str(target)!r})).name)"],
                           cwd=REPO, capture_output=True, text=True).stdout.strip()
    assert other and other != here


def test_a_run_refused_for_a_busy_folder_writes_nothing_there(synthetic_root, tmp_path):
    out = tmp_path / "live"
    out.mkdir()
    (out / ".hydra").mkdir()
    (out / ".hydra" / "overrides.yaml").write_text("- the live run's overrides\n")
    (out / run_lock.LOCK_NAME).write_text(json.dumps({**run_lock.me(), "pid": os.getpid()}))  # alive: this test
    before = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in out.rglob("*") if p.is_file()}
    proc = run_training(tiny_overrides(synthetic_root, out, "train_params.epochs=1", "train_params.lr=5e-3"))
    assert proc.returncode != 0 and "RunFolderBusy" in proc.stderr, proc.stderr[-2000:]
    after = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in out.rglob("*") if p.is_file()}
    assert after == before


def test_a_run_records_its_hydra_config_once_it_holds_the_folder(synthetic_root, tmp_path):
    out = tmp_path / "run"
    proc = run_training(tiny_overrides(synthetic_root, out, "train_params.epochs=1", "train_params.lr=5e-3"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "train_params.lr=5e-3" in (out / ".hydra" / "overrides.yaml").read_text()
    assert "lr: 0.005" in (out / ".hydra" / "config.yaml").read_text()
    assert (out / ".hydra" / "hydra.yaml").is_file()


RACE = """
import sys, time
from pathlib import Path
from mapanything_ext.cluster import run_lock
folder, start = Path(sys.argv[1]), float(sys.argv[2])
while time.time() < start:
    pass
try:
    path, note = run_lock.acquire(folder)
    print("WON", note, flush=True)
    time.sleep(3)  # hold it while the others try
    run_lock.release(path)
except run_lock.RunFolderBusy as err:
    print("BUSY", err, flush=True)
"""


def test_of_jobs_judging_one_dead_lock_at_once_exactly_one_takes_it(tmp_path):
    folder = tmp_path / "run"
    folder.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (folder / run_lock.LOCK_NAME).write_text(json.dumps({**run_lock.me(), "pid": dead.pid}))
    start = time.time() + 2.0
    procs = [subprocess.Popen([sys.executable, "-c", RACE, str(folder), str(start)], cwd=REPO,
                              stdout=subprocess.PIPE, text=True) for _ in range(8)]
    outs = [proc.communicate(timeout=60)[0] for proc in procs]
    assert sum(out.startswith("WON") for out in outs) == 1, outs
    assert all(out.startswith(("WON", "BUSY")) for out in outs), outs


def test_another_step_of_the_same_slurm_job_start_is_refused_a_requeue_takes_it_back(tmp_path, monkeypatch):
    folder = tmp_path / "run"
    folder.mkdir()
    holder = {**run_lock.me(), "pid": os.getpid(), "slurm_job_id": "41", "slurm_restart": 2}
    (folder / run_lock.LOCK_NAME).write_text(json.dumps(holder))  # alive: this process
    monkeypatch.setenv("SLURM_JOB_ID", "41")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "2")  # the same start of the job: a second step
    with pytest.raises(run_lock.RunFolderBusy, match="Slurm job 41"):
        run_lock.acquire(folder)
    monkeypatch.setenv("SLURM_RESTART_COUNT", "3")  # Slurm started the job again: its own lock comes back
    path, note = run_lock.acquire(folder)
    assert "our own job, requeued" in note
    run_lock.release(path)
