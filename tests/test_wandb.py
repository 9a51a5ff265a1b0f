"""logger=wandb, offline (no network): the same scalars as TensorBoard, and a stopped and resumed job
continues the same W&B run, its id kept in the checkpoint. Real training processes, real W&B files."""

import signal  # noqa: F401 -- (the stop goes through MAPANYTHING_EXT_FAULT's real SIGUSR2)

import pytest
import torch

from tests.training_runs import run_training, tiny_overrides

pytestmark = pytest.mark.slow
wandb = pytest.importorskip("wandb")

OFFLINE = {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_DISABLE_GIT": "true", "WANDB_CONSOLE": "off"}


def tensorboard_tags(out):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tags = set()
    for events in (out / "tensorboard").glob("events.*"):
        acc = EventAccumulator(str(events), size_guidance={"scalars": 0})
        acc.Reload()
        tags |= set(acc.Tags()["scalars"])
    return tags


def test_a_stopped_and_resumed_job_continues_one_wandb_run_with_tensorboards_scalars(synthetic_root, tmp_path):
    out = tmp_path / "run"
    overrides = tiny_overrides(synthetic_root, out, "logger=wandb", "logger.mode=offline")
    stopped = run_training(overrides, {**OFFLINE, "MAPANYTHING_EXT_FAULT": "SIGUSR2@train_step"})
    assert stopped.returncode == 3, stopped.stderr[-3000:]  # left for requeue with the position saved
    run_id = (out / "wandb_run_id").read_text().strip()
    state = torch.load(out / "checkpoint-last.pth", weights_only=True)["resume"]
    assert state["wandb_run_id"] == run_id
    (out / "wandb_run_id").unlink()  # the resumed job must take the id from the checkpoint
    resumed = run_training(overrides, OFFLINE)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert (out / "wandb_run_id").read_text().strip() == run_id
    runs = sorted((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and all(r.name.endswith(f"-{run_id}") for r in runs), runs  # one W&B run, two jobs
    logged = b"".join(f.read_bytes() for r in runs for f in r.glob("*.wandb"))
    tags = tensorboard_tags(out)
    assert {"train_loss", "train_lr"} <= tags
    missing = [tag for tag in tags if tag.encode() not in logged]
    assert not missing, f"TensorBoard scalars W&B did not get: {missing}"
    assert b"epoch_1000x" in logged


def test_logger_wandb_without_the_package_names_the_install_command(synthetic_root, tmp_path):
    fake = tmp_path / "site"
    fake.mkdir()
    (fake / "wandb.py").write_text("raise ImportError('no wandb here')\n")
    import os

    proc = run_training(tiny_overrides(synthetic_root, tmp_path / "run", "logger=wandb"),
                        {"PYTHONPATH": f"{fake}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"})
    assert proc.returncode != 0
    assert 'pip install "mapanything-ext[wandb]"' in proc.stderr + proc.stdout
