"""MapAnything's recipe, part by part, where no MapAnything is needed (tests/test_recipe_oracle.py
holds our engine against MapAnything's own loop where it is installed)."""

import json
import math

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from mapanything_ext import train_params as params
from mapanything_ext.config import compose_training
from mapanything_ext.datasets.batch_sampler import DynamicBatchSampler
from mapanything_ext.models.compact import CompactMapAnything
from mapanything_ext.train.evaluation_loop import summarise
from mapanything_ext.train.optim import lr_at, param_groups, set_lr
from mapanything_ext.train.step import _step_unless_nonfinite, view_scale
from tests.training_runs import run_training, tiny_overrides


def tp_of(*overrides: str) -> params.TrainParams:
    return params.load(compose_training(list(overrides)).train_params)


# ---- train_params: one schema, nothing silently ignored ----

def test_an_unknown_train_params_key_is_refused_however_it_is_given():
    with pytest.raises(Exception, match="Could not override 'train_params.lr_typo'"):
        compose_training(["train_params.lr_typo=1"])
    with pytest.raises(ValueError, match="unknown key.*foo"):
        tp_of("+train_params.foo=1")
    with pytest.raises(ValueError, match="submodule_configs.encoder: unknown key.*lrr"):
        tp_of("+train_params.submodule_configs.encoder.lrr=0")


def test_fp16_is_refused_with_what_to_use_instead():
    with pytest.raises(ValueError, match="amp_dtype=fp16 is not supported.*amp_dtype=bf16.*amp=false"):
        tp_of("train_params.amp_dtype=fp16")
    assert tp_of("train_params.amp=false", "train_params.amp_dtype=fp16").amp is False


def test_mapanything_defaults_and_presets():
    tp = tp_of()
    assert (tp.gradient_clip, tp.batching, tp.lr, tp.min_lr, tp.warmup_epochs, tp.weight_decay) == \
        (1.0, "mapanything", 1e-4, 1e-6, 10, 0.05)
    assert (tp.max_loss_value, tp.check_loss_instability, tp.keep_freq, tp.print_freq) == (1000, True, 10, 20)
    preset = tp_of("train_params=finetune_with_lower_encoder_lr", "train_params.warmup_epochs=2")
    assert (preset.lr, preset.submodule_configs["encoder"].lr) == (5e-6, 2.5e-7)
    assert preset.submodule_configs["encoder"].warmup_epochs == 2  # interpolated, as in MapAnything's preset
    assert tp_of("train_params=freeze_encoder").submodule_configs["encoder"].lr == 0


def test_a_warm_up_as_long_as_the_run_is_told_with_the_peak_it_reaches():
    stage1 = tp_of("train_params.lr=5e-5", "train_params.epochs=5")
    warning = stage1.warmup_warning()
    assert "peaks at 2.5e-05 (50% of train_params.lr=5e-05)" in warning and "never decays" in warning
    assert "train_params.warmup_epochs=0.5" in warning
    assert tp_of("train_params.epochs=5", "train_params.warmup_epochs=0.5").warmup_warning() is None


# ---- parameter groups and schedule ----

def test_weight_decay_groups_are_mapanythings():
    model = CompactMapAnything(dim=32, depth=1, num_heads=2)
    groups, schedules = param_groups(model, tp_of())
    assert [(g["weight_decay"], s.submodule) for g, s in zip(groups, schedules)] == [(0.05, "default"), (0.0, "default")]
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in groups[0]["params"]}
    # 1-D tensors and .bias are not decayed; every other tensor is, a token of shape (1, 1, D) too.
    assert "scale_token" in decayed and "patch_embed.weight" in decayed
    assert not any(n.endswith(".bias") for n in decayed)
    assert all(p.ndim == 1 or names[id(p)].endswith(".bias") for p in groups[1]["params"])


def test_submodule_groups_and_their_schedules():
    model = CompactMapAnything(dim=32, depth=1, num_heads=2)
    tp = tp_of("+train_params.submodule_configs.blocks.lr=1e-5", "+train_params.submodule_configs.blocks.min_lr=0",
               "+train_params.submodule_configs.blocks.warmup_epochs=0", "train_params.epochs=4")
    groups, schedules = param_groups(model, tp)
    assert sorted(s.submodule for s in schedules) == ["blocks", "blocks", "default", "default"]
    optimizer = torch.optim.AdamW(groups)
    set_lr(optimizer, schedules, 2.0, 4)
    for group, schedule in zip(optimizer.param_groups, schedules):
        if schedule.submodule == "blocks":
            assert group["lr"] == pytest.approx(lr_at(2.0, 1e-5, 0.0, 0.0, 4))
        else:
            assert group["lr"] == pytest.approx(2e-5)  # 2 of 10 warm-up epochs at lr 1e-4


def test_a_submodule_configs_key_that_names_nothing_is_refused():
    model = CompactMapAnything(dim=32, depth=1, num_heads=2)
    with pytest.raises(ValueError, match="names encoder, which no parameter.*blocks, dense_head"):
        param_groups(model, tp_of("train_params=freeze_encoder"))


