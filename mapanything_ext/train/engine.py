"""The training engine: one call runs (or resumes) a whole training job on one rank.

Order of a run: distributed init -> resume preparation (quarantine, verify) -> data,
model, loss, optimizer -> restore position -> epochs. The run stops for a preemption or
time-limit signal at its stop points (mapanything_ext/preemption.py lists them): all ranks
agree, rank 0 writes checkpoint-last with the exact position when there is something new
(next batch, sampler, RNG, optimizer, running epoch statistics) and the job is requeued.
Every save goes through mapanything_ext.checkpoint (atomic, verifiable); a state saved under
several names (last, best, final, numbered) is written once and linked.
"""

from __future__ import annotations

import functools
import json
import math
import os
import re
import time
from collections.abc import Mapping
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from mapanything_ext import distributed as dist
from mapanything_ext import faults, preflight, run_lock
from mapanything_ext.checkpoint import choose_in_background, load_checkpoint, prepare_resume
from mapanything_ext.datasets.base import BaseMultiViewDataset
from mapanything_ext.datasets.build import build_dataset
from mapanything_ext.models.batched_loss import DeviceDetails
from mapanything_ext.models.loss_selfcheck import ChosenCriterion
from mapanything_ext.models.registry import build_criteria, build_model_on
from mapanything_ext.preemption import PreemptionWatcher, restarts_so_far
from mapanything_ext.readback import HostCopy
from mapanything_ext.run_log import Scalars, append_epoch_record, report_failure, report_previous_job, tee_console
from mapanything_ext.train import rng_state
from mapanything_ext.train import compile_cache
from mapanything_ext.train.compiling import check_compile_settings, compile_in_place, mark_step_begin
from mapanything_ext.train.data import build_loader, to_device
from mapanything_ext.train.evaluation_loop import evaluate
from mapanything_ext.train.optim import build_optimizer
from mapanything_ext.train.position import Position, restore_rng
from mapanything_ext.train.run import Run, amp_dtype
from mapanything_ext.train.saving import ensure_final, eval_stop_point, save, stop_here
from mapanything_ext.train.schedule import lr_at, set_lr, warmup_warning

_PER_VIEW = re.compile(r"_view\d+$")


class LossInstability(RuntimeError):
    """The train loss became non-finite or exceeded the configured threshold."""


def train(cfg: DictConfig) -> Path:
    """Run the training job described by cfg; returns the output directory."""
    started_at = time.monotonic()
    # First of all: a signal during start-up (distributed init, model build, data) is recorded, not lost.
    watcher = PreemptionWatcher()
    watcher.install()
    _check_precision(cfg.train_params)
    info = dist.init_distributed_mode(
        world_size_expected=cfg.distributed.get("world_size"),
        timeout_s=cfg.machine.get("dist_timeout_s"),
        backend=cfg.distributed.get("backend"),
        slurm_profile=cfg.machine.get("slurm"),
    )
    output_dir = Path(cfg.output_dir)
    lock, lock_note = _lock_run_folder(output_dir, info)
    untee = tee_console(output_dir) if info.rank == 0 else None
    try:
        _run(cfg, info, output_dir, started_at, lock_note, watcher)
    except SystemExit:
        raise
    except BaseException as err:
        report_failure(output_dir, info.rank, info.world_size, err)
        _cleanup_after_failure()
        raise
    finally:
        compile_cache.release()
        if untee is not None:
            untee()
        if lock is not None:
            run_lock.release(lock)
    dist.cleanup()
    return output_dir


def _lock_run_folder(output_dir: Path, info: dist.DistInfo):
    """Rank 0 takes the run folder's lock before anything is written there; every rank learns the
    outcome, so a busy folder stops all of them with the same message."""
    lock = note = error = None
    if info.rank == 0:
        try:
            lock, note = run_lock.acquire(output_dir)
        except run_lock.RunFolderBusy as err:
            error = str(err)
    error, note = dist.broadcast_object((error, note))
    if error:
        _cleanup_after_failure()
        raise run_lock.RunFolderBusy(error)
    return lock, note


def _cleanup_after_failure() -> None:
    """Release the process group on the way out; a broken one may refuse, which changes nothing."""
    try:
        dist.cleanup(graceful=False)
    except Exception:  # noqa: BLE001 -- the original error is what the user must see
        pass


