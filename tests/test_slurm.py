"""Stage 1 as a real Slurm job on the local cluster: preempted twice, it still ends bitwise identical."""

import getpass
import re
import subprocess
import sys
import time

import pytest
import torch

from mapanything_ext.train.run_log import read_epoch_records as records
from tests.slurm_cluster import REPO, job_state, kill_job_tasks, release_requeued, slurm, wait_for_job_id
from tests.training_runs import stage_overrides, start_ranks, tiny_overrides, wait_all, wait_for_text

pytestmark = [pytest.mark.slow, pytest.mark.slurm]


_launchers: list[subprocess.Popen] = []


@pytest.fixture(autouse=True)
def no_leftovers(slurm_env):
    """A failing test must not leave jobs or launchers behind for the next one."""
    yield
    for proc in _launchers:
        if proc.poll() is None:
            proc.kill()
    _launchers.clear()
    slurm(slurm_env, "scancel", "--full", f"--user={getpass.getuser()}")


def submit(data_root, output_dir, env, *extra):
    overrides = tiny_overrides(data_root, output_dir, "machine=slurm-test", "train_params.epochs=3",
                               "train_params.max_num_of_imgs_per_gpu=4", "dataset.resolution_train=[112,84]",
                               "dataset.resolution_test=[112,84]", *extra)
    cmd = [sys.executable, "-m", "mapanything_ext.train.training", "-m", "hydra/launcher=submitit_slurm", *overrides]
    log = open(output_dir.parent / f"{output_dir.name}.launcher.log", "a")
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    _launchers.append(proc)
    return proc


def finish(proc, env, job_id, timeout=300):
    """Wait for the launcher, releasing the job whenever Slurm requeued it with a delayed start."""
    deadline = time.time() + timeout
    while proc.poll() is None:
        assert time.time() < deadline, "Slurm job did not finish in time"
        release_requeued(env, job_id)
        time.sleep(0.5)
    return proc.returncode


def test_stage1_preempted_twice_on_slurm_matches_uninterrupted_run(synthetic_root, tmp_path, slurm_env):
    straight = tmp_path / "straight"
    straight.mkdir()
    reference = tiny_overrides(synthetic_root, straight, "distributed.world_size=2", "train_params.epochs=3",
                               "train_params.max_num_of_imgs_per_gpu=4", "dataset.resolution_train=[112,84]",
                               "dataset.resolution_test=[112,84]")
    assert wait_all(start_ranks(reference, 2, tmp_path)) == [0, 0]

    out = tmp_path / "slurm_run"
    out.mkdir()
    proc = submit(synthetic_root, out, slurm_env)
    job = wait_for_job_id(out)
    console = out / "console.log"
    # 1) preemption as Slurm does it: the job is requeued, its tasks get SIGTERM
    wait_for_text(console, "starting from scratch", timeout=180)
    signalled = time.time()
    slurm(slurm_env, "scontrol", "requeue", job)
    wait_for_text(console, "leaving for requeue", timeout=120)
    first_save_s = time.time() - signalled
    requeued = time.time()
    # 2) the time-limit warning: SIGUSR2 to the tasks; submitit requeues through the launcher's checkpoint()
    while "resumed from" not in console.read_text():
        release_requeued(slurm_env, job)
        time.sleep(0.3)
    wait_for_text(console, "first training step done", timeout=120, count=2)
    requeue_to_step_s = time.time() - requeued
    slurm(slurm_env, "scancel", "--signal=USR2", job)
    assert finish(proc, slurm_env, job) == 0, (out.parent / "slurm_run.launcher.log").read_text()[-3000:]

    text = console.read_text()
    assert text.count("leaving for requeue") == 2 and text.count("resumed from") == 2
    assert "Slurm restart 2" in text
    assert [r["epoch"] for r in records(out)] == [0, 1, 2]
    a = torch.load(straight / "checkpoint-final.pth", weights_only=True)["model"]
    b = torch.load(out / "checkpoint-final.pth", weights_only=True)["model"]
    for key in a:
        assert torch.equal(a[key], b[key]), key
    print(f"\n[slurm] scontrol requeue -> checkpoint-last on disk and exit: {first_save_s:.1f}s (seen by the test)")
    print(f"[slurm] requeue -> first training step of the requeued job: {requeue_to_step_s:.1f}s (seen by the test)")
    for line in text.splitlines():
        if "after the signal" in line or "first training step done" in line:
            print("[slurm] job said:", line.strip())


