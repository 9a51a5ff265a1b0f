"""LR schedule, parameter groups, RNG capture/restore, idempotent epoch log."""

import json
import random

import numpy as np
import pytest
import torch

from mapanything_ext.models.compact import CompactMapAnything
from mapanything_ext.train import rng_state
from mapanything_ext.train.optim import param_groups
from mapanything_ext.run_log import append_epoch_record
from mapanything_ext.train.schedule import lr_at, warmup_warning


def test_warmup_is_linear_then_half_cosine_to_min_lr():
    kw = dict(lr=1e-3, min_lr=1e-5, warmup_epochs=2, epochs=10)
    assert lr_at(0, **kw) == 0
    assert lr_at(1, **kw) == pytest.approx(5e-4)
    assert lr_at(2, **kw) == pytest.approx(1e-3)
    assert lr_at(6, **kw) == pytest.approx(1e-5 + (1e-3 - 1e-5) * 0.5)
    assert lr_at(10, **kw) == pytest.approx(1e-5)
    values = [lr_at(e / 10, **kw) for e in range(20, 100)]
    assert all(a >= b for a, b in zip(values, values[1:]))


def test_no_weight_decay_on_biases_norms_and_tokens():
    model = CompactMapAnything(dim=32, depth=1, num_heads=2)
    decay, no_decay = param_groups(model, 0.05)
    names = {id(p): n for n, p in model.named_parameters()}
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    assert all(p.ndim > 1 for p in decay["params"])
    no_decay_names = {names[id(p)] for p in no_decay["params"]}
    assert "scale_token" in no_decay_names
    assert any(n.endswith("norm1.weight") for n in no_decay_names)


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


def test_a_warm_up_as_long_as_the_run_is_told_with_the_peak_it_reaches():
    from omegaconf import OmegaConf

    stage1 = OmegaConf.create({"lr": 5e-5, "min_lr": 1e-6, "warmup_epochs": 10, "epochs": 5})
    warning = warmup_warning(stage1)
    assert "peaks at 2.5e-05 (50% of train_params.lr=5e-05)" in warning and "never decays" in warning
    assert "train_params.warmup_epochs=0.5" in warning
    assert warmup_warning(OmegaConf.create({**stage1, "warmup_epochs": 0.5})) is None
