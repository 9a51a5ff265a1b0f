"""Every stop path, with real processes, real gloo and real signals (timed by MAPANYTHING_EXT_FAULT).

One 2-rank run is stopped once in every phase a signal can land in, each time on one rank only,
resumed after each stop, and must end bitwise equal to an uninterrupted run (dropout on, so a
missed RNG restore shows). Also: a resume with another world size, a rank whose data is broken.
"""

import os
import re
import shutil
import signal

import pytest
import torch

from mapanything_ext.run_log import read_epoch_records as records
from tests.training_runs import start_ranks, tiny_overrides, wait_all, wait_for_text

pytestmark = pytest.mark.slow

SETTINGS = ("train_params.max_num_of_imgs_per_gpu=4", "train_params.eval_before_training=true",
            "model.dropout=0.1", "train_params.print_freq=100")

# (phase, rank that gets the signal, what the job must say it saved)
CHAIN = [
    ("startup", 1, "nothing new to save at stop point startup"),
    ("initial_eval", 0, "nothing new to save at stop point initial_eval"),
    ("loader_start", 1, "nothing new to save at stop point loader_start"),
    ("train_step", 1, "checkpoint-last.pth written at stop point train_step (after a training step; epoch 0, 6 batches done)"),
    ("last_step", 0, "checkpoint-last.pth written at stop point last_step (after the epoch's last step; epoch 0, 8 batches done)"),
    ("eval", 1, "nothing new to save at stop point eval"),
    ("end_of_epoch", 1, "nothing new to save at stop point end_of_epoch"),
]


def run(data_root, out, tmp_path, world=2, fault=None, *extra):
    env = {"MAPANYTHING_EXT_FAULT": fault} if fault else {}
    return wait_all(start_ranks(tiny_overrides(data_root, out, *SETTINGS, *extra), world, tmp_path, env=env))


def preemption_lines(out):
    return [line for line in (out / "console.log").read_text().splitlines() if line.startswith("[preemption]")]


def test_a_signal_in_any_phase_on_any_rank_stops_all_ranks_and_loses_nothing(synthetic_root, tmp_path):
    straight, chained = tmp_path / "straight", tmp_path / "chained"
    assert run(synthetic_root, straight, tmp_path) == [0, 0]
    seconds = {}
    for phase, rank, saved in CHAIN:
        assert run(synthetic_root, chained, tmp_path, 2, f"SIGUSR2@{phase}@{rank}") == [3, 3], phase
        line = preemption_lines(chained)[-1]
        assert saved in line, (phase, line)
        assert ("received by this rank" if rank == 0 else "received by another rank") in line
        seconds[phase] = float(re.search(r"([\d.]+)s after the signal", line).group(1))
    assert run(synthetic_root, chained, tmp_path) == [0, 0]

    a = torch.load(straight / "checkpoint-final.pth", weights_only=True)["model"]
    b = torch.load(chained / "checkpoint-final.pth", weights_only=True)["model"]
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert [r["epoch"] for r in records(chained)] == [1, 2]
    assert records(chained)[0]["train_loss"] == records(straight)[0]["train_loss"]
    assert records(chained)[1]["OPV2VDataset_loss_med"] == records(straight)[1]["OPV2VDataset_loss_med"]
    print("\n[stop paths] signal -> checkpoint on disk and exit, seconds (tiny model, CPU):")
    for phase, value in seconds.items():
        print(f"  {phase:<13} {value:.2f}")
    assert max(seconds.values()) < 30


def test_sigterm_on_one_rank_mid_epoch_stops_the_job_at_the_same_step(synthetic_root, tmp_path):
    out = tmp_path / "term"
    assert run(synthetic_root, out, tmp_path, 2, "SIGTERM@train_step@1") == [3, 3]
    assert "SIGTERM (received by another rank): checkpoint-last.pth written" in preemption_lines(out)[-1]
    state = torch.load(out / "checkpoint-last.pth", weights_only=True)["resume"]
    assert (state["epoch"], state["consumed"], state["epoch_complete"]) == (0, 6, False)


def test_a_resume_with_another_world_size_continues_the_epoch(synthetic_root, tmp_path):
    out = tmp_path / "elastic"
    assert run(synthetic_root, out, tmp_path, 2, "SIGUSR2@train_step@0") == [3, 3]
    assert run(synthetic_root, out, tmp_path, 1) == [0]
    console = (out / "console.log").read_text()
    assert "resume: world size changed from 2 to 1: epoch 0 continues at global batch 6 of 9" in console
    assert "RNG states of 2 rank(s) saved, 1 now" in console  # the run says it is exact, not bitwise
    assert [r["epoch"] for r in records(out)] == [1, 2]


def test_a_rank_that_fails_is_named_and_the_others_end(synthetic_root, tmp_path):
    broken = tmp_path / "broken_data"
    shutil.copytree(synthetic_root, broken)
    image = sorted((broken / "opv2v" / "train").rglob("*_camera0.png"))[0]
    image.write_bytes(b"not a png")
    out = tmp_path / "fails"
    codes = run(broken, out, tmp_path, 2)
    assert all(code != 0 for code in codes), codes
    console = (out / "console.log").read_text()
    failed = re.findall(r"rank (\d) of 2 on \S+ \(pid \d+\) FAILED: (.*)", console)
    assert failed, console[-2000:]
    assert any(image.name in cause for _, cause in failed), failed