def _run(cfg: DictConfig, info: dist.DistInfo, output_dir: Path, started_at: float, lock_note: str | None,
         watcher: PreemptionWatcher) -> None:
    if info.rank == 0:
        if lock_note:
            print(f"[mapanything_ext] {lock_note}")
        restarts = restarts_so_far()
        if restarts:
            print(f"[mapanything_ext] Slurm restart {restarts} of job {os.environ.get('SLURM_JOB_ID')} "
                  f"(preemptions, requeues and time-outs together)")
        report_previous_job(output_dir)
        print(f"[mapanything_ext] output_dir: {output_dir}")
        print(OmegaConf.to_yaml(cfg, resolve=True))
        if warmup_warning(cfg.train_params):
            print(f"[mapanything_ext] WARNING: {warmup_warning(cfg.train_params)}")
    dist.barrier()
    # Before anything slow: an offline node must not start a download. A run that will resume
    # from its own checkpoint no longer needs model.pretrained (the earlier stage may be gone).
    resuming = bool(cfg.train_params.resume) and any(output_dir.glob("checkpoint-*.pth"))
    preflight.check(cfg, resuming=resuming)
    # Before anything compiles: torch.compile's caches in the run folder, warm after a requeue.
    compile_cache.use_for_run(cfg, info, output_dir)
    compile_cache.start_compile_workers(cfg, info.device)
    # Verifying the checkpoints reads them in full: rank 0 does it beside the model's build and
    # first (compiling) steps, which do not need the checkpoint's weights.
    chosen = choose_in_background(output_dir) if resuming else None
    clock = StartupClock(started_at, info.rank == 0)
    run = _build_run(cfg, info, output_dir, watcher, clock)
    run.started_at = started_at
    first_views = functools.cache(lambda: _first_sample_views(run))  # read once, if at all
    _choose_loss_impl(run, first_views, clock)
    if _settle_ddp_buckets(run, first_views):
        clock.done("DDP gradient buckets settled (one step on the first sample)")
    position = _restore_or_start(run, chosen)
    if resuming or cfg.model.get("pretrained"):
        clock.done("checkpoint chosen, verified and loaded (the rest of it)" if resuming
                   else "model.pretrained verified and loaded")
    run.scalars = Scalars(output_dir, info.rank == 0, resume_step=position.global_step)
    try:
        faults.at("startup")
        stop_here(run, position, "startup")
        if cfg.train_params.get("eval_before_training") and position.global_step == 0:
            _initial_eval(run, position)
        _train_epochs(run, position)
    finally:
        run.scalars.close()
    dist.barrier()


class StartupClock:
    """What a (re)started job spends before its first step, phase by phase, in console.log: a
    requeue pays all of it again, so it is worth seeing where it goes."""

    def __init__(self, started_at: float, prints: bool):
        self.started_at = self.last = started_at
        self.prints = prints

    def done(self, what: str) -> None:
        now = time.monotonic()
        if self.prints:
            print(f"[startup] {what}: {now - self.last:.1f}s ({now - self.started_at:.1f}s since start)", flush=True)
        self.last = now


def _check_precision(tp) -> None:
    if tp.get("amp") and str(tp.get("amp_dtype")) != "bf16":
        raise ValueError(
            f"train_params.amp_dtype={tp.get('amp_dtype')} is not supported: fp16 needs loss scaling, which this "
            f"engine does not do. Use train_params.amp_dtype=bf16 (no loss scaling needed) or train_params.amp=false."
        )


