"""The training engine: one call runs (or resumes) a whole training job on one rank.

Order of a run: distributed init -> resume preparation (quarantine, verify) -> data,
model, loss, optimizer -> restore position -> epochs. Every iteration ends at a
boundary where all ranks agree whether a preemption signal arrived; if one did, rank 0
writes checkpoint-last with the exact position (next batch, sampler, RNG, optimizer,
running epoch statistics) and the job is requeued. Every save goes through
mapanything_ext.checkpoint (atomic, verifiable).
"""

from __future__ import annotations

import json
import math
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from mapanything_ext import distributed as dist
from mapanything_ext import preflight
from mapanything_ext.checkpoint import load_checkpoint, prepare_resume, save_on_master
from mapanything_ext.config import to_plain
from mapanything_ext.models.registry import build_criteria, build_model
from mapanything_ext.preemption import PreemptionWatcher, check_requeue_budget
from mapanything_ext.train import rng_state
from mapanything_ext.train.compiling import check_compile_settings, compile_in_place, mark_step_begin
from mapanything_ext.train.data import build_dataset, build_loader, to_device
from mapanything_ext.train.depth_metrics import depth_abs_rel
from mapanything_ext.train.optim import build_optimizer
from mapanything_ext.train.run_log import Scalars, append_epoch_record, tee_console
from mapanything_ext.train.schedule import lr_at, set_lr


_PER_VIEW = re.compile(r"_view\d+$")


class LossInstability(RuntimeError):
    """The train loss became non-finite or exceeded the configured threshold."""


@dataclass
class Position:
    """Where training stands: the next batch to run."""

    epoch: int = 0
    iteration: int = 0
    global_step: int = 0
    best_so_far: float = math.inf
    # Running sums of the epoch in progress, so a mid-epoch resume logs the whole epoch.
    sums: dict = field(default_factory=dict)
    count: int = 0


@dataclass
class Run:
    cfg: DictConfig
    info: dist.DistInfo
    output_dir: Path
    model: torch.nn.Module
    module: torch.nn.Module  # the model without its DDP wrapper
    optimizer: torch.optim.Optimizer
    train_criterion: object
    test_criterion: object
    train_loader: object
    test_loader: object
    scalars: Scalars
    watcher: PreemptionWatcher
    started_at: float = field(default_factory=time.monotonic)  # train() sets it to its own start
    first_step_reported: bool = False

    @property
    def tp(self):
        return self.cfg.train_params


def train(cfg: DictConfig) -> Path:
    """Run the training job described by cfg; returns the output directory."""
    started_at = time.monotonic()
    info = dist.init_distributed_mode(
        world_size_expected=cfg.distributed.get("world_size"),
        timeout_s=cfg.machine.get("dist_timeout_s"),
        backend=cfg.distributed.get("backend"),
        slurm_profile=cfg.machine.get("slurm"),
    )
    restarts = check_requeue_budget(cfg.machine.get("slurm", {}).get("max_num_timeout"))
    output_dir = Path(cfg.output_dir)
    if info.rank == 0:
        output_dir.mkdir(parents=True, exist_ok=True)
        tee_console(output_dir)
        if restarts:
            print(f"[mapanything_ext] Slurm restart {restarts} of job {os.environ.get('SLURM_JOB_ID')}")
        print(f"[mapanything_ext] output_dir: {output_dir}")
        print(OmegaConf.to_yaml(cfg, resolve=True))
    dist.barrier()
    # Before anything slow: an offline node must not start a download. A run that will resume
    # from its own checkpoint no longer needs model.pretrained (the earlier stage may be gone).
    resuming = bool(cfg.train_params.resume) and any(output_dir.glob("checkpoint-*.pth"))
    preflight.check(cfg, resuming=resuming)
    run = _build_run(cfg, info, output_dir)
    run.started_at = started_at
    position = _restore_or_start(run)
    if cfg.train_params.get("eval_before_training") and position.global_step == 0:
        _initial_eval(run)
    try:
        _train_epochs(run, position)
    finally:
        run.scalars.close()
    dist.barrier()
    return output_dir


