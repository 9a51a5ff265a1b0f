"""A resume goes on with the settings it was trained with (train/settings_check.py): a change that alters
what is trained stops the job, naming it; an inert one is logged; train_params.resume=force goes on."""

import shutil

import pytest

from mapanything_ext.train.settings_check import fingerprint
from tests.training_runs import run_training, tiny_overrides

pytestmark = pytest.mark.slow


def test_a_resume_with_other_settings_stops_naming_each_change_and_force_goes_on(synthetic_root, tmp_path):
    out = tmp_path / "run"
    first = tiny_overrides(synthetic_root, out, "train_params.epochs=1", "train_params.max_steps_per_epoch=2")
    assert run_training(first).returncode == 0
    changed = run_training([*first, "train_params.lr=5e-3", "train_params.seed=3"])
    assert changed.returncode != 0
    assert "SettingsChanged" in changed.stderr and "train_params.lr: 0.002 -> 0.005" in changed.stderr
    assert "train_params.seed: 0 -> 3" in changed.stderr and "train_params.resume=force" in changed.stderr
    inert = run_training([*first, "train_params.print_freq=7", "machine.num_workers=1"])
    assert inert.returncode == 0, inert.stderr[-2000:]
    console = (out / "console.log").read_text()
    assert "without effect on what is trained: train_params.print_freq: 1 -> 7" in console
    forced = run_training([*first, "train_params.lr=5e-3", "train_params.resume=force"])
    assert forced.returncode == 0, forced.stderr[-2000:]
    assert "train_params.resume=force: continuing with train_params.lr: 0.002 -> 0.005" in (out / "console.log").read_text()


def test_a_retrained_earlier_stage_at_the_same_path_stops_the_next_stages_resume(synthetic_root, tmp_path):
    upstream, other = tmp_path / "stage1", tmp_path / "stage1_again"
    assert run_training(tiny_overrides(synthetic_root, upstream, "train_params.epochs=1",
                                       "train_params.max_steps_per_epoch=2")).returncode == 0
    assert run_training(tiny_overrides(synthetic_root, other, "train_params.epochs=1", "train_params.seed=5",
                                       "train_params.max_steps_per_epoch=2")).returncode == 0
    best = upstream / "checkpoint-best.pth"
    copy = tmp_path / "moved.pth"
    shutil.copyfile(best, copy)
    assert fingerprint(copy) == fingerprint(best) != fingerprint(other / "checkpoint-best.pth")
    stage2 = tiny_overrides(synthetic_root, tmp_path / "stage2", "train_params.epochs=1",
                            "train_params.max_steps_per_epoch=2", f"model.pretrained={best}")
    assert run_training(stage2).returncode == 0
    assert run_training(stage2).returncode == 0  # the same upstream file: resumes (nothing left to train)
    shutil.copyfile(other / "checkpoint-best.pth", best)  # Stage 1 retrained into the same path
    again = run_training(stage2)
    assert again.returncode != 0 and "model.pretrained (its content)" in again.stderr, again.stderr[-2000:]