def _build_run(cfg: DictConfig, info: dist.DistInfo, output_dir: Path, watcher: PreemptionWatcher,
               clock: StartupClock) -> Run:
    tp = cfg.train_params
    compile_mode = check_compile_settings(tp)
    rng_state.seed_everything(int(tp.seed) + info.rank)
    train_ds = build_dataset(cfg.dataset.train_dataset)
    test_ds = build_dataset(cfg.dataset.test_dataset)
    for dataset in (train_ds, test_ds):  # every batch reaches the model through to_device
        if isinstance(dataset, BaseMultiViewDataset):
            dataset.geometry_on_device = bool(tp.get("geometry_on_device", True))
    workers = int(cfg.machine.get("num_workers", 0))
    train_loader = build_loader(train_ds, tp.max_num_of_imgs_per_gpu, True, int(tp.seed), info.rank,
                                info.world_size, workers, max_steps=tp.get("max_steps_per_epoch"))
    test_loader = build_loader(test_ds, tp.max_num_of_imgs_per_gpu, False, int(tp.seed), info.rank,
                               info.world_size, workers, max_steps=tp.get("max_eval_steps"), lockstep=False)
    clock.done("start-up checks and datasets")
    module = build_model_on(cfg.model, info.device)
    clock.done(f"model built on {info.device}")
    model = module
    if tp.get("compile"):
        compile_in_place(module, tp.compile, compile_mode)
    if info.distributed:
        device_ids = [info.local_rank] if info.device.type == "cuda" else None
        model = DistributedDataParallel(module, device_ids=device_ids,
                                        find_unused_parameters=bool(cfg.model.get("find_unused_parameters")))
    train_criterion, test_criterion = build_criteria(cfg.loss)
    for criterion in (train_criterion, test_criterion):
        if isinstance(criterion, torch.nn.Module):  # MapAnything's criteria are modules
            criterion.to(info.device)
    if info.rank == 0:
        n_params = sum(p.numel() for p in module.parameters())
        print(f"[mapanything_ext] model {cfg.model.name}: {n_params:,} parameters; "
              f"{len(train_ds)} train / {len(test_ds)} test samples; world size {info.world_size}"
              f"{' (DDP)' if info.distributed else ''}")
    return Run(cfg, info, output_dir, model, module, build_optimizer(module, tp), train_criterion, test_criterion,
               train_loader, test_loader, None, watcher)


def _first_sample_views(run: Run) -> list[dict]:
    """The first training sample as a batch of one on the device (start-up checks use it)."""
    from torch.utils.data import default_collate

    return to_device(default_collate([run.train_loader.dataset[0]]), run.info.device)