def _build_run(cfg: DictConfig, info: dist.DistInfo, output_dir: Path) -> Run:
    tp = cfg.train_params
    compile_mode = check_compile_settings(tp)
    rng_state.seed_everything(int(tp.seed) + info.rank)
    train_ds = build_dataset(cfg.dataset.train_dataset)
    test_ds = build_dataset(cfg.dataset.test_dataset)
    workers = int(cfg.machine.get("num_workers", 0))
    train_loader = build_loader(train_ds, tp.max_num_of_imgs_per_gpu, True, int(tp.seed), info.rank,
                                info.world_size, workers)
    test_loader = build_loader(test_ds, tp.max_num_of_imgs_per_gpu, False, int(tp.seed), info.rank,
                               info.world_size, workers)
    module = build_model(cfg.model).to(info.device)
    model = module
    if tp.get("compile"):
        compile_in_place(module, tp.compile, compile_mode)
    if info.distributed:
        device_ids = [info.local_rank] if info.device.type == "cuda" else None
        model = DistributedDataParallel(module, device_ids=device_ids)
    train_criterion, test_criterion = build_criteria(cfg.loss)
    for criterion in (train_criterion, test_criterion):
        if isinstance(criterion, torch.nn.Module):  # MapAnything's criteria are modules
            criterion.to(info.device)
    if info.rank == 0:
        n_params = sum(p.numel() for p in module.parameters())
        print(f"[mapanything_ext] model {cfg.model.name}: {n_params:,} parameters; "
              f"{len(train_ds)} train / {len(test_ds)} test samples; world size {info.world_size}")
    watcher = PreemptionWatcher()
    watcher.install()
    return Run(cfg, info, output_dir, model, module, build_optimizer(module, tp), train_criterion, test_criterion,
               train_loader, test_loader, Scalars(output_dir, info.rank == 0), watcher)


def _initial_eval(run: Run) -> None:
    """Held-out metrics of the initial model, the baseline a run is judged against."""
    stats = evaluate(run.model, run.test_criterion, run.test_loader, run.info.device, _amp(run))
    if run.info.rank == 0:
        (run.output_dir / "initial_eval.json").write_text(json.dumps(stats, indent=1) + "\n")
        print("[mapanything_ext] before training: " + ", ".join(f"test_{k}={v:.4g}" for k, v in stats.items()))


def _restore_or_start(run: Run) -> Position:
    """Resume from the newest proven-good checkpoint, else initialise from model.pretrained."""
    resume_from = prepare_resume(run.output_dir) if run.tp.resume else None
    if resume_from is None:
        pretrained = run.cfg.model.get("pretrained")
        if pretrained:
            from mapanything_ext.models.pretrained import load_pretrained

            load_pretrained(run.module, pretrained, trust_foreign=bool(run.cfg.get("trust_foreign_checkpoints")))
        return Position()
    ckpt = load_checkpoint(resume_from, map_location="cpu")
    try:
        run.module.load_state_dict(ckpt["model"])
    except RuntimeError as err:
        raise RuntimeError(
            f"cannot resume from {resume_from}: it was written with a different model configuration than this run's "
            f"(use the original overrides, or a new output_dir to start over). {str(err).splitlines()[0]}"
        ) from None
    run.optimizer.load_state_dict(ckpt["optimizer"])
    state = ckpt["resume"]
    position = Position(epoch=state["epoch"], iteration=state["iteration"], global_step=state["global_step"],
                        best_so_far=ckpt["best_so_far"], sums=dict(state.get("sums", {})),
                        count=state.get("count", 0))
    if state["epoch_complete"]:
        position = Position(epoch=state["epoch"] + 1, global_step=state["global_step"],
                            best_so_far=ckpt["best_so_far"])
    else:
        rng = state["rng"]
        rng_state.restore(rng[run.info.rank] if isinstance(rng, list) else rng)
        run.train_loader.batch_sampler.load_state_dict(state["sampler"])
    if run.info.rank == 0:
        print(f"[mapanything_ext] resumed from {resume_from}: epoch {position.epoch}, "
              f"next batch {position.iteration}, global step {position.global_step}")
    return position


def _train_epochs(run: Run, position: Position) -> None:
    epochs = int(run.tp.epochs)
    while position.epoch < epochs:
        stats = _train_one_epoch(run, position)
        record = {"epoch": position.epoch, **{f"train_{k}": v for k, v in stats.items()}}
        if (position.epoch + 1) % int(run.tp.eval_freq) == 0 or position.epoch + 1 == epochs:
            test_stats = evaluate(run.model, run.test_criterion, run.test_loader, run.info.device, _amp(run))
            record.update({f"test_{k}": v for k, v in test_stats.items()})
        _end_epoch(run, position, record)
        position.epoch += 1
        position.iteration, position.sums, position.count = 0, {}, 0
    _save(run, "checkpoint-final.pth", position, epoch_complete=True, epoch=epochs - 1)
    if run.info.rank == 0:
        print(f"[mapanything_ext] training done: {run.output_dir / 'checkpoint-final.pth'}")


