"""Everything a training job builds before its first step: `build_run` (datasets, loaders, model,
optimizer, DDP, criteria), the loss self-check and the DDP settling step, each timed in console.log."""

from __future__ import annotations

import time
from pathlib import Path

import torch
from omegaconf import DictConfig
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import default_collate

from mapanything_ext import train_params as params
from mapanything_ext.cluster import distributed as dist
from mapanything_ext.cluster.preemption import PreemptionWatcher
from mapanything_ext.console import say
from mapanything_ext.datasets.base import BaseMultiViewDataset
from mapanything_ext.datasets.build import build_dataset
from mapanything_ext.datasets.epoch_size import EpochOfSize
from mapanything_ext.losses.loss_selfcheck import ChosenCriterion
from mapanything_ext.models.registry import build_criteria, build_model_on
from mapanything_ext.train import rng_state
from mapanything_ext.train.compile_cache import CompileCache
from mapanything_ext.train.compiling import check_compile_settings, compile_in_place, mark_step_begin
from mapanything_ext.train.data import build_loader, to_device
from mapanything_ext.train import sharding
from mapanything_ext.train.optim import build_optimizer, freeze_zero_lr
from mapanything_ext.train.background_save import BackgroundSaver
from mapanything_ext.train.run import Run, autocast_dtype
from mapanything_ext.train.step import forward_backward


class StartupClock:
    """What a (re)started job spends before its first step, phase by phase, in console.log: a
    requeue pays all of it again, so it is worth seeing where it goes."""

    def __init__(self, started_at: float, prints: bool):
        self.started_at = self.last = started_at
        self.prints = prints

    def done(self, what: str) -> None:
        now = time.monotonic()
        if self.prints:
            say("startup", f"{what}: {now - self.last:.1f}s ({now - self.started_at:.1f}s since start)")
        self.last = now


def build_run(cfg: DictConfig, info: dist.DistInfo, output_dir: Path, watcher: PreemptionWatcher | None = None,
              clock: StartupClock | None = None, compile_cache: CompileCache | None = None) -> Run:
    """The job's parts on this rank, ready for its first step (weights not yet restored)."""
    clock = clock or StartupClock(time.monotonic(), False)
    tp = params.load(cfg.train_params)
    compile_mode = check_compile_settings(tp)
    torch.backends.cudnn.benchmark = not tp.disable_cudnn_benchmark
    rng_state.seed_everything(int(tp.seed) + info.rank)
    train_ds, test_ds = build_dataset(cfg.dataset.train_dataset), build_dataset(cfg.dataset.test_dataset)
    for dataset in (train_ds, test_ds):  # every batch reaches the model through to_device
        if isinstance(dataset, BaseMultiViewDataset):
            dataset.geometry_on_device = tp.geometry_on_device
    if cfg.dataset.get("train_epoch_size"):  # MapAnything's `N @ Dataset(...)`
        train_ds = epoch_of_size(train_ds, int(cfg.dataset.train_epoch_size), tp)
    workers = int(cfg.machine.get("num_workers", 0))
    train_loader = build_loader(train_ds, tp, True, info.rank, info.world_size, workers)
    test_loader = build_loader(test_ds, tp, False, info.rank, info.world_size, workers)
    clock.done("start-up checks and datasets")
    cap_gpu_memory(cfg, info.device)
    module = build_model_on(cfg.model, info.device)
    clock.done(f"model built on {info.device}")
    if tp.compile:
        compile_in_place(module, tp.compile, compile_mode)
    freeze_zero_lr(module, tp)  # before DDP or FSDP take the parameters that train
    model = sharding.wrap(module, cfg, info)
    optimizer, schedules = build_optimizer(module, tp)  # after FSDP: over the sharded parameters
    train_criterion, test_criterion = build_criteria(cfg.loss)
    for criterion in (train_criterion, test_criterion):
        if isinstance(criterion, torch.nn.Module):  # MapAnything's criteria are modules
            criterion.to(info.device)
    if info.rank == 0:
        _describe(cfg, model, module, optimizer, train_ds, test_ds, train_loader, info)
    return Run(cfg=cfg, tp=tp, info=info, output_dir=output_dir, model=model, module=module, optimizer=optimizer,
               schedules=schedules, train_criterion=train_criterion, test_criterion=test_criterion,
               train_loader=train_loader, test_loader=test_loader, test_name=test_set_name(cfg),
               watcher=watcher, autocast=autocast_dtype(tp, info.device), compile_cache=compile_cache or CompileCache(),
               background=BackgroundSaver(tp.save_every_minutes, tp.save_every_steps, writer=info.rank == 0))


