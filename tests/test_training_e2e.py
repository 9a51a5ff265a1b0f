"""End-to-end training through the real entry point: it learns, it resumes exactly, it stops safely."""

import json
import subprocess
import sys

import pytest
import torch

from mapanything_ext.checkpoint import verify_checkpoint
from mapanything_ext.run_log import read_epoch_records as records
from tests.training_runs import REPO, run_training, stage_overrides, tiny_overrides

pytestmark = pytest.mark.slow


def test_stage1_learns_and_writes_everything(synthetic_root, tmp_path):
    out = tmp_path / "stage1"
    overrides = tiny_overrides(synthetic_root, out, "stage=stage1", "train_params.epochs=8",
                               "train_params.max_num_of_imgs_per_gpu=4", "train_params.eval_before_training=true",
                               "dataset.resolution_train=[112,84]", "dataset.resolution_test=[112,84]",
                               "model.dim=64", "model.depth=2", "train_params.lr=1e-3")
    proc = run_training(overrides)
    assert proc.returncode == 0, proc.stderr[-3000:]
    initial = json.loads((out / "initial_eval.json").read_text())
    final = records(out)[-1]
    assert [r["epoch"] for r in records(out)] == list(range(1, 9))
    # held-out loss clearly below its starting value, and the depth metric improves
    assert final["OPV2VDataset_loss_med"] < 0.6 * initial["loss_med"]
    assert final["OPV2VDataset_depth_abs_rel_avg"] < 0.8 * initial["depth_abs_rel_avg"]
    for name in ("checkpoint-last.pth", "checkpoint-best.pth", "checkpoint-final.pth"):
        assert verify_checkpoint(out / name).valid
        ckpt = torch.load(out / name, weights_only=True)
        assert isinstance(ckpt["args"], dict) and ckpt["args"]["train_params"]["max_num_of_imgs_per_gpu"] == 4
    console = (out / "console.log").read_text()
    assert "train_params:" in console and "max_num_of_imgs_per_gpu: 4" in console
    assert "[startup] model built on cpu: " in console  # where a (re)start spends its time, phase by phase
    assert list((out / "tensorboard").iterdir())
    assert not [p.name for p in out.rglob("*") if p.is_file() and p.stat().st_size == 0]  # no empty files
    # a rerun of the finished command resumes from its newest checkpoint and trains nothing more
    again = run_training(overrides)
    assert again.returncode == 0 and "resumed from" in again.stdout and "saved" not in again.stdout
    assert "[startup] checkpoint chosen, verified and loaded (the rest of it): " in again.stdout
    assert len(records(out)) == 8
    # resuming with a different model is refused with a message naming the change, not a tensor-shape traceback
    other = run_training(overrides + ["model.dim=32"])
    assert other.returncode != 0 and "SettingsChanged" in other.stderr and "model.dim: 64 -> 32" in other.stderr


def test_loss_instability_stops_without_writing_checkpoints(synthetic_root, tmp_path):
    out = tmp_path / "unstable"
    proc = run_training(tiny_overrides(synthetic_root, out, "train_params.max_loss_value=0.001"))
    assert proc.returncode != 0
    assert "max_loss_value=0.001" in proc.stderr and "stopping without saving" in proc.stderr
    assert not list(out.glob("*.pth"))