def _end_epoch(run: Run, position: Position, record: dict) -> None:
    """Log the epoch, then save: last, best (lowest test loss), numbered every keep_freq."""
    epoch = position.epoch
    test_loss = record.get("test_loss")
    is_best = test_loss is not None and test_loss < position.best_so_far
    if is_best:
        position.best_so_far = test_loss
    record["best_so_far"] = position.best_so_far
    if run.info.rank == 0:
        append_epoch_record(run.output_dir / "log.txt", record)
        run.scalars.add("epoch", record, epoch)
        # Per-view loss terms (MapAnything's criterion has dozens) stay in log.txt only.
        print(f"[mapanything_ext] epoch {epoch}: " + ", ".join(
            f"{k}={v:.4g}" for k, v in record.items() if isinstance(v, float) and not _PER_VIEW.search(k)))
    if is_best:
        _save(run, "checkpoint-best.pth", position, epoch_complete=True)
    if (epoch + 1) % int(run.tp.keep_freq) == 0:
        _save(run, f"checkpoint-{epoch}.pth", position, epoch_complete=True)
    if (epoch + 1) % int(run.tp.save_freq) == 0 or epoch + 1 == int(run.tp.epochs):
        _save(run, "checkpoint-last.pth", position, epoch_complete=True)


def _amp(run: Run):
    """Autocast dtype, or None: bf16 on GPU when train_params.amp, full precision on CPU."""
    if not run.tp.amp or run.info.device.type != "cuda":
        return None
    return {"bf16": torch.bfloat16, "fp16": torch.float16}[run.tp.amp_dtype]


def _train_one_epoch(run: Run, position: Position) -> dict:
    model, tp, info = run.model, run.tp, run.info
    model.train()
    sampler = run.train_loader.batch_sampler
    sampler.set_epoch(position.epoch)
    sampler.start_batch = position.iteration
    steps = len(sampler)
    accum = int(tp.accum_iter)
    amp_dtype = _amp(run)
    bar = tqdm(total=steps, initial=position.iteration, desc=f"epoch {position.epoch}", disable=info.rank != 0,
               mininterval=2.0, dynamic_ncols=True)
    started, images = time.perf_counter(), 0
    for it, views in enumerate(run.train_loader, start=position.iteration):
        set_lr(run.optimizer, lr_at(position.epoch + it / steps, tp.lr, tp.min_lr, tp.warmup_epochs, tp.epochs))
        views = to_device(views, info.device)
        boundary = (it + 1) % accum == 0 or it + 1 == steps
        loss_value, details = train_step(run, views, amp_dtype, accum, boundary)
        position.global_step += 1
        position.iteration = it + 1
        _accumulate(position, {"loss": loss_value, **details})
        images += len(views) * views[0]["img"].shape[0] * info.world_size
        rate = images / max(time.perf_counter() - started, 1e-9)
        bar.set_postfix(loss=f"{loss_value:.4f}", img_s=f"{rate:.1f}", lr=f"{run.optimizer.param_groups[0]['lr']:.2e}", refresh=False)
        bar.update(1)
        if not run.first_step_reported and info.rank == 0:
            # Start-up cost of a (re)started job: what a requeue costs beyond the lost iteration.
            print(f"[mapanything_ext] first training step done {time.monotonic() - run.started_at:.1f}s after start")
        run.first_step_reported = True
        if it % int(tp.print_freq) == 0:
            run.scalars.add("train", {"loss": loss_value, "lr": run.optimizer.param_groups[0]["lr"], **details},
                            position.global_step)
        # Preemption is honoured only where no gradient is pending, so the saved state is exact.
        if boundary and it + 1 < steps and run.watcher.should_stop():
            bar.close()
            _save(run, "checkpoint-last.pth", position, epoch_complete=False)
            run.watcher.requeue_and_exit()
    bar.close()
    return {k: v / max(position.count, 1) for k, v in position.sums.items()}


