"""`python -m mapanything_ext.status` tells the truth about runs outside Slurm: a live local run is
running, the epochs are the run's own, a rerun judges the latest attempt, the cause line is clean."""

import subprocess
import sys

import pytest

from tests.training_runs import REPO, run_training, stage_overrides, start_ranks, tiny_overrides, wait_all, \
    wait_for_text

pytestmark = pytest.mark.slow


def status(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mapanything_ext.status", *map(str, args)], cwd=REPO,
                          capture_output=True, text=True, timeout=120)


def test_a_live_local_run_is_running_and_a_rerun_after_a_failure_is_judged_by_itself(synthetic_root, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "console.log").write_text("[mapanything_ext] output_dir: x\n"
                                     "epoch 1: 50%|#####  \r[mapanything_ext] rank 0 of 1 on vm (pid 1) FAILED: "
                                     "OSError: disk quota exceeded\n")
    failed = status(out)
    assert "| failed |" in failed.stdout and "run: [mapanything_ext] rank 0 of 1 on vm (pid 1) FAILED: OSError: " \
        "disk quota exceeded" in failed.stdout, failed.stdout
    procs = start_ranks(tiny_overrides(synthetic_root, out, "train_params.epochs=3"), 1, tmp_path)
    try:
        wait_for_text(out / "console.log", "first training step done")
        live = status(out)
        assert f"running (pid {procs[0].pid} on " in live.stdout, live.stdout
    finally:
        assert wait_all(procs) == [0]
    assert "| done |" in status(out).stdout


def test_stage_rows_take_the_epochs_the_run_was_trained_with(synthetic_root, tmp_path):
    experiments = tmp_path / "experiments"
    overrides = stage_overrides(synthetic_root, experiments)
    assert run_training([*overrides, "stage=stage1", "train_params.epochs=1"]).returncode == 0
    rows = status(*overrides)
    stage1 = next(line for line in rows.stdout.splitlines() if line.startswith("| stage1 |"))
    assert "| done | 1/1 |" in stage1, rows.stdout  # not 1/5, Stage 1's default