def test_job_killed_mid_save_resumes_from_last_valid_checkpoint(synthetic_root, tmp_path, slurm_env):
    out = tmp_path / "killed"
    out.mkdir()
    proc = submit(synthetic_root, out, slurm_env)
    job = wait_for_job_id(out)
    wait_for_text(out / "console.log", "saved checkpoint-last.pth", timeout=180)
    # A save torn by SIGKILL leaves a partial temp file; then every task of the job is SIGKILLed,
    # so no handler runs and no checkpoint is written on the way out.
    (out / "checkpoint-last.pth.tmp").write_bytes(b"PK\x03\x04 partial")
    kill_job_tasks(slurm_env, job)
    while job_state(slurm_env, job)[0]:
        time.sleep(0.3)
    # Without Slurm accounting (sacct) submitit cannot learn that the job failed and would poll
    # forever; the launcher only watches, so stopping it leaves nothing behind.
    proc.terminate()
    proc.wait(timeout=30)
    again = submit(synthetic_root, out, slurm_env)
    job2 = wait_for_job_id(out, not_in=(job,))
    assert finish(again, slurm_env, job2) == 0
    text = (out / "console.log").read_text()
    assert "quarantined checkpoint-last.pth.tmp" in text or list((out / "quarantine").rglob("checkpoint-last.pth.tmp"))
    assert "resumed from" in text
    assert [r["epoch"] for r in records(out)] == [0, 1, 2]


def test_job_with_fewer_ranks_than_the_profile_stops_with_a_clear_message(synthetic_root, tmp_path, slurm_env):
    out = tmp_path / "short"
    out.mkdir()
    # The command line wins over the profile for the launcher, so the job really gets 1 task.
    proc = submit(synthetic_root, out, slurm_env, "hydra.launcher.tasks_per_node=1")
    assert finish(proc, slurm_env, wait_for_job_id(out), timeout=120) != 0
    logs = "".join(p.read_text() for p in (out / ".submitit").rglob("*_log.out"))
    assert "has 1 rank(s) (SLURM_NTASKS) but the machine profile asks for 2" in logs, logs[-2000:]
    # the job itself failed (not a COMPLETED job carrying an exception), so afterok dependants never start
    assert "Submitted job triggered an exception" in logs


def test_pipeline_chains_three_stages_with_afterok(synthetic_root, tmp_path, slurm_env):
    experiments = tmp_path / "experiments"
    overrides = stage_overrides(synthetic_root, experiments, "machine=slurm-test", "train_params.epochs=1")
    out = subprocess.run([sys.executable, "-m", "mapanything_ext.pipeline", *overrides], cwd=REPO, env=slurm_env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    ids = re.findall(r"Slurm job (\d+)", out.stdout)
    assert len(ids) == 3, out.stdout
    for folder in ("opv2v_ft_stage1", "opv2v_coop_stage2_full", "opv2v_coop_stage3_varviews"):
        assert str(experiments / folder) in out.stdout
    assert f"Dependency=afterok:{ids[0]}" in slurm(slurm_env, "scontrol", "show", "job", ids[1])
    deadline = time.time() + 400
    while any(job_state(slurm_env, i)[0] for i in ids):
        assert time.time() < deadline, "pipeline did not finish"
        time.sleep(1)
    for stage, folder, previous in (("stage2", "opv2v_coop_stage2_full", "opv2v_ft_stage1"),
                                    ("stage3", "opv2v_coop_stage3_varviews", "opv2v_coop_stage2_full")):
        console = (experiments / folder / "console.log").read_text()
        assert f"[pretrained] {experiments / previous / 'checkpoint-best.pth'}: loaded" in console, stage
        assert (experiments / folder / "checkpoint-final.pth").is_file()


def test_failed_stage_cancels_the_stages_after_it(synthetic_root, tmp_path, slurm_env):
    experiments = tmp_path / "experiments"
    # Stage 1 fails at start-up: its data folder does not exist.
    overrides = [o for o in stage_overrides(synthetic_root, experiments, "machine=slurm-test", "train_params.epochs=1",
                                            f"machine.opv2v_root={tmp_path / 'missing'}")
                 if o != f"machine.opv2v_root={synthetic_root / 'opv2v'}"]
    out = subprocess.run([sys.executable, "-m", "mapanything_ext.pipeline", "--stages", "stage1,stage2", *overrides],
                         cwd=REPO, env=slurm_env, capture_output=True, text=True, timeout=120)
    ids = re.findall(r"Slurm job (\d+)", out.stdout)
    assert len(ids) == 2, out.stdout + out.stderr[-2000:]
    deadline = time.time() + 120
    while any(job_state(slurm_env, i)[0] for i in ids):
        assert time.time() < deadline, f"stage 2 still queued: {job_state(slurm_env, ids[1])}"
        time.sleep(1)
    assert not (experiments / "opv2v_coop_stage2_full" / "console.log").exists()
