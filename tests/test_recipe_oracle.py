"""The oracle: MapAnything's own training loop and our engine, step for step.

Where MapAnything is installed (skipped elsewhere, with the reason), its `train_one_epoch` (with its
parameter groups, learning-rate schedule and loss scaler) trains the tiny MapAnything architecture
on a CPU in float32 from the same initial weights as our engine, on the batches its own sampler
deals from our dataset. Our engine runs as users run it (`python -m mapanything_ext.train.training`),
with its own sampler. Both write TensorBoard's `train_loss`, `train_lr` and `train_grad_norm` at
every optimizer step. Cases: Stage 1 (4 views) and a Stage 3 mix of 4, 8 and 10 views, accum_iter 1
and 2, a submodule preset, the gradient clipped on every step.

With `loss.impl=reference` (MapAnything's criterion) every logged value of every step, every test
statistic of its `test_one_epoch` (the scaled loss and each term, mean and median) and every parameter at the end of the epoch agree within 1e-5 relative (measured: equal
to the bit). With `loss.impl=batched` (ours: the same objective with sums in another order) the
criterion is held to 1e-5 on every step of MapAnything's own run: its scaled loss and its gradient
with respect to every trained parameter, computed beside MapAnything's criterion on the same
predictions. Our engine's whole run with it then drifts from MapAnything's as any reordering of
float32 sums makes two runs drift (AdamW turns the rounding noise of near-zero gradient entries
into whole steps): its logged values are held to 1e-3, its parameters and test statistics to 1e-2.
"""

from __future__ import annotations

import functools
import json
import shutil

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import save_file

from mapanything_ext import train_params as params
from mapanything_ext.config import compose_training
from mapanything_ext.datasets.build import build_dataset
from mapanything_ext.datasets.synthetic import generate
from mapanything_ext.models import mapanything_adapter
from mapanything_ext.models.registry import build_criteria, build_model
from mapanything_ext.train.step import view_scale
from tests.test_mapanything_adapter import TINY_MAPANYTHING, why_the_real_model_cannot_run
from tests.training_runs import run_training, tiny_overrides

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(why_the_real_model_cannot_run() is not None, reason=str(why_the_real_model_cannot_run()))]

TOLERANCE = 1e-5
# Our engine's whole run with the batched criterion against MapAnything's (see the docstring).
BATCHED_RUN_VALUES, BATCHED_RUN_PARAMETERS = 1e-3, 1e-2
CASES = {  # name: (dataset overrides, image budget, accum_iter, train_params preset)
    "stage1": (["dataset=opv2v_ft"], 4, 1, None),
    "stage1_accum2_lower_encoder_lr": (["dataset=opv2v_ft"], 4, 2, "lower_encoder_lr"),
    "stage3_mix_freeze_encoder": (["dataset=opv2v_coop_ft"], 10, 1, "freeze_encoder"),
    "stage3_mix_accum2": (["dataset=opv2v_coop_ft"], 10, 2, None),
    # MapAnything's data options all on: a view count and a resolution drawn per batch (+ transform, aug_crop)
    "stage3_drawn_views_and_ratios": (["dataset=opv2v_coop_ft", "dataset.train.variable_num_views=true",
                                       "dataset.resolution_train=[[56,42],[42,56]]"], 4, 1, None),
}


@pytest.fixture(scope="module")
def mixed_root(tmp_path_factory):
    """One scenario, 6 timestamps, 3 vehicles, two of them absent at some timestamps: the
    cooperative samples have 10, 8, 8, 4, 10 and 8 views (a Stage 3 mix)."""
    root = generate(tmp_path_factory.mktemp("mixed"), scenarios=1, frames=6, agents=3, seed=1, width=160,
                    height=120, splits=("train", "validate"), verbose=False)
    for split in ("train", "validate"):
        for tree in ("opv2v", "opv2v_depth"):
            scenario = next((root / tree / split).iterdir())
            cavs = sorted(p for p in scenario.iterdir() if p.is_dir())
            frames = sorted({p.name[:6] for p in cavs[0].iterdir() if p.name[:6].isdigit()})
            for cav, absent in ((cavs[1], (1, 3, 5)), (cavs[2], (2, 3))):
                for index in absent:
                    for path in cav.glob(f"{frames[index]}*"):
                        path.unlink()
    return root


