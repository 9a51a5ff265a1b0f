"""Mid-epoch saves in the background (train_params.save_every_steps / save_every_minutes): real training
processes, real SIGKILLs (one in the middle of a background write, one at a random moment), real files.

A run that saves mid-epoch trains the same model as one that does not, and a run killed at any moment
resumes from its newest verified state, at most one interval back, to the same final model.
"""

import random
import signal
import subprocess
import time

import pytest
import torch

from mapanything_ext.checkpoint import load_checkpoint, verify_checkpoint
from tests.training_runs import run_training, start_ranks, tiny_overrides, train_command, wait_all, REPO

pytestmark = pytest.mark.slow

# One epoch of 9 steps (one sample of 4 views per batch).
NINE_STEPS = ("train_params.epochs=1", "train_params.max_num_of_imgs_per_gpu=4")


def final_model(out):
    return load_checkpoint(out / "checkpoint-final.pth", map_location="cpu")["model"]


def assert_same_model(a, b):
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


@pytest.fixture(scope="module")
def straight(synthetic_root, tmp_path_factory):
    """The run without mid-epoch saves: the model every other run here must end with."""
    out = tmp_path_factory.mktemp("bg") / "straight"
    proc = run_training(tiny_overrides(synthetic_root, out, *NINE_STEPS, "train_params.save_every_minutes=null"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "background save" not in (out / "console.log").read_text()
    return final_model(out)


def test_a_sigkill_in_a_background_write_resumes_one_interval_back_to_the_same_model(synthetic_root, tmp_path,
                                                                                    straight):
    out = tmp_path / "killed"
    overrides = tiny_overrides(synthetic_root, out, *NINE_STEPS, "train_params.save_every_steps=3")
    # The second background write (global step 6) dies with its temporary file complete, not yet renamed.
    killed = run_training(overrides, {"MAPANYTHING_EXT_FAULT": "SIGKILL@background_write@0@2"})
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    console = (out / "console.log").read_text()
    started = saves_started(console)
    assert len(started) == 2 and started[0] == 3, console[-3000:]  # the second postponed while a write runs
    assert f"background save of global step {started[0]} written to checkpoint-last.pth" in console
    assert list(out.glob("checkpoint-last.pth.*.tmp")), "the kill did not land inside the write"
    assert verify_checkpoint(out / "checkpoint-last.pth").valid
    on_disk = load_checkpoint(out / "checkpoint-last.pth", map_location="cpu")["resume"]
    assert on_disk["global_step"] == on_disk["consumed"] == 3  # one interval back from the kill

    resumed = run_training(overrides)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    console = (out / "console.log").read_text()
    assert "resumed from " in console and "epoch 1, 3 batches of it done, global step 3" in console
    assert not list(out.glob("*.tmp"))  # the torn temporary file was quarantined
    assert_same_model(final_model(out), straight)


def test_a_sigkill_at_a_random_moment_resumes_from_the_newest_state_written_to_the_same_model(synthetic_root, tmp_path,
                                                                                        straight):
    out = tmp_path / "random"
    overrides = tiny_overrides(synthetic_root, out, *NINE_STEPS, "train_params.save_every_steps=1")
    proc = subprocess.Popen(train_command(overrides), cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    console = out / "console.log"
    deadline = time.time() + 120
    while time.time() < deadline and "background save of global step 2 written" not in _text(console):
        time.sleep(0.01)
    time.sleep(random.Random(7).uniform(0.0, 0.15))  # somewhere in the steps and writes that follow
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(60) == -signal.SIGKILL
    trained = _text(console).count("[train] epoch 1 step ")
    written = [int(line.split("global step ")[1].split()[0]) for line in _text(console).splitlines()
               if line.startswith("[mapanything_ext] background save of global step") and " written " in line]
    assert trained < 9, "the run ended before the kill: nothing was tested"
    resumed = run_training(overrides)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    line = next(line for line in _text(console).splitlines() if "resumed from " in line)
    resumed_at = int(line.split("global step ")[1].split()[0])
    # The newest state on disk: at least the newest write the log confirms (the kill may fall between a
    # rename and its log line), never a step the run had not trained.
    assert written[-1] <= resumed_at <= trained + 1, (line, written, trained)
    assert_same_model(final_model(out), straight)


def test_saves_by_the_clock_come_at_the_same_step_on_every_rank(synthetic_root, tmp_path):
    out = tmp_path / "clock"
    # Due at every poll: rank 0's flag must reach rank 1 through the stop poll, or the state's gathering
    # (a collective) would hang one rank against the other's next step.
    overrides = tiny_overrides(synthetic_root, out, *NINE_STEPS, "train_params.epochs=3",
                               "train_params.save_every_minutes=0.0001")
    procs = start_ranks(overrides, 2, tmp_path)
    assert wait_all(procs, timeout=300) == [0, 0], (tmp_path / "rank1.log").read_text()[-3000:]
    console = (out / "console.log").read_text()
    saves = saves_started(console)
    assert len(saves) >= 2, console[-3000:]
    assert all(b - a >= 2 for a, b in zip(saves, saves[1:]))  # a poll computed before a save is not counted again
    assert verify_checkpoint(out / "checkpoint-final.pth").valid


def saves_started(console: str) -> list[int]:
    return [int(line.split("global step ")[1].split()[0]) for line in console.splitlines()
            if line.startswith("[mapanything_ext] background save of global step") and " started " in line]


def _text(path):
    try:
        return path.read_text(errors="replace")
    except FileNotFoundError:
        return ""
