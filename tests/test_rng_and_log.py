"""RNG capture/restore and the idempotent epoch log (the schedule and groups: tests/test_recipe.py)."""

import json
import random

import numpy as np
import torch

from mapanything_ext.run_log import append_epoch_record
from mapanything_ext.train import rng_state


def test_rng_states_restore_exactly_and_survive_weights_only(tmp_path):
    rng_state.seed_everything(7)
    state = rng_state.capture()
    torch.save(state, tmp_path / "rng.pth")
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    rng_state.seed_everything(99)
    rng_state.restore(torch.load(tmp_path / "rng.pth", weights_only=True))
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected


def test_replayed_epoch_replaces_its_log_line(tmp_path):
    log = tmp_path / "log.txt"
    append_epoch_record(log, {"epoch": 0, "train_loss": 2.0})
    append_epoch_record(log, {"epoch": 1, "train_loss": 1.0})
    append_epoch_record(log, {"epoch": 1, "train_loss": 0.9})
    records = [json.loads(line) for line in log.read_text().splitlines()]
    assert [r["epoch"] for r in records] == [0, 1]
    assert records[1]["train_loss"] == 0.9