def case_overrides(root, out, case: str, impl: str, init_file) -> list[str]:
    dataset, budget, accum, preset = CASES[case]
    base = [o for o in tiny_overrides(root, out) if not o.startswith(("model=", "loss=", "model."))]
    return [*base, *TINY_MAPANYTHING, *dataset, *([f"train_params={preset}"] if preset else []),
            f"train_params.max_num_of_imgs_per_gpu={budget}", f"train_params.accum_iter={accum}",
            "train_params.amp=false", "train_params.lr=1e-4", "train_params.min_lr=1e-6",
            "train_params.warmup_epochs=0.3", "train_params.epochs=1", "train_params.print_freq=1",
            "machine.num_workers=0", f"loss.impl={impl}", f"model.pretrained={init_file}"]


def scalars(folder) -> dict[str, dict[int, float]]:
    """TensorBoard scalars of a folder: {tag: {x: value}}."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder))
    events.Reload()
    return {tag: {e.step: e.value for e in events.Scalars(tag)} for tag in events.Tags()["scalars"]}


def their_sampler(samplers, dataset, budget, views, resolutions, counts, world=1, rank=0):
    """MapAnything's training sampler as its EasyDataset.make_sampler builds it for such a dataset."""
    if counts:
        pools, scaling, sizes = [resolutions, len(counts)], 1, {i: max(1, budget // n) for i, n in enumerate(counts)}
    else:
        pools, scaling, sizes = [resolutions], 0, {0: max(1, budget // views)}
    return samplers.DynamicBatchedMultiFeatureRandomSampler(
        dataset, pool_sizes=pools, scaling_feature_idx=scaling, feature_to_batch_size_map=sizes, world_size=world,
        rank=rank)


class _BehindTheirSampler(torch.utils.data.Dataset):
    """Our dataset behind MapAnything's sampler, whose items are (sample, aspect ratio[, view count
    index]) tuples; its loop's set_epoch reaches our dataset (new augmentation every epoch)."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def set_epoch(self, epoch):
        self.dataset.set_epoch(epoch)

    def __getitem__(self, item):
        counts = self.dataset.view_counts
        return self.dataset[(int(item[0]), int(item[1]), counts[int(item[2])] if counts else None)]


class BesideTheReference(torch.nn.Module):
    """MapAnything's criterion, with ours (batched) computed beside it on every call: the relative
    difference of the scaled losses and of their gradients with respect to the trained parameters."""

    def __init__(self, reference, batched, parameters, accum: int):
        super().__init__()
        self.reference, self.batched, self.parameters_, self.accum = reference, batched, parameters, accum
        self.loss_diffs, self.grad_diffs = [], []

    def forward(self, views, preds):
        loss, details = self.reference(views, preds)
        ours, _ = self.batched(views, preds)
        weight = view_scale(len(views)) / self.accum
        theirs_grad = torch.autograd.grad(loss * weight, self.parameters_, retain_graph=True, allow_unused=True)
        ours_grad = torch.autograd.grad(ours * weight, self.parameters_, retain_graph=True, allow_unused=True)
        flat = [torch.cat([g.flatten() for g in grads if g is not None]) for grads in (theirs_grad, ours_grad)]
        self.loss_diffs.append(relative(float(ours), float(loss)))
        self.grad_diffs.append(float((flat[1] - flat[0]).norm() / flat[0].norm()))
        return loss, details


class TheirLoop:
    """MapAnything's own loop on our data: its model, parameter groups, AdamW, loss scaler and sampler."""

    def __init__(self, cfg, init_state: dict, log_dir):
        self.training = mapanything_adapter.import_mapanything("mapanything.train.training")
        self.tools = mapanything_adapter.import_mapanything("mapanything.utils.train_tools")
        samplers = mapanything_adapter.import_mapanything("mapanything.datasets.base.batched_sampler")
        self.cfg, tp = cfg, cfg.train_params
        self.model = build_model(cfg.model)
        self.model.load_state_dict(init_state)
        losses = vars(mapanything_adapter.import_mapanything("mapanything.train.losses"))
        criterion = mapanything_adapter._criterion(cfg.loss.train_criterion, losses)
        self.test_criterion = mapanything_adapter._criterion(cfg.loss.test_criterion, losses)
        dataset = build_dataset(cfg.dataset.train_dataset)  # complete views: its loop moves tensors only
        sampler = their_sampler(samplers, dataset, tp.max_num_of_imgs_per_gpu, int(cfg.dataset.num_views),
                                len(dataset.resolutions), dataset.view_counts)
        self.loader = torch.utils.data.DataLoader(_BehindTheirSampler(dataset), batch_sampler=sampler, num_workers=0)
        groups, self.name_to_idx, self.idx_to_name = self.tools.get_parameter_groups(
            self.model, tp.lr, tp.weight_decay, submodule_configs=tp.submodule_configs)
        self.optimizer = torch.optim.AdamW(groups, lr=tp.lr, betas=(0.9, 0.95))
        self.scaler = self.tools.NativeScalerWithGradNormCount()
        batched = build_criteria(OmegaConf.merge(cfg.loss, {"impl": "batched"}))[0]
        self.criterion = BesideTheReference(criterion, batched, [p for p in self.model.parameters() if p.requires_grad],
                                            int(tp.accum_iter))
        self.args = OmegaConf.create({"train_params": OmegaConf.to_container(tp, resolve=True),
                                      "output_dir": str(log_dir)})
        self.args.train_params.amp = 0
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(log_dir))

    def train_epoch(self, epoch: int) -> None:
        self.training.train_one_epoch(self.model, self.criterion, self.loader, self.optimizer, torch.device("cpu"),
                                      epoch, self.scaler, self.args, log_writer=self.writer,
                                      param_groups_name_to_idx_map=self.name_to_idx,
                                      param_groups_idx_to_name_map=self.idx_to_name, model_without_ddp=self.model)

    def test(self, epochs_trained: int) -> dict:
        """Its test_one_epoch, where its loader can stack the test samples (one view count)."""
        test_set = build_dataset(self.cfg.dataset.test_dataset)
        if hasattr(test_set, "num_views_of"):
            return {}
        batch = 2 * (self.cfg.train_params.max_num_of_imgs_per_gpu // int(self.cfg.dataset.num_views))
        loader = torch.utils.data.DataLoader(test_set, batch_size=batch, shuffle=False)  # its test loader
        return self.training.test_one_epoch(self.model, self.test_criterion, loader, torch.device("cpu"),
                                            epochs_trained, self.args, log_writer=self.writer, prefix="test")

    def save_last(self, epoch: int) -> None:
        """Its own checkpoint-last.pth (save_model), as its loop writes it after epoch `epoch`."""
        self.tools.save_model(args=self.args, epoch=epoch, model_without_ddp=self.model, optimizer=self.optimizer,
                              loss_scaler=self.scaler, fname="last", best_so_far=float("inf"))

    def state(self) -> dict:
        self.writer.flush()
        return {k: v.detach().clone() for k, v in self.model.state_dict().items()}


def mapanything_epoch(cfg, init_state: dict, log_dir) -> tuple[dict, dict, BesideTheReference]:
    """MapAnything's own train_one_epoch on our data, from init_state; returns (its parameters, its
    test_one_epoch statistics, the batched criterion's differences along its run)."""
    loop = TheirLoop(cfg, init_state, log_dir)
    loop.train_epoch(0)
    test_stats = loop.test(1)
    loop.writer.close()
    return loop.state(), test_stats, loop.criterion


@functools.cache
def _initial_state(seed: int = 0) -> dict:
    torch.manual_seed(seed)
    return build_model(compose_training(TINY_MAPANYTHING).model).state_dict()


def relative(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-12)


@pytest.mark.parametrize("case", list(CASES))
def test_our_engine_trains_as_mapanythings_own_loop(case, synthetic_root, mixed_root, tmp_path):
    root = mixed_root if "stage3" in case else synthetic_root
    init_file = tmp_path / "init.safetensors"
    init = _initial_state()
    save_file({k: v.clone().contiguous() for k, v in init.items()}, str(init_file))  # aliases unshared
    cfg = compose_training(case_overrides(root, tmp_path / "unused", case, "reference", init_file))
    theirs, their_test, beside = mapanything_epoch(cfg, init, tmp_path / "theirs")
    their_scalars = scalars(tmp_path / "theirs")
    assert len(their_scalars["train_loss"]) >= 3
    assert max(their_scalars["train_grad_norm"].values()) > 1.0  # clipping is active
    tp = params.load(cfg.train_params)
    frozen = [k for k in init if tp.submodule_configs and any(k.startswith(s) for s, c in tp.submodule_configs.items()
                                                                if c.lr == 0)]
    worst = {"batched criterion loss": max(beside.loss_diffs), "batched criterion gradient": max(beside.grad_diffs)}
    failures = [(name, value) for name, value in worst.items() if value > TOLERANCE]
    for impl in ("reference", "batched"):
        values_tol, params_tol = (TOLERANCE, TOLERANCE) if impl == "reference" else (BATCHED_RUN_VALUES,
                                                                                     BATCHED_RUN_PARAMETERS)
        out = tmp_path / impl
        proc = run_training(case_overrides(root, out, case, impl, init_file), timeout=900)
        assert proc.returncode == 0, proc.stderr[-3000:]
        ours = scalars(out / "tensorboard")
        for tag in ("train_loss", "train_lr", "train_grad_norm"):
            assert ours[tag].keys() == their_scalars[tag].keys(), (impl, tag)
            diffs = [relative(ours[tag][x], their_scalars[tag][x]) for x in their_scalars[tag]]
            worst[f"{impl} {tag}"] = max(diffs)
            if max(diffs) > values_tol:
                failures.append((impl, tag, [f"{d:.1e}" for d in diffs]))
        state = torch.load(out / "checkpoint-final.pth", weights_only=True)["model"]
        param_diffs = {k: float((state[k] - theirs[k]).norm() / theirs[k].norm().clamp_min(1e-12)) for k in theirs}
        worst[f"{impl} parameters"] = max(param_diffs.values())
        bad = {k: v for k, v in param_diffs.items() if v > params_tol}
        if bad:
            failures.append((impl, "parameters", sorted(bad.items(), key=lambda kv: -kv[1])[:5]))
        for key in frozen:
            assert torch.equal(state[key], init[key]), f"frozen {key} changed"
        if their_test:
            # every statistic of its test_one_epoch: the scaled loss and each term, mean and median
            record = json.loads((out / "log.txt").read_text().splitlines()[-1])
            diffs = {key: relative(record[f"OPV2VDataset_{key}"], value) for key, value in their_test.items()}
            worst[f"{impl} test ({len(diffs)} statistics)"] = max(diffs.values())
            # (a single view's term moves most with the drift of the batched run: held like the parameters)
            failures += [(impl, key, diff) for key, diff in diffs.items() if diff > params_tol]
    print(f"[oracle] {case}: worst relative differences " + ", ".join(f"{k} {v:.2e}" for k, v in worst.items()))
    assert not failures, failures
    changed = [k for k in theirs if not torch.equal(theirs[k], init[k])]
    assert changed  # the epoch trained something
    shutil.rmtree(tmp_path / "theirs", ignore_errors=True)


def test_a_run_of_mapanythings_loop_continues_here_as_the_same_run(synthetic_root, tmp_path):
    """Its checkpoint-last after epoch 0 (its own save_model), continued by our engine for epoch 1,
    against its loop going on with epoch 1 in the same process: equal to the bit (loss.impl=reference)."""
    init_file = tmp_path / "init.safetensors"
    init = _initial_state()
    save_file({k: v.clone().contiguous() for k, v in init.items()}, str(init_file))
    theirs_dir = tmp_path / "their_run"
    overrides = case_overrides(synthetic_root, tmp_path / "ours", "stage1", "reference", init_file)
    overrides = [o for o in overrides if not o.startswith("train_params.epochs=")] + ["train_params.epochs=2"]
    loop = TheirLoop(compose_training(overrides), init, theirs_dir)
    loop.train_epoch(0)
    loop.save_last(0)
    torch.save({"model": {}}, tmp_path / "not_a_training_checkpoint.pth")
    (tmp_path / "torn.pth").write_bytes((theirs_dir / "checkpoint-last.pth").read_bytes()[:-5000])
    loop.train_epoch(1)
    theirs, their_scalars = loop.state(), scalars(theirs_dir)

    out = tmp_path / "ours"
    continued = [*overrides, f"+train_params.resume_ckpt={theirs_dir / 'checkpoint-last.pth'}",
                 "trust_foreign_checkpoints=true"]
    proc = run_training(continued, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    console = (out / "console.log").read_text()
    assert "continuing MapAnything's run from" in console and "this run trains from epoch 2 on" in console
    ours = scalars(out / "tensorboard")
    epoch1 = {x: v for x, v in their_scalars["train_loss"].items() if x >= 1000}
    assert epoch1 and {x: ours["train_loss"][x] for x in epoch1} == epoch1
    state = torch.load(out / "checkpoint-final.pth", weights_only=True)["model"]
    assert all(torch.equal(state[k], theirs[k]) for k in theirs)
    assert [r["epoch"] for r in json_lines(out / "log.txt")] == [1, 2]  # its resume test, then epoch 2

    for bad, reason in (("torn.pth", "not a torch zip archive"), ("not_a_training_checkpoint.pth", "no optimizer")):
        elsewhere = [o.replace(str(out), str(tmp_path / f"refused_{bad}")) for o in continued[:-2]]
        refused = run_training([*elsewhere, f"+train_params.resume_ckpt={tmp_path / bad}",
                                "trust_foreign_checkpoints=true"])
        assert refused.returncode != 0 and reason in refused.stderr, refused.stderr[-2000:]


def json_lines(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.parametrize("samples,budget,views,resolutions,variable,world", [
    (9, 4, 4, 1, False, 1), (23, 8, 4, 1, False, 1), (23, 8, 4, 1, False, 2), (50, 12, 4, 1, False, 4),
    (101, 48, 4, 1, False, 3), (33, 8, 4, 6, False, 2), (60, 12, 10, 3, True, 1), (101, 24, 8, 10, True, 3),
    (40, 8, 4, 1, True, 2)])
def test_our_sampler_deals_mapanythings_batches(samples, budget, views, resolutions, variable, world):
    """Batch sizes, order, drawn resolution and view count, and the share of every rank, epoch by epoch,
    against its own sampler built as its EasyDataset.make_sampler builds it."""
    from mapanything_ext.datasets.batch_sampler import DynamicBatchSampler

    samplers = mapanything_adapter.import_mapanything("mapanything.datasets.base.batched_sampler")
    counts = list(range(2, views + 1)) if variable else None
    for epoch in (0, 1, 5):
        for rank in range(world):
            theirs = their_sampler(samplers, range(samples), budget, views, resolutions, counts, world, rank)
            theirs.set_epoch(epoch)
            ours = DynamicBatchSampler(samples, lambda i: views, budget, rank=rank, world_size=world,
                                       batch_size=max(1, budget // views), num_resolutions=resolutions,
                                       view_counts=counts)
            ours.set_epoch(epoch)
            their_batches = [[(int(item[0]), int(item[1]), counts[int(item[2])] if counts else None) for item in b]
                             for b in theirs]
            assert list(ours) == their_batches and len(ours) == len(theirs), (epoch, rank)
