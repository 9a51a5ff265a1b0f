"""Stage jobs on a real two-node Slurm cluster (network namespaces on this machine, gloo between nodes).

Preempted by Slurm and by a time-limit signal that reaches one node only, a 2 x 2-rank job ends
bitwise equal to an uninterrupted 4-rank run; a rank killed on the second node ends the job in
seconds and a one-node resubmission continues it; the stage pipeline chains across nodes.
"""

import getpass
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch

from mapanything_ext.checkpoint import verify_checkpoint
from mapanything_ext.run_log import read_epoch_records as records
from tests.slurm_cluster import (
    CLUSTER, REPO, client_command, final_state, job_field, job_state, kill_job_tasks, release_requeued, sacct_states,
    slurm, task_pids, wait_for_job_id,
)
from tests.training_runs import stage_overrides, start_ranks, tiny_overrides, wait_all, wait_for_text

pytestmark = [pytest.mark.slow, pytest.mark.slurm]

DEATH_TO_END_GOAL_S = 60
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


def job_overrides(data_root, output_dir, *extra):
    return tiny_overrides(data_root, output_dir, "machine=slurm-test", "train_params.epochs=3",
                          "train_params.max_num_of_imgs_per_gpu=4", *extra)


def submit(data_root, output_dir, env, *extra):
    cmd = [sys.executable, "-m", "mapanything_ext.train.training", "-m", "hydra/launcher=submitit_slurm",
           *job_overrides(data_root, output_dir, *extra)]
    log = open(output_dir.parent / f"{output_dir.name}.launcher.log", "a")
    proc = subprocess.Popen(client_command(env, cmd), cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    _launchers.append(proc)
    return proc


def finish(proc, env, job_id, timeout=300):
    """Wait for the launcher, releasing the job whenever Slurm requeued it with a delayed start."""
    deadline = time.time() + timeout
    while proc.poll() is None:
        assert time.time() < deadline, f"Slurm job {job_id} did not finish in time: {job_state(env, job_id)}"
        release_requeued(env, job_id)
        time.sleep(0.5)
    return proc.returncode


def wait_released(env, job_id, console, text, count, timeout=180):
    """Wait until text appears count times in console, starting the job whenever it waits after a requeue."""
    deadline = time.time() + timeout
    while console.read_text(errors="replace").count(text) < count if console.exists() else True:
        assert time.time() < deadline, f"{text!r} x{count} not in {console}: {job_state(env, job_id)}"
        release_requeued(env, job_id)
        time.sleep(0.3)


def run_status(env, folder) -> subprocess.CompletedProcess:
    """`python -m mapanything_ext.status <folder>`, where Slurm's controller is reachable."""
    return subprocess.run(client_command(env, [sys.executable, "-m", "mapanything_ext.status", str(folder)]),
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=120)


def signal_node(job_id: str, node_index: int, signum) -> list[int]:
    """Send signum to the tasks of one node only (ranks 2, 3 on the second node); returns their ranks."""
    per_node = 2
    pids = task_pids(job_id)
    ranks = [r for r in pids if r // per_node == node_index]
    for rank in ranks:
        os.kill(pids[rank], signum)
    return ranks


def test_two_nodes_preempted_by_slurm_and_by_a_one_node_time_limit_signal_match_an_uninterrupted_run(
        synthetic_root, tmp_path, slurm_env):
    straight = tmp_path / "straight"
    assert wait_all(start_ranks(job_overrides(synthetic_root, straight), 4, tmp_path)) == [0, 0, 0, 0]

    out = tmp_path / "two_nodes"
    out.mkdir()
    proc = submit(synthetic_root, out, slurm_env, "machine.slurm.nodes=2")
    job = wait_for_job_id(out)
    console = out / "console.log"
    # 1) preemption as Slurm does it: the job is requeued, every task gets SIGTERM
    wait_for_text(console, "first training step done", timeout=180)
    slurm(slurm_env, "scontrol", "requeue", job)
    wait_for_text(console, "leaving for requeue", timeout=120)
    # 2) the time-limit warning reaches the second node only; rank 0 must still hand the requeue to submitit
    wait_released(slurm_env, job, console, "first training step done", 2)
    signalled_ranks = signal_node(job, 1, signal.SIGUSR2)
    assert signalled_ranks == [2, 3]
    assert finish(proc, slurm_env, job) == 0, (out.parent / "two_nodes.launcher.log").read_text()[-3000:]

    text = console.read_text()
    stops = [line for line in text.splitlines() if line.startswith("[preemption]")]
    assert len(stops) == 2 and stops[0].startswith("[preemption] SIGTERM (received by this rank)")
    assert stops[1].startswith("[preemption] SIGUSR2 (received by another rank)")
    assert "Slurm restart 2" in text and "world size 4 (DDP)" in text
    assert final_state(slurm_env, job) == "COMPLETED" and job_field(slurm_env, job, "Restarts") == "2"
    states = sacct_states(slurm_env, job)  # accounting, as users read it: two requeues, then done
    assert states[-1] == "COMPLETED" and len(states) == 3 and set(states[:2]) <= {"REQUEUED", "PREEMPTED"}, states
    status = run_status(slurm_env, out)
    assert status.returncode == 0 and "| two_nodes | done, requeued 2 times | 3/3 |" in status.stdout, status.stdout
    assert job_field(slurm_env, job, "NumNodes") == "2"
    assert [r["epoch"] for r in records(out)] == [1, 2, 3]
    a = torch.load(straight / "checkpoint-final.pth", weights_only=True)["model"]
    b = torch.load(out / "checkpoint-final.pth", weights_only=True)["model"]
    for key in a:
        assert torch.equal(a[key], b[key]), key
    for line in stops:
        print("\n[slurm] job said:", line)


def test_a_rank_killed_on_the_second_node_ends_the_job_fast_and_a_one_node_resubmission_resumes(
        synthetic_root, tmp_path, slurm_env):
    out = tmp_path / "killed"
    out.mkdir()
    proc = submit(synthetic_root, out, slurm_env, "machine.slurm.nodes=2")
    job = wait_for_job_id(out)
    wait_for_text(out / "console.log", "saved checkpoint-last.pth", timeout=180)
    # A save torn by SIGKILL leaves a temporary file; then rank 3 (second node) dies without a word.
    (out / "checkpoint-last.pth.maext-n1-999.tmp").write_bytes(b"PK\x03\x04 partial")
    killed_at = time.monotonic()
    assert list(kill_job_tasks(job, ranks=[3])) == [3]
    while task_pids(job):
        assert time.monotonic() - killed_at < 2 * DEATH_TO_END_GOAL_S, f"tasks left: {task_pids(job)}"
        time.sleep(0.2)
    death_to_end = time.monotonic() - killed_at
    assert final_state(slurm_env, job) == "FAILED"
    status = run_status(slurm_env, out)
    assert status.returncode == 1 and "| killed | failed |" in status.stdout, status.stdout
    assert f"Slurm job {job}: FAILED" in status.stdout
    # With accounting, submitit learns that the job failed: the submitting command ends, non-zero.
    assert proc.wait(timeout=120) != 0
    assert sacct_states(slurm_env, job) == ["FAILED"]

    again = submit(synthetic_root, out, slurm_env, "machine.slurm.nodes=1")
    job2 = wait_for_job_id(out, not_in=(job,))
    assert finish(again, slurm_env, job2) == 0
    text = (out / "console.log").read_text()
    assert f"previous job {job} of this run ended with:" in text
    assert re.search(r"srun: error: maext-\w+-n2: task 3: Killed", text), text[-3000:]
    assert "quarantined checkpoint-last.pth.maext-n1-999.tmp" in text
    assert "resume: world size changed from 4 to 2" in text
    assert [r["epoch"] for r in records(out)] == [1, 2, 3]
    print(f"\n[slurm] rank 3 SIGKILLed on the second node -> every task gone: {death_to_end:.1f}s "
          f"(goal {DEATH_TO_END_GOAL_S}s)")
    assert death_to_end < DEATH_TO_END_GOAL_S


def test_cluster_stop_removes_every_namespace_link_and_hosts_line_it_added(tmp_path):
    """A second small cluster beside the session's: start, check both nodes, stop, nothing left."""
    state = Path(tempfile.mkdtemp(prefix="maext-", dir="/tmp")) / "s"  # Slurm's socket names need a short path
    env = {**os.environ, "MAPANYTHING_EXT_SLURM_DIR": str(state)}
    started_at = time.monotonic()
    started = subprocess.run(["bash", str(CLUSTER), "start", "--nodes", "2", "--no-accounting"], env=env,
                             capture_output=True, text=True, timeout=180)
    try:
        assert started.returncode == 0, started.stderr
        print(f"\n[slurm] 2-node cluster without accounting up in {time.monotonic() - started_at:.1f}s")
        netns = re.search(r"SLURM_NETNS=(\S+)", started.stdout).group(1)
        tag = netns.split("-")[1]
        assert {f"maext-{tag}-ctl", f"maext-{tag}-n1", f"maext-{tag}-n2"} <= set(_netns())
        assert f"# maext-{tag}" in open("/etc/hosts").read()
        assert oct(state.stat().st_mode & 0o777) == "0o700"
        # Nothing assumes accounting: the status command reads scontrol when sacct has nothing.
        client = {**env, "SLURM_CONF": str(state / "slurm.conf"), "SLURM_NETNS": netns}
        job = re.search(r"(\d+)", slurm(client, "sbatch", "--wrap", "true", "-o", str(tmp_path / "wrap.out"))).group(1)
        (tmp_path / "run" / ".submitit" / job).mkdir(parents=True)
        assert final_state(client, job) == "COMPLETED", slurm(client, "scontrol", "show", "job", job)
        status = run_status(client, tmp_path / "run")
        assert status.returncode == 0 and "| run | done |" in status.stdout and f"Slurm job {job}: COMPLETED" \
            in status.stdout, status.stdout
    finally:
        stopped = subprocess.run(["bash", str(CLUSTER), "stop"], env=env, capture_output=True, text=True, timeout=120)
    assert stopped.returncode == 0
    assert not [ns for ns in _netns() if ns.startswith(f"maext-{tag}-")]
    assert f"# maext-{tag}" not in open("/etc/hosts").read()
    assert not [pid for pid in _pids_of("slurmd", "slurmctld", "munged") if str(state) in _cmdline(pid)]
    # a folder the script did not make is refused, and its munge key never used
    foreign = state.parent / "foreign"
    (foreign / "munge").mkdir(parents=True)
    (foreign / "munge" / "munge.key").write_bytes(b"not ours")
    refused = subprocess.run(["bash", str(CLUSTER), "start"], env={**env, "MAPANYTHING_EXT_SLURM_DIR": str(foreign)},
                             capture_output=True, text=True, timeout=60)
    assert refused.returncode != 0 and "was not made by this script" in refused.stderr


def _netns() -> list[str]:
    return [line.split()[0] for line in subprocess.run(["ip", "netns", "list"], capture_output=True,
                                                         text=True).stdout.splitlines() if line.strip()]


def _pids_of(*names: str) -> list[int]:
    out = subprocess.run(["pgrep", "-x", "|".join(names)], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def _cmdline(pid: int) -> str:
    try:
        return open(f"/proc/{pid}/cmdline", "rb").read().decode(errors="replace")
    except OSError:
        return ""


def test_a_two_value_sweep_on_slurm_gives_two_complete_separate_runs(synthetic_root, tmp_path, slurm_env):
    base = tmp_path / "sweep"
    base.mkdir()
    proc = submit(synthetic_root, base, slurm_env, "train_params.epochs=1", "train_params.lr=1e-3,2e-3")
    deadline = time.time() + 300
    while proc.poll() is None:
        assert time.time() < deadline, "the sweep did not finish"
        time.sleep(0.5)
    assert proc.returncode == 0, (tmp_path / "sweep.launcher.log").read_text()[-3000:]
    for name in ("job0_lr_0.001", "job1_lr_0.002"):
        run = base / name
        assert verify_checkpoint(run / "checkpoint-final.pth").valid
        assert [r["epoch"] for r in records(run)] == [1]
        assert "world size 2 (DDP)" in (run / "console.log").read_text()
    status = run_status(slurm_env, base)
    assert status.returncode == 0 and status.stdout.count("| done |") == 2, status.stdout


def test_job_with_fewer_ranks_than_the_profile_stops_with_a_clear_message(synthetic_root, tmp_path, slurm_env):
    out = tmp_path / "short"
    out.mkdir()
    # The command line wins over the profile for the launcher, so the job really gets 1 task.
    proc = submit(synthetic_root, out, slurm_env, "hydra.launcher.tasks_per_node=1")
    job = wait_for_job_id(out)
    assert finish(proc, slurm_env, job, timeout=120) != 0
    assert sacct_states(slurm_env, job) == ["FAILED"]
    logs = "".join(p.read_text() for p in (out / ".submitit").rglob("*_log.out"))
    assert "has 1 rank(s) (SLURM_NTASKS) but the machine profile asks for 2" in logs, logs[-2000:]
    # the job itself failed (not a COMPLETED job carrying an exception), so afterok dependants never start
    assert "Submitted job triggered an exception" in logs


def stage_logs(experiments, ids) -> str:
    """The end of every stage's console and Slurm logs, for a failure message."""
    parts = []
    for log in sorted(experiments.glob("*/console.log")) + sorted(experiments.glob("*/.submitit/*/*.err")):
        parts.append(f"--- {log}\n{log.read_text(errors='replace')[-1500:]}")
    return "\n".join(parts) or f"no logs under {experiments} for jobs {ids}"


def test_pipeline_chains_three_stages_with_afterok_across_two_nodes(synthetic_root, tmp_path, slurm_env):
    experiments = tmp_path / "experiments"
    # one rank on each node: the cooperative test split holds 3 samples, fewer than 4 ranks need
    overrides = stage_overrides(synthetic_root, experiments, "machine=slurm-test", "machine.slurm.nodes=2",
                                "machine.slurm.tasks_per_node=1", "train_params.epochs=1")
    out = subprocess.run(client_command(slurm_env, [sys.executable, "-m", "mapanything_ext.pipeline", *overrides]),
                         cwd=REPO, env=slurm_env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    ids = re.findall(r"Slurm job (\d+)", out.stdout)
    assert len(ids) == 3, out.stdout
    for folder in ("opv2v_ft_stage1", "opv2v_coop_stage2_full", "opv2v_coop_stage3_varviews"):
        assert str(experiments / folder) in out.stdout
    assert f"Dependency=afterok:{ids[0]}" in slurm(slurm_env, "scontrol", "show", "job", ids[1])
    assert "--kill-on-bad-exit=1" in (experiments / "opv2v_ft_stage1" / ".submitit" / ids[0] /
                                      f"{ids[0]}_submission.sh").read_text()
    # accounting, not the queue: a job absent from squeue for a moment has not necessarily ended
    states = {job_id: sacct_states(slurm_env, job_id, timeout=400) for job_id in ids}
    assert all(s[-1:] == ["COMPLETED"] for s in states.values()), (states, stage_logs(experiments, ids))
    for stage, folder, previous in (("stage2", "opv2v_coop_stage2_full", "opv2v_ft_stage1"),
                                    ("stage3", "opv2v_coop_stage3_varviews", "opv2v_coop_stage2_full")):
        console = (experiments / folder / "console.log").read_text()
        assert f"[pretrained] {experiments / previous / 'checkpoint-best.pth'}: loaded" in console, stage
        assert "world size 2 (DDP)" in console
        assert (experiments / folder / "checkpoint-final.pth").is_file()


def test_failed_stage_cancels_the_stages_after_it(synthetic_root, tmp_path, slurm_env):
    experiments = tmp_path / "experiments"
    # Stage 1 fails at start-up: its data folder does not exist.
    overrides = [o for o in stage_overrides(synthetic_root, experiments, "machine=slurm-test", "train_params.epochs=1",
                                            f"machine.opv2v_root={tmp_path / 'missing'}")
                 if o != f"machine.opv2v_root={synthetic_root / 'opv2v'}"]
    out = subprocess.run(client_command(slurm_env, [sys.executable, "-m", "mapanything_ext.pipeline", "--stages",
                                                    "stage1,stage2", "--wait", *overrides]),
                         cwd=REPO, env=slurm_env, capture_output=True, text=True, timeout=240)
    ids = re.findall(r"Slurm job (\d+) ", out.stdout)
    assert len(ids) == 2, out.stdout + out.stderr[-2000:]
    assert out.returncode != 0 and "did not complete" in out.stderr  # --wait: the chain's outcome, not a hang
    assert sacct_states(slurm_env, ids[0]) == ["FAILED"] and sacct_states(slurm_env, ids[1]) == ["CANCELLED"]
    assert not (experiments / "opv2v_coop_stage2_full" / "console.log").exists()


def test_a_job_past_its_time_limit_with_no_requeue_budget_ends_timeout_saying_so(synthetic_root, tmp_path, slurm_env):
    """Slurm's own warning signal (USR2, signal_delay_s before the limit); submitit may requeue 0 times.
    The limit is cut to Slurm's shortest (1 minute) once the job trains, so the test waits ~1 minute;
    submitit treats any warning of a job of <= 10 minutes as a time-out."""
    out = tmp_path / "limit"
    out.mkdir()
    proc = submit(synthetic_root, out, slurm_env, "machine.slurm.timeout_min=10", "machine.slurm.signal_delay_s=30",
                  "machine.slurm.max_num_timeout=0", "train_params.epochs=1000")
    job = wait_for_job_id(out)
    wait_for_text(out / "console.log", "first training step done", timeout=180)
    slurm(slurm_env, "scontrol", "update", f"jobid={job}", "TimeLimit=1")
    assert proc.wait(timeout=300) != 0
    assert final_state(slurm_env, job) == "TIMEOUT" and sacct_states(slurm_env, job) == ["TIMEOUT"]
    console = (out / "console.log").read_text()
    assert "[preemption] SIGUSR2" in console and "[preemption] not requeued:" in console
    assert "runs on until Slurm ends it at its time limit (TIMEOUT)" in console
    assert verify_checkpoint(out / "checkpoint-last.pth").valid