def cap_gpu_memory(cfg: DictConfig, device: torch.device) -> None:
    """machine.gpu_memory_gib: this rank may use no more of its GPU (a smaller card, emulated)."""
    limit = cfg.machine.get("gpu_memory_gib")
    if not limit or device.type != "cuda":
        return
    total = torch.cuda.get_device_properties(device).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, float(limit) * 2**30 / total), device)
    say("mapanything_ext", f"GPU memory capped at {float(limit):g} GiB of {total / 2**30:.1f} (machine.gpu_memory_gib)")


def epoch_of_size(dataset, size: int, tp) -> EpochOfSize:
    """The training set with epochs of `size` samples; its samples' view counts change with the epoch's
    mapping, which batches of several samples by view count could not follow."""
    if tp.batching != "mapanything":
        raise ValueError("dataset.train_epoch_size needs train_params.batching=mapanything (batches by view count "
                         "are cut once from the samples' view counts, which the epoch's mapping changes)")
    return EpochOfSize(dataset, size)


def test_set_name(cfg: DictConfig) -> str:
    """MapAnything names a test set by its dataset expression up to '(': here the dataset's class."""
    return str(cfg.dataset.test_dataset.get("_target_", "test")).rsplit(".", 1)[-1]


def _describe(cfg, model, module, optimizer, train_ds, test_ds, train_loader, info) -> None:
    n_params = sum(p.numel() for p in module.parameters())
    trained = sum(p.numel() for g in optimizer.param_groups for p in g["params"])
    frozen = f" ({n_params - trained:,} frozen by train_params.submodule_configs)" if trained < n_params else ""
    sampler = train_loader.batch_sampler
    say("mapanything_ext", f"model {cfg.model.name}: {n_params:,} parameters{frozen}; {len(train_ds)} train / "
        f"{len(test_ds)} test samples; {sampler.describe()}, {sampler.epoch_batches() // info.world_size} steps per "
        f"epoch; world size {info.world_size}{_strategy_note(model, info)}")


def _strategy_note(model, info: dist.DistInfo) -> str:
    if sharding.is_sharded(model):
        return f" (FSDP{', sharded state offloaded to host memory' if sharding.offloaded(model, info.device) else ''})"
    return " (DDP)" if info.distributed else ""


def first_sample_views(run: Run) -> list[dict]:
    """The first training sample as a batch of one on the device (start-up checks use it)."""
    return to_device(default_collate([run.train_loader.dataset[0]]), run.info.device)


def choose_loss_impl(run: Run, first_views, clock: StartupClock | None = None) -> None:
    """loss.impl: the batched criterion runs only after it agreed with MapAnything's own on the
    model's predictions for the first training sample (every rank must agree; losses/loss_selfcheck.py).
    The forward runs with gradients on, as in training, so compiled parts need no second graph;
    its RNG draws are undone."""
    criteria = [c for c in (run.train_criterion, run.test_criterion) if isinstance(c, ChosenCriterion)]
    if not criteria:
        return
    saved = rng_state.capture()
    views = [dict(view) for view in first_views()]  # the cached batch, unaltered by a forward
    mark_step_begin()
    with torch.autocast(run.info.device.type, dtype=run.autocast, enabled=run.autocast is not None):
        preds = [{k: v.detach() if torch.is_tensor(v) else v for k, v in pred.items()} for pred in run.module(views)]
    rng_state.restore(saved)
    if clock is not None:
        clock.done("loss self-check: the first sample through the model (compiled parts traced or loaded)")

    def everyone_agrees(ok: bool) -> bool:
        return float(dist.all_reduce_max(torch.tensor(0.0 if ok else 1.0)).item()) == 0.0

    for criterion in criteria:
        line = criterion.self_check(views, preds, everyone_agrees)
        say("mapanything_ext", f"loss: {line}")
    if clock is not None:
        clock.done("loss self-check: both criteria compared in float64")


def settle_ddp_buckets(run: Run, first_views) -> bool:
    """One synced forward/backward on the first training sample, its gradients and RNG draws undone.

    DDP reduces gradients in buckets whose layout it rebuilds after the first backward of each
    process (in the order gradients became ready). With 3 or more ranks the layout decides the
    order of each float sum, so a resumed process, whose first step would use the initial layout
    where the uninterrupted run used the rebuilt one, would drift in the last bits. Settling the
    layout before the first real step makes every step of every run use the same one (bitwise
    resume at any world size), for the cost of one step at start."""
    if not isinstance(run.model, DistributedDataParallel):
        return False
    saved = rng_state.capture()
    views = [dict(view) for view in first_views()]  # the cached batch, unaltered by a forward
    forward_backward(run, views, run.autocast, accum=1, sync=True)
    run.optimizer.zero_grad(set_to_none=True)
    rng_state.restore(saved)
    return True