def test_local_pipeline_chains_stages_through_checkpoint_best(synthetic_root, tmp_path):
    """Stage 1 -> 2 -> 3 run one after another: each later stage starts from the earlier best."""
    experiments = tmp_path / "experiments"
    proc = subprocess.run([sys.executable, "-m", "mapanything_ext.pipeline", "--launcher", "local",
                           *stage_overrides(synthetic_root, experiments, "train_params.epochs=1")],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for stage, folder, previous in (("stage1", "opv2v_ft_stage1", None),
                                    ("stage2", "opv2v_coop_stage2_full", "opv2v_ft_stage1"),
                                    ("stage3", "opv2v_coop_stage3_varviews", "opv2v_coop_stage2_full")):
        out = experiments / folder
        assert f"[pipeline] {stage}: running -> {out}" in proc.stdout
        assert verify_checkpoint(out / "checkpoint-best.pth").valid
        if previous:
            best = experiments / previous / "checkpoint-best.pth"
            assert f"[pretrained] {best}: loaded" in (out / "console.log").read_text()
    args = torch.load(experiments / "opv2v_coop_stage3_varviews" / "checkpoint-final.pth", weights_only=True)["args"]
    assert args["model"]["gradient_checkpointing"] is True
    assert args["dataset"]["num_views"] == 10 and args["train_params"]["max_num_of_imgs_per_gpu"] == 12


def test_pipeline_starting_after_stage1_needs_its_checkpoint(synthetic_root, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "mapanything_ext.pipeline", "--launcher", "local",
                           "--stages", "stage2,stage3", *stage_overrides(synthetic_root, tmp_path / "experiments")],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "opv2v_ft_stage1/checkpoint-best.pth, which does not exist" in proc.stderr
    assert "--stages stage1,stage2" in proc.stderr


def test_missing_pretrained_checkpoint_is_a_clear_error(synthetic_root, tmp_path):
    out = tmp_path / "experiments" / "opv2v_coop_stage2_full"
    proc = run_training(tiny_overrides(synthetic_root, out, "stage=stage2"))
    assert proc.returncode != 0
    assert "opv2v_ft_stage1/checkpoint-best.pth does not exist" in proc.stderr


def test_submitit_local_launcher_runs_the_same_job(synthetic_root, tmp_path):
    out = tmp_path / "submitit_local"
    proc = run_training(["-m", "hydra/launcher=submitit_local", *tiny_overrides(synthetic_root, out,
                                                                              "train_params.epochs=1")])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert verify_checkpoint(out / "checkpoint-final.pth").valid
    assert list((out / ".submitit").glob("*/*_log.out"))  # it really went through submitit
    assert "validated against ConfigStore schema" not in proc.stderr


def test_a_batch_job_log_gets_progress_lines_not_a_carriage_returned_bar(synthetic_root, tmp_path):
    out = tmp_path / "batch"
    proc = run_training(tiny_overrides(synthetic_root, out, "train_params.epochs=1", "train_params.print_freq=2"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    console = (out / "console.log").read_text()
    assert "\r" not in console  # no terminal: no progress bar
    lines = [line for line in console.splitlines() if line.startswith("[train] epoch 1 step ")]
    assert [line.split(":")[0] for line in lines] == ["[train] epoch 1 step 2/4", "[train] epoch 1 step 4/4"]
    assert all("img/s, step " in line and "s, data wait " in line and "run left " in line for line in lines)
    assert "[eval] test batch " in console


def test_a_missing_depth_file_stops_the_run_or_is_skipped_and_counted(synthetic_root, tmp_path):
    import shutil

    root = tmp_path / "data"
    shutil.copytree(synthetic_root, root)
    missing = sorted((root / "opv2v_depth" / "train").rglob("*_depth2.png"))[0]
    missing.unlink()
    base = tiny_overrides(root, tmp_path / "unused", "train_params.epochs=1", "train_params.max_num_of_imgs_per_gpu=4")
    stopped = run_training([*base, f"output_dir={tmp_path / 'error'}"])
    assert stopped.returncode != 0 and f"depth file missing: {missing}" in stopped.stderr, stopped.stderr[-2000:]
    skipped = run_training([*base, f"output_dir={tmp_path / 'skip'}", "dataset.on_bad_sample=skip",
                            "dataset.max_bad_fraction=0.5"])
    assert skipped.returncode == 0, skipped.stderr[-2000:]
    assert "skipping train/" in (tmp_path / "skip" / "console.log").read_text()
    assert records(tmp_path / "skip")[0]["train_bad_samples"] == 1
    too_many = run_training([*base, f"output_dir={tmp_path / 'too_many'}", "dataset.on_bad_sample=skip",
                             "dataset.max_bad_fraction=0.01"])
    assert too_many.returncode != 0 and "BadDataError: 1 unreadable training samples skipped in epoch 1" in \
        too_many.stderr, too_many.stderr[-2000:]


def test_a_pipeline_rerun_after_stage1_was_trained_again_trains_stage2_again(synthetic_root, tmp_path):
    """The pipeline's later stage remembers (by content) the earlier stage's best it started from: after
    Stage 1 is trained again, rerunning Stage 2 moves its earlier run aside and trains it again."""
    from mapanything_ext.train.settings_check import fingerprint

    experiments = tmp_path / "experiments"

    def pipeline(stages, *extra):
        return subprocess.run([sys.executable, "-m", "mapanything_ext.pipeline", "--launcher", "local", "--stages",
                               stages, *stage_overrides(synthetic_root, experiments, "train_params.epochs=1", *extra)],
                              cwd=REPO, capture_output=True, text=True, timeout=600)

    assert pipeline("stage1,stage2").returncode == 0
    stage1, stage2 = experiments / "opv2v_ft_stage1", experiments / "opv2v_coop_stage2_full"
    before = torch.load(stage2 / "checkpoint-final.pth", weights_only=True)["resume"]["pretrained_fingerprint"]
    assert before == fingerprint(stage1 / "checkpoint-best.pth")
    import shutil

    shutil.rmtree(stage1)  # Stage 1 trained again, from another seed: another checkpoint-best
    again = pipeline("stage1", "train_params.seed=5")
    assert again.returncode == 0, again.stderr[-3000:]
    rerun = pipeline("stage2")
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    console = (stage2 / "console.log").read_text()
    assert "is not the file this stage trained from" in console and "training this stage again" in console
    after = torch.load(stage2 / "checkpoint-final.pth", weights_only=True)["resume"]["pretrained_fingerprint"]
    assert after == fingerprint(stage1 / "checkpoint-best.pth") != before
    old = list((stage2 / "superseded").glob("*/checkpoint-final.pth"))
    assert len(old) == 1 and torch.load(old[0], weights_only=True)["resume"]["pretrained_fingerprint"] == before
    # Run once more: nothing changed upstream, so the finished stage stays as it is.
    assert pipeline("stage2").returncode == 0
    assert len(list((stage2 / "superseded").iterdir())) == 1