def tensorboard_steps(out, tag):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    return [(e.step, e.value) for e in events.Scalars(tag)]


def test_tensorboard_after_a_replayed_epoch_has_each_step_once(synthetic_root, tmp_path):
    """A job killed after logging steps its checkpoint does not hold replays them on resume."""
    out = tmp_path / "replayed"
    extra = ("train_params.print_freq=1", "train_params.eval_before_training=false")
    assert run(synthetic_root, out, tmp_path, 1, None, "train_params.epochs=1", *extra) == [0]
    kept = tmp_path / "epoch0.pth"
    kept.write_bytes((out / "checkpoint-last.pth").read_bytes())
    longer = ("train_params.epochs=2", "train_params.resume=force")  # the run extended: a changed schedule
    assert run(synthetic_root, out, tmp_path, 1, None, *longer, *extra) == [0]
    first_pass = tensorboard_steps(out, "train_loss")
    # as if the process had died after logging epoch 1 but before any checkpoint of it
    for name in ("checkpoint-last.pth", "checkpoint-best.pth", "checkpoint-final.pth"):
        (out / name).unlink(missing_ok=True)
    (out / "checkpoint-last.pth").write_bytes(kept.read_bytes())
    assert run(synthetic_root, out, tmp_path, 1, None, *longer, *extra) == [0]
    steps = [step for step, _ in tensorboard_steps(out, "train_loss")]
    assert steps == sorted(set(steps)) == [step for step, _ in first_pass]  # each step once, none lost
    epochs = [step for step, _ in tensorboard_steps(out, "OPV2VDataset_loss_med")]
    assert epochs == [1000, 2000]  # the finished epoch's statistics survive the resume's purge


def test_batches_of_drawn_view_counts_and_aspect_ratios_resume_mid_epoch_bitwise(synthetic_root, tmp_path):
    """MapAnything's data options all on (a view count and a resolution drawn per batch, colour
    transform, crop zoom): a run stopped mid-epoch and resumed ends as the uninterrupted run."""
    drawn = ("dataset.train.variable_num_views=true", "dataset.resolution_train=[[56,42],[42,56],[56,28]]",
             "dataset.train_epoch_size=24", "train_params.max_num_of_imgs_per_gpu=8")
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    assert run(synthetic_root, straight, tmp_path, 1, None, *drawn) == [0]
    assert run(synthetic_root, stopped, tmp_path, 1, "SIGUSR2@train_step", *drawn) == [3]
    state = torch.load(stopped / "checkpoint-last.pth", weights_only=True)["resume"]
    assert state["epoch"] == 0 and 0 < state["consumed"] < 6  # 24 // 4 batches: mid-epoch
    assert run(synthetic_root, stopped, tmp_path, 1, None, *drawn) == [0]
    a = torch.load(straight / "checkpoint-final.pth", weights_only=True)["model"]
    b = torch.load(stopped / "checkpoint-final.pth", weights_only=True)["model"]
    assert all(torch.equal(a[key], b[key]) for key in a)
    assert records(stopped)[0]["train_loss"] == records(straight)[0]["train_loss"]
    assert ("a view count n drawn per batch in 2..4, max(1, 8 // n) samples per batch, one of 3 resolutions drawn "
            "per batch (MapAnything's batching), 6 steps per epoch") in (straight / "console.log").read_text()



def test_ctrl_c_saves_the_position_says_so_in_one_line_and_a_rerun_resumes_exactly(synthetic_root, tmp_path):
    """A terminal's Ctrl-C reaches every rank and their data-loader workers: the job stops as for a
    preemption, exit code 130, no traceback, `status` says interrupted, the rerun ends as an uninterrupted run."""
    import subprocess
    import sys

    straight, stopped, logs = tmp_path / "straight", tmp_path / "stopped", tmp_path / "logs"
    logs.mkdir()
    assert run(synthetic_root, straight, tmp_path) == [0, 0]
    procs = start_ranks(tiny_overrides(synthetic_root, stopped, *SETTINGS, "machine.num_workers=1"), 2, logs)
    wait_for_text(stopped / "console.log", "first training step done")
    for proc in procs:
        children = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
        for pid in [proc.pid, *map(int, children)]:
            os.kill(pid, signal.SIGINT)
    assert wait_all(procs) == [130, 130]
    console = (stopped / "console.log").read_text()
    assert "[preemption] SIGINT (Ctrl-C, received by this rank): " in console
    assert "interrupted: rerun the same command to resume" in console
    assert "Traceback" not in (logs / "rank0.log").read_text() + (logs / "rank1.log").read_text()
    status = subprocess.run([sys.executable, "-m", "mapanything_ext.status", str(stopped)], capture_output=True,
                            text=True)
    assert "interrupted (Ctrl-C; rerun the command to resume)" in status.stdout, status.stdout
    assert run(synthetic_root, stopped, tmp_path) == [0, 0]
    a = torch.load(straight / "checkpoint-final.pth", weights_only=True)["model"]
    b = torch.load(stopped / "checkpoint-final.pth", weights_only=True)["model"]
    assert all(torch.equal(a[key], b[key]) for key in a)