def test_warmup_is_linear_then_half_cosine_to_min_lr():
    kw = dict(lr=1e-3, min_lr=1e-5, warmup_epochs=2, epochs=10)
    assert lr_at(0, **kw) == 0
    assert lr_at(1, **kw) == pytest.approx(5e-4)
    assert lr_at(6, **kw) == pytest.approx(1e-5 + (1e-3 - 1e-5) * 0.5)
    values = [lr_at(e / 10, **kw) for e in range(20, 100)]
    assert all(a >= b for a, b in zip(values, values[1:]))


# ---- the step ----

def test_loss_scale_is_two_over_the_view_count_above_two_views():
    assert [view_scale(n) for n in (1, 2, 3, 4, 8, 10)] == [1.0, 1.0, 2 / 3, 0.5, 0.25, 0.2]


@pytest.mark.parametrize("fused,device", [(False, "cpu"), (True, "cpu"), (True, "cuda")])
def test_a_non_finite_gradient_changes_neither_weights_nor_optimizer_state(fused, device):
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU (the fused kernel skips the step on the device)")
    weight = torch.nn.Parameter(torch.ones(3, device=device))
    optimizer = torch.optim.AdamW([weight], lr=0.1, fused=fused or None)
    weight.grad = torch.ones(3, device=device)
    _step_unless_nonfinite(optimizer, torch.tensor(1.0, device=device))
    after_one, state = weight.detach().clone(), {k: v.clone() for k, v in optimizer.state[weight].items()}
    assert not torch.equal(after_one, torch.ones(3, device=device))  # the finite step did change it
    weight.grad = torch.tensor([1.0, math.nan, 1.0], device=device)
    _step_unless_nonfinite(optimizer, torch.tensor(math.nan, device=device))
    assert torch.equal(weight.detach(), after_one)
    for key, value in optimizer.state[weight].items():
        assert torch.equal(value, state[key]), key


# ---- batches ----

def test_mapanything_batching_shuffles_by_epoch_plus_777_and_drops_the_tail():
    sampler = DynamicBatchSampler(23, lambda i: 4, 8, seed=5, batch_size=2)
    sampler.set_epoch(3)
    order = np.arange(23)
    np.random.default_rng(seed=3 + 777).shuffle(order)
    # 11 whole batches; items (index, resolution index, view count: None, the dataset's fixed one)
    assert list(sampler) == [[(int(j), 0, None) for j in order[i:i + 2]] for i in range(0, 22, 2)]
    two = [DynamicBatchSampler(23, lambda i: 4, 8, rank=r, world_size=2, batch_size=2) for r in (0, 1)]
    for s in two:
        s.set_epoch(3)
    assert len(two[0]) == len(two[1]) == 5  # (23 // 2) // 2, round-robin
    assert [b for pair in zip(*map(list, two)) for b in pair] == list(sampler)[:10]


def test_mapanything_batching_accepts_samples_over_the_budget_but_not_mixed_stacks():
    over = DynamicBatchSampler(4, lambda i: 10, 8, batch_size=1)  # 10 views, budget 8: one per batch
    assert len(over) == 4
    with pytest.raises(ValueError, match="cannot be stacked.*4, 8 views.*batching=by_view_count"):
        DynamicBatchSampler(6, lambda i: 4 if i % 2 else 8, 16, batch_size=2)


def test_evaluation_summaries_are_mapanythings_mean_and_lower_median():
    stats = summarise([{"loss": [1.0, 4.0]}, {"loss": [2.0, 3.0]}])
    assert stats["loss_avg"] == 2.5
    assert stats["loss_med"] == 2.0  # torch's median of an even count: the lower middle value


# ---- a run ----