def _choose_loss_impl(run: Run, first_views, clock: StartupClock | None = None) -> None:
    """loss.impl: the batched criterion runs only after it agreed with MapAnything's own on the
    model's predictions for the first training sample (every rank must agree; models/loss_selfcheck.py).
    The forward runs with gradients on, as in training, so compiled parts need no second graph;
    its RNG draws are undone."""
    criteria = [c for c in (run.train_criterion, run.test_criterion) if isinstance(c, ChosenCriterion)]
    if not criteria:
        return
    saved = rng_state.capture()
    views = [dict(view) for view in first_views()]  # the cached batch, unaltered by a forward
    autocast_dtype = amp_dtype(run)
    mark_step_begin()
    with torch.autocast(run.info.device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
        preds = [{k: v.detach() if torch.is_tensor(v) else v for k, v in pred.items()} for pred in run.module(views)]
    rng_state.restore(saved)
    if clock is not None:
        clock.done("loss self-check: the first sample through the model (compiled parts traced or loaded)")

    def everyone_agrees(ok: bool) -> bool:
        return float(dist.all_reduce_max(torch.tensor(0.0 if ok else 1.0)).item()) == 0.0

    for criterion in criteria:
        line = criterion.self_check(views, preds, everyone_agrees)
        if run.info.rank == 0:
            print(f"[mapanything_ext] loss: {line}", flush=True)
    if clock is not None:
        clock.done("loss self-check: both criteria compared in float64")


def _settle_ddp_buckets(run: Run, first_views) -> bool:
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
    _step(run, views, amp_dtype(run), accum=1, sync=True)
    run.optimizer.zero_grad(set_to_none=True)
    rng_state.restore(saved)
    return True


def _initial_eval(run: Run, position: Position) -> None:
    """Held-out metrics of the initial model, the baseline a run is judged against."""
    stats = evaluate(run.module, run.test_criterion, run.test_loader, run.info.device, amp_dtype(run),
                     between_batches=lambda i: eval_stop_point(run, position, i, "initial_eval"))
    if run.info.rank == 0:
        (run.output_dir / "initial_eval.json").write_text(json.dumps(stats, indent=1) + "\n")
        print("[mapanything_ext] before training: " + ", ".join(f"test_{k}={v:.4g}" for k, v in stats.items()))


def _restore_or_start(run: Run, chosen: Future | None = None) -> Position:
    """Resume from the newest proven-good checkpoint (chosen: choose_in_background's answer in the
    making), else initialise from model.pretrained."""
    resume_from = prepare_resume(run.output_dir, chosen) if run.tp.resume else None
    if resume_from is None:
        pretrained = run.cfg.model.get("pretrained")
        if pretrained:
            from mapanything_ext.models.pretrained import load_pretrained

            load_pretrained(run.module, pretrained, trust_foreign=bool(run.cfg.get("trust_foreign_checkpoints")))
        return Position()
    ckpt = load_checkpoint(resume_from, map_location="cpu", mmap=True)
    try:
        run.module.load_state_dict(ckpt["model"])
    except RuntimeError as err:
        raise RuntimeError(
            f"cannot resume from {resume_from}: it was written with a different model configuration than this run's "
            f"(use the original overrides, or a new output_dir to start over). {str(err).splitlines()[0]}"
        ) from None
    run.optimizer.load_state_dict(ckpt["optimizer"])
    state = ckpt["resume"]
    position = Position.from_state(state, ckpt["best_so_far"])
    notes = [restore_rng(state["rng"], run.info.rank, run.info.world_size, int(run.tp.seed), position.epoch)]
    saved_world = int(state.get("sampler", {}).get("world_size", run.info.world_size))
    if position.epoch_complete:
        position.next_epoch()
        if saved_world != run.info.world_size:
            notes.append(f"world size changed from {saved_world} to {run.info.world_size} at the end of epoch "
                         f"{position.epoch - 1}: the next epoch is dealt to {run.info.world_size} rank(s)")
    else:
        sampler_state = {**state["sampler"], "consumed": position.consumed, "epoch": position.epoch}
        notes.append(run.train_loader.batch_sampler.load_state_dict(sampler_state))
    run.saved_step = position.global_step
    if run.info.rank == 0:
        print(f"[mapanything_ext] resumed from {resume_from}: epoch {position.epoch}, "
              f"{position.consumed} batches of it done, global step {position.global_step}")
        for note in filter(None, notes):
            print(f"[mapanything_ext] resume: {note}")
    return position


def _train_epochs(run: Run, position: Position) -> None:
    epochs = int(run.tp.epochs)
    while position.epoch < epochs:
        epoch_started = time.time()
        stats = _train_one_epoch(run, position)
        record = {"epoch": position.epoch, **{f"train_{k}": v for k, v in stats.items()}, **_memory_record(run)}
        if (position.epoch + 1) % int(run.tp.eval_freq) == 0 or position.epoch + 1 == epochs:
            faults.at("eval")
            test_stats = evaluate(run.module, run.test_criterion, run.test_loader, run.info.device, amp_dtype(run),
                                  between_batches=lambda i: eval_stop_point(run, position, i, "eval"))
            record.update({f"test_{k}": v for k, v in test_stats.items()})
        # Wall time of this process's part of the epoch (a resumed epoch counts from the resume).
        record.update({"time": time.time(), "epoch_seconds": time.time() - epoch_started,
                       "global_step": position.global_step})
        _end_epoch(run, position, record)
        stop_here(run, position, "end of epoch")
        position.next_epoch()
    ensure_final(run, epochs)
    if run.info.rank == 0:
        print(f"[mapanything_ext] training done: {run.output_dir / 'checkpoint-final.pth'}")


def _end_epoch(run: Run, position: Position, record: dict) -> None:
    """Log the epoch, then save it once under every name due: last, best (lowest test loss),
    numbered every keep_freq, final after the last epoch."""
    epoch = position.epoch
    last_epoch = epoch + 1 == int(run.tp.epochs)
    test_loss = record.get("test_loss")
    is_best = test_loss is not None and test_loss < position.best_so_far
    if is_best:
        position.best_so_far = test_loss
    record["best_so_far"] = position.best_so_far
    if run.info.rank == 0:
        append_epoch_record(run.output_dir / "log.txt", record)
        run.scalars.add("epoch", record, position.global_step)
        # Per-view loss terms (MapAnything's criterion has dozens) stay in log.txt only.
        print(f"[mapanything_ext] epoch {epoch}: " + ", ".join(
            f"{k}={v:.4g}" for k, v in record.items()
            if isinstance(v, float) and not _PER_VIEW.search(k) and k != "time"))
    position.epoch_complete = True
    names = [name for name, due in (
        ("checkpoint-last.pth", (epoch + 1) % int(run.tp.save_freq) == 0 or last_epoch),
        ("checkpoint-best.pth", is_best),
        (f"checkpoint-{epoch}.pth", (epoch + 1) % int(run.tp.keep_freq) == 0),
        ("checkpoint-final.pth", last_epoch),
    ) if due]
    if names:
        save(run, names, position)


def _memory_record(run: Run) -> dict:
    """Peak GPU memory of this rank since the last record (GiB), then reset."""
    if run.info.device.type != "cuda":
        return {}
    gib = 2 ** 30
    record = {"peak_mem_allocated_gib": torch.cuda.max_memory_allocated() / gib,
              "peak_mem_reserved_gib": torch.cuda.max_memory_reserved() / gib}
    torch.cuda.reset_peak_memory_stats()
    return record


def _train_one_epoch(run: Run, position: Position) -> dict:
    model, tp, info = run.model, run.tp, run.info
    model.train()
    sampler = run.train_loader.batch_sampler
    sampler.set_epoch(position.epoch)
    sampler.consumed = position.consumed
    epoch_batches, world = sampler.epoch_batches(), info.world_size
    steps_left = len(sampler)
    accum = int(tp.accum_iter)
    autocast = amp_dtype(run)
    done = position.consumed // world
    bar = run.bar = tqdm(total=done + steps_left, initial=done, desc=f"epoch {position.epoch}",
                         disable=info.rank != 0, mininterval=2.0, dynamic_ncols=True)
    meter = _EpochMeter(run, position, bar)
    queued = None  # the step before, whose loss and details are read once this one is queued
    faults.at("loader_start")
    for i, views in enumerate(run.train_loader):
        if i == 0:
            stop_here(run, position, "data-loader start-up")
        it = position.consumed // world  # this rank's step index within the epoch
        last = i + 1 == steps_left
        if i == 1 or last:
            faults.at("last_step" if last else "train_step")
        set_lr(run.optimizer, lr_at(position.epoch + position.consumed / epoch_batches, tp.lr, tp.min_lr,
                                    tp.warmup_epochs, tp.epochs))
        views = to_device(views, info.device)
        boundary = (it + 1) % accum == 0 or last
        step = train_step(run, views, autocast, accum, boundary)
        position.global_step += 1
        position.consumed += world
        if queued is not None:
            meter.record(queued)
        queued = _QueuedStep(step, run.optimizer.param_groups[0]["lr"], it, position.global_step,
                             len(views) * views[0]["img"].shape[0] * world)
        # Preemption is honoured only where no gradient is pending, so the saved state is exact.
        # After the last step the question is asked at once (the epoch's evaluation and saves come
        # next); after the others it is answered one step late, so asking never drains the GPU.
        # A process's first step is read at once too: the start-up line times it, not the next.
        stopping = boundary and (last or run.watcher.stop_seen_at_last_poll())
        if stopping or not run.first_step_reported:
            meter.record(queued)
            queued = None
        if stopping:
            stop_here(run, position, "after the epoch's last step" if last else "training step")
    if queued is not None:
        meter.record(queued)
    bar.close()
    run.bar = None
    return meter.stats(steps_left)


@dataclass
class _QueuedStep:
    """A training step whose work is queued on the device; its values are read one step later."""

    result: StepResult
    lr: float
    it: int  # this rank's step index within the epoch
    global_step: int
    images: int  # over all ranks


class _EpochMeter:
    """The bookkeeping of an epoch's steps, done as each step's values arrive: the loss check,
    the epoch's sums, the progress bar, the first-step line and the scalars."""

    def __init__(self, run: Run, position: Position, bar):
        self.run, self.position, self.bar = run, position, bar
        self.started, self.images = time.perf_counter(), 0

    def record(self, step: _QueuedStep) -> None:
        run = self.run
        loss_value, details = read_step(run, step.result)
        _accumulate(self.position, {"loss": loss_value, "lr": step.lr, **details})
        self.images += step.images
        rate = self.images / max(time.perf_counter() - self.started, 1e-9)
        self.bar.set_postfix(loss=f"{loss_value:.4f}", img_s=f"{rate:.1f}", lr=f"{step.lr:.2e}", refresh=False)
        self.bar.update(1)
        if not run.first_step_reported and run.info.rank == 0:
            # Start-up cost of a (re)started job: what a requeue costs beyond the lost iteration.
            print(f"[mapanything_ext] first training step done {time.monotonic() - run.started_at:.1f}s after start")
            if cache_line := compile_cache.first_step_line():
                print(cache_line)
        run.first_step_reported = True
        if step.it % int(run.tp.print_freq) == 0:
            run.scalars.add("train", {"loss": loss_value, "lr": step.lr, **details}, step.global_step)

    def stats(self, steps_left: int) -> dict:
        position = self.position
        stats = {k: v / max(position.count, 1) for k, v in position.sums.items()}
        if self.images:
            stats["images_per_s"] = self.images / max(time.perf_counter() - self.started, 1e-9)
        stats["steps_run"] = steps_left  # by this process (a resumed epoch: the steps after the resume)
        return stats


@dataclass
class StepResult:
    """What train_step leaves behind: the loss averaged over ranks and the criterion's details,
    both on their way to the host (read_step reads them)."""

    loss: HostCopy
    details: Mapping


def train_step(run: Run, views, autocast_dtype, accum: int = 1, boundary: bool = True) -> StepResult:
    """One micro-batch: forward, loss, backward; at an accumulation boundary also clip and step.
    Nothing here waits for the device: the loss and details are copied to the host behind the
    step's work and read by read_step, which the train loop calls once the next step is queued,
    so the device never idles while the host prepares a step. A non-finite loss still stops the
    run before anything is saved: every save point reads the steps before it first."""
    loss, details = _step(run, views, autocast_dtype, accum, sync=boundary)
    if boundary:
        with _phase("optimizer"):
            if run.tp.get("gradient_clip"):
                torch.nn.utils.clip_grad_norm_(run.module.parameters(), float(run.tp.gradient_clip), foreach=True)
            run.optimizer.step()
            run.optimizer.zero_grad(set_to_none=True)
    if isinstance(details, DeviceDetails):
        details.queue_read()
    return StepResult(HostCopy(dist.all_reduce_mean(loss.float())), details)


def read_step(run: Run, result: StepResult) -> tuple[float, dict]:
    """The step's loss and details as Python numbers (waits for that step's work only); raises
    LossInstability when the loss is non-finite or too large."""
    loss_value = float(result.loss.get().item())
    threshold = float(run.tp.loss_instability_threshold)
    if not math.isfinite(loss_value) or loss_value > threshold:
        raise LossInstability(
            f"train loss is {loss_value} (threshold train_params.loss_instability_threshold={threshold}); "
            f"stopping without saving this state. The last good checkpoint in {run.output_dir} is untouched; "
            f"lower train_params.lr or check the data."
        )
    return loss_value, dict(result.details)


def _phase(name: str):
    """A named range in torch.profiler traces (bench/bench_mapanything_step.py --profile sums
    GPU time per phase); costs a few microseconds when no profiler runs."""
    return torch.profiler.record_function(f"mapanything_ext.{name}")


def _step(run: Run, views, autocast_dtype, accum: int, sync: bool) -> tuple[torch.Tensor, dict]:
    """Forward, loss, backward of one micro-batch; returns the (detached) loss and its details."""
    no_sync = run.model.no_sync if (isinstance(run.model, DistributedDataParallel) and not sync) else None
    mark_step_begin()
    with (no_sync() if no_sync else _null()):
        with _phase("forward"), torch.autocast(run.info.device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            preds = run.model(views)
        with _phase("loss"), torch.autocast(run.info.device.type, enabled=False):
            loss, details = run.train_criterion(views, preds)
        with _phase("backward"):
            (loss / accum).backward()
    return loss.detach(), details


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _accumulate(position: Position, values: dict) -> None:
    for key, value in values.items():
        position.sums[key] = position.sums.get(key, 0.0) + float(value)
    position.count += 1