def train_step(run: Run, views, amp_dtype, accum: int = 1, boundary: bool = True) -> tuple[float, dict]:
    """One micro-batch: forward, loss, backward; at an accumulation boundary also clip and step.
    The loss is read back (a host synchronisation) only once the optimizer step is queued, so the
    GPU finishes the backward while the host prepares that step. A non-finite loss still stops the
    run before anything is saved: the state it stepped into is never written."""
    loss, details = _step(run, views, amp_dtype, accum, sync=boundary)
    if boundary:
        with _phase("optimizer"):
            if run.tp.get("gradient_clip"):
                torch.nn.utils.clip_grad_norm_(run.module.parameters(), float(run.tp.gradient_clip), foreach=True)
            run.optimizer.step()
            run.optimizer.zero_grad(set_to_none=True)
    return _checked_loss_value(run, loss), details


def _phase(name: str):
    """A named range in torch.profiler traces (bench/bench_mapanything_step.py --profile sums
    GPU time per phase); costs a few microseconds when no profiler runs."""
    return torch.profiler.record_function(f"mapanything_ext.{name}")


def _step(run: Run, views, amp_dtype, accum: int, sync: bool) -> tuple[torch.Tensor, dict]:
    """Forward, loss, backward of one micro-batch; returns the (detached) loss and its details."""
    no_sync = run.model.no_sync if (isinstance(run.model, DistributedDataParallel) and not sync) else None
    mark_step_begin()
    with (no_sync() if no_sync else _null()):
        with _phase("forward"), torch.autocast(run.info.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            preds = run.model(views)
        with _phase("loss"), torch.autocast(run.info.device.type, enabled=False):
            loss, details = run.train_criterion(views, preds)
        with _phase("backward"):
            (loss / accum).backward()
    return loss.detach(), details


def _checked_loss_value(run: Run, loss: torch.Tensor) -> float:
    """The loss averaged over ranks; raises LossInstability when it is non-finite or too large."""
    loss_value = float(dist.all_reduce_mean(loss.float()).item())
    threshold = float(run.tp.loss_instability_threshold)
    if not math.isfinite(loss_value) or loss_value > threshold:
        raise LossInstability(
            f"train loss is {loss_value} (threshold train_params.loss_instability_threshold={threshold}); "
            f"stopping without saving this state. The last good checkpoint in {run.output_dir} is untouched; "
            f"lower train_params.lr or check the data."
        )
    return loss_value


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _accumulate(position: Position, values: dict) -> None:
    for key, value in values.items():
        position.sums[key] = position.sums.get(key, 0.0) + float(value)
    position.count += 1


@torch.no_grad()
def evaluate(model, criterion, loader, device, amp_dtype) -> dict:
    """Mean test loss, its terms and depth AbsRel over this rank's share, averaged over ranks."""
    model.eval()
    sums, count = {}, 0
    for views in loader:
        views = to_device(views, device)
        mark_step_begin()
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            preds = model(views)
        with torch.autocast(device.type, enabled=False):
            loss, details = criterion(views, preds)
        values = {"loss": float(loss), **details, "depth_abs_rel": depth_abs_rel(views, preds)}
        for key, value in values.items():
            sums[key] = sums.get(key, 0.0) + float(value)
        count += 1
    model.train()
    keys = sorted(sums)
    totals = dist.all_reduce_sum(torch.tensor([sums[k] for k in keys] + [count], dtype=torch.float64))
    return {k: float(totals[i] / max(float(totals[-1]), 1.0)) for i, k in enumerate(keys)}


def _save(run: Run, name: str, position: Position, epoch_complete: bool, epoch: int | None = None) -> None:
    """Write one checkpoint with everything needed to continue exactly from `position`."""
    rng = dist.all_gather_object(rng_state.capture())
    sampler = run.train_loader.batch_sampler.state_dict()
    sampler["start_batch"] = position.iteration
    ckpt = {
        "model": run.module.state_dict(),
        "optimizer": run.optimizer.state_dict(),
        "scaler": None,  # bf16 autocast needs no loss scaling
        "epoch": position.epoch if epoch is None else epoch,
        "best_so_far": float(position.best_so_far),
        "args": to_plain(run.cfg),
        "resume": {
            "epoch": position.epoch,
            "iteration": position.iteration,
            "epoch_complete": epoch_complete,
            "global_step": position.global_step,
            "sampler": sampler,
            "rng": rng,
            "sums": dict(position.sums),
            "count": position.count,
        },
    }
    started = time.perf_counter()
    save_on_master(ckpt, run.output_dir / name)
    dist.barrier()
    if run.info.rank == 0:
        print(f"[mapanything_ext] saved {name} (epoch {ckpt['epoch']}, next batch {position.iteration}) "
              f"in {time.perf_counter() - started:.2f}s")