@pytest.mark.slow
def test_a_frozen_submodule_has_no_gradient_no_state_and_unchanged_weights(synthetic_root, tmp_path):
    out = tmp_path / "frozen"
    proc = run_training(tiny_overrides(synthetic_root, out, "train_params.epochs=1",
                                       "+train_params.submodule_configs.blocks.lr=0",
                                       "+train_params.submodule_configs.patch_embed.lr=0"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    ckpt = torch.load(out / "checkpoint-final.pth", weights_only=True)
    torch.manual_seed(0)
    init = CompactMapAnything(dim=32, depth=1, num_heads=2).state_dict()
    model = ckpt["model"]
    frozen = [k for k in model if k.startswith(("blocks.", "patch_embed."))]
    assert frozen and all(torch.equal(model[k], init[k]) for k in frozen)
    assert any(not torch.equal(model[k], init[k]) for k in model if k not in frozen)
    trained = sum(len(g["params"]) for g in ckpt["optimizer"]["param_groups"])
    assert trained == len(ckpt["optimizer"]["state"]) == len(list(model)) - len(frozen)
    console = (out / "console.log").read_text()
    assert "frozen by train_params.submodule_configs" in console


@pytest.mark.slow
def test_log_txt_and_tensorboard_carry_mapanythings_names(synthetic_root, tmp_path):
    out = tmp_path / "names"
    proc = run_training(tiny_overrides(synthetic_root, out, "train_params.keep_freq=2"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = [json.loads(line) for line in (out / "log.txt").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2]  # counted from 1
    for key in ("train_loss", "train_lr", "train_grad_norm", "OPV2VDataset_loss_avg", "OPV2VDataset_loss_med"):
        assert key in records[-1], key
    assert records[-1]["best_so_far"] == min(r["OPV2VDataset_loss_med"] for r in records)
    assert (out / "checkpoint-2.pth").exists() and not (out / "checkpoint-1.pth").exists()
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train_loss", "train_grad_norm", "train_lr", "OPV2VDataset_loss_med"} <= tags
    assert [e.step for e in events.Scalars("OPV2VDataset_loss_med")] == [1000, 2000]
    assert max(e.step for e in events.Scalars("train_loss")) < 2000


def test_defaults_compose():
    assert OmegaConf.select(compose_training([]), "train_params.gradient_clip") == 1.0


def test_the_training_set_draws_new_random_choices_every_epoch_reproducibly(synthetic_root):
    from mapanything_ext.datasets.build import build_dataset

    cfg = compose_training(["dataset=opv2v_coop_ft", f"machine.opv2v_root={synthetic_root / 'opv2v'}",
                            f"machine.opv2v_depth_root={synthetic_root / 'opv2v_depth'}",
                            "dataset.resolution_train=[56,42]", "dataset.coop_max_num_views=6"])
    dataset = build_dataset(cfg.dataset.train_dataset)

    def instances(epoch):  # which cameras of which vehicles sample 0 takes
        dataset.set_epoch(epoch)
        return [view["instance"] for view in dataset[0]]

    assert instances(0) == instances(0) and instances(1) == instances(1)
    assert len({tuple(instances(e)) for e in range(6)}) > 1


def test_an_epoch_of_n_samples_is_mapanythings_n_at_dataset():
    """`N @ Dataset`: shuffled by epoch + 777 and repeated up to N, each repetition drawn anew."""
    from mapanything_ext.datasets.epoch_size import EpochOfSize

    class Drawn:  # sample i's random draw, as our datasets take it (seed, index, epoch, repetition)
        num_views = 4

        def __init__(self):
            self.epoch = 0

        def __len__(self):
            return 5

        def set_epoch(self, epoch):
            self.epoch = epoch

        def get(self, index, repetition=0, resolution_index=0, num_views=None):
            return (index, repetition, self.epoch)

    epoch = EpochOfSize(Drawn(), 12)
    epoch.set_epoch(3)
    order = np.random.default_rng(seed=3 + 777).permutation(5)
    assert [epoch[i] for i in range(12)] == [(int(order[i % 5]), i // 5, 3) for i in range(12)]
    assert len(epoch) == 12 and epoch.num_views == 4


@pytest.mark.slow
def test_a_training_epoch_has_the_configured_size(synthetic_root, tmp_path):
    out = tmp_path / "sized"
    proc = run_training(tiny_overrides(synthetic_root, out, "train_params.epochs=1", "dataset.train_epoch_size=14"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "14 train / 9 test samples; 2 sample(s) per batch (MapAnything's batching), 7 steps per epoch" in \
        (out / "console.log").read_text()
    refused = run_training(tiny_overrides(synthetic_root, tmp_path / "refused", "dataset.train_epoch_size=14",
                                          "train_params.batching=by_view_count"))
    assert refused.returncode != 0 and "train_epoch_size needs train_params.batching=mapanything" in refused.stderr


def test_the_demo_reads_the_held_out_statistics_by_their_mapanything_names(tmp_path):
    from mapanything_ext.demo import before_and_after
    from mapanything_ext.run_log import append_epoch_record, test_loss_of

    (tmp_path / "initial_eval.json").write_text(json.dumps({"loss_med": 3.0, "depth_abs_rel_avg": 0.9}))
    for epoch, value in ((1, 2.0), (2, 1.5)):
        append_epoch_record(tmp_path / "log.txt", {"epoch": epoch, "train_loss_med": 9.0, "OPV2VDataset_loss_med": value,
                                                   "OPV2VDataset_depth_loss_med": 7.0, "OPV2VDataset_depth_abs_rel_avg": 0.5})
    assert before_and_after(tmp_path, "loss_med") == (3.0, 1.5)  # not the depth term's median
    assert test_loss_of({"OPV2VDataset_depth_loss_med": 7.0, "OPV2VDataset_loss_med": 1.5}) == 1.5
    assert test_loss_of({"test_loss": 2.0}) == 2.0  # a log.txt of ours from before the recipe
    assert before_and_after(tmp_path, "depth_abs_rel_avg") == (0.9, 0.5)
