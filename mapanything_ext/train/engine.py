"""The training job, top to bottom: one call runs (or resumes) a whole job on one rank.

Order: distributed init -> the run folder's lock -> preflight -> build (build.py) -> loss
self-check and DDP settling -> restore the newest proven-good state (state.py) or model.pretrained
-> epochs (epoch.py) with MapAnything's evaluation and saves after each -> final. The run stops for
a preemption or time-limit signal at its stop points (preemption.StopPoint): all ranks agree, rank 0
writes checkpoint-last with the exact position when there is something new, and the job is requeued.
Every save goes through mapanything_ext.checkpoint (atomic, verifiable); a state saved under several
names (last, best, final, numbered) is written once and linked.

The epoch loop is MapAnything's `train()`: after training epoch e (counted from 1), the test loss
when e is a multiple of eval_freq, `checkpoint-best` when its median (`loss_med`) is the lowest so
far, one log.txt line `{"epoch": e, "train_<k>": ..., "<test set>_<k>_avg"/"_med": ...}`,
checkpoint-last when e is a multiple of save_freq or the last, checkpoint-<e> every keep_freq.
"""

from __future__ import annotations

import functools
import json
import os
import time
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from mapanything_ext import train_params as params
from mapanything_ext.checkpoint import choose_in_background
from mapanything_ext.cluster import distributed as dist
from mapanything_ext.cluster import faults, run_lock
from mapanything_ext.cluster.preemption import PreemptionWatcher, StopPoint, restarts_so_far
from mapanything_ext.console import say, warn
from mapanything_ext.models import offline
from mapanything_ext.run_log import report_failure, report_previous_job, tee_console, write_hydra_record
from mapanything_ext.train.compile_cache import CompileCache, start_compile_workers
from mapanything_ext.train.build import (StartupClock, build_run, choose_loss_impl, first_sample_views,
                                         settle_ddp_buckets)
from mapanything_ext.train import epoch_end, start
from mapanything_ext.train.epoch import train_one_epoch
from mapanything_ext.train.evaluation_loop import test_statistics
from mapanything_ext.train.run import Run
from mapanything_ext.train.saving import ensure_final, stop_here
from mapanything_ext.train.state import Position
from mapanything_ext.train.step import LossInstability

__all__ = ["LossInstability", "train"]

def train(cfg: DictConfig) -> Path:
    """Run the training job described by cfg; returns the output directory."""
    started_at = time.monotonic()
    # First of all: a signal during start-up (distributed init, model build, data) is recorded, not lost.
    watcher = PreemptionWatcher()
    watcher.install()
    params.load(cfg.train_params)  # a bad train_params stops the job before anything starts
    info = dist.init_distributed_mode(
        world_size_expected=cfg.distributed.get("world_size"),
        timeout_s=cfg.machine.get("dist_timeout_s"),
        backend=cfg.distributed.get("backend"),
        slurm_profile=cfg.machine.get("slurm"),
    )
    output_dir = Path(cfg.output_dir)
    lock, lock_note = _lock_run_folder(output_dir, info)
    untee = tee_console(output_dir) if info.rank == 0 else None
    if info.rank == 0:
        write_hydra_record(output_dir, cfg)
    try:
        _job(cfg, info, output_dir, started_at, lock_note, watcher)
    except SystemExit:
        raise
    except BaseException as err:
        report_failure(output_dir, info.rank, info.world_size, err)
        _cleanup_after_failure()
        raise
    finally:
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


def _job(cfg: DictConfig, info: dist.DistInfo, output_dir: Path, started_at: float, lock_note: str | None,
         watcher: PreemptionWatcher) -> None:
    if info.rank == 0:
        _print_header(cfg, output_dir, lock_note)
    dist.barrier()
    # Before anything slow: an offline node must not start a download. A run that will resume
    # from its own checkpoint no longer needs model.pretrained (the earlier stage may be gone).
    superseded = start.supersede_if_upstream_changed(cfg, output_dir, info.rank)
    if superseded:
        say("mapanything_ext", superseded)
    resuming = bool(cfg.train_params.resume) and any(output_dir.glob("checkpoint-*.pth"))
    offline.check(cfg, resuming=resuming)
    # Before anything compiles: torch.compile's caches in the run folder, warm after a requeue.
    with CompileCache.for_run(cfg, info, output_dir) as cache:
        start_compile_workers(cfg, info.device)
        _start_and_train(cfg, info, output_dir, started_at, watcher, cache, resuming)
    dist.barrier()


def _start_and_train(cfg: DictConfig, info: dist.DistInfo, output_dir: Path, started_at: float,
                     watcher: PreemptionWatcher, cache: CompileCache, resuming: bool) -> None:
    # Verifying the checkpoints reads them in full: rank 0 does it beside the model's build and
    # first (compiling) steps, which do not need the checkpoint's weights.
    chosen = choose_in_background(output_dir) if resuming else None
    clock = StartupClock(started_at, info.rank == 0)
    run = build_run(cfg, info, output_dir, watcher, clock, compile_cache=cache)
    run.started_at = started_at
    first_views = functools.cache(lambda: first_sample_views(run))  # read once, if at all
    choose_loss_impl(run, first_views, clock)
    if settle_ddp_buckets(run, first_views):
        clock.done("DDP gradient buckets settled (one step on the first sample)")
    position, continued = start.restore_or_start(run, chosen)
    if resuming or cfg.model.get("pretrained"):
        clock.done("checkpoint chosen, verified and loaded (the rest of it)" if resuming
                   else "model.pretrained verified and loaded")
    run.scalars = start.open_scalars(run, position)
    start.relog_finished_epoch(run, position)
    try:
        if continued:
            start.test_continued_run(run, position)
        faults.at(StopPoint.STARTUP)
        stop_here(run, position, StopPoint.STARTUP)
        if run.tp.eval_before_training and position.global_step == 0:
            _initial_eval(run, position)
        _train_epochs(run, position)
    except Exception:
        if run.info.rank == 0:
            run.background.wait()  # a crash keeps the state a background write was putting on disk
        raise
    finally:
        run.scalars.close()


def _print_header(cfg: DictConfig, output_dir: Path, lock_note: str | None) -> None:
    if lock_note:
        say("mapanything_ext", lock_note)
    restarts = restarts_so_far()
    if restarts:
        say("mapanything_ext", f"Slurm restart {restarts} of job {os.environ.get('SLURM_JOB_ID')} "
            f"(preemptions, requeues and time-outs together)")
    report_previous_job(output_dir)
    say("mapanything_ext", f"output_dir: {output_dir}")
    print(OmegaConf.to_yaml(cfg, resolve=True))
    warning = params.load(cfg.train_params).warmup_warning()
    if warning:
        warn("mapanything_ext", warning)


def _initial_eval(run: Run, position: Position) -> None:
    """Held-out metrics of the initial model, the baseline a run is judged against."""
    faults.at(StopPoint.INITIAL_EVAL)
    stats = test_statistics(run.module, run.test_criterion, run.test_loader, run.info.device, run.autocast,
                            between_batches=lambda i: stop_here(run, position, StopPoint.INITIAL_EVAL))
    if run.info.rank == 0:
        (run.output_dir / "initial_eval.json").write_text(json.dumps(stats, indent=1) + "\n")
    say("mapanything_ext", "before training: " + epoch_end.summary(f"{run.test_name}_", stats))


def _train_epochs(run: Run, position: Position) -> None:
    epochs = int(run.tp.epochs)
    while position.epoch < epochs:
        epoch_started = time.time()
        stats = train_one_epoch(run, position)
        record = {"epoch": position.epoch + 1, **{f"train_{k}": v for k, v in stats.items()},
                  **epoch_end.memory_record(run)}
        test_stats = None
        if (position.epoch + 1) % int(run.tp.eval_freq) == 0:
            faults.at(StopPoint.EVAL)
            test_stats = test_statistics(run.module, run.test_criterion, run.test_loader, run.info.device,
                                         run.autocast, between_batches=lambda i: stop_here(run, position, StopPoint.EVAL))
            record.update({f"{run.test_name}_{k}": v for k, v in test_stats.items()})
        # Wall time of this process's part of the epoch (a resumed epoch counts from the resume).
        record.update({"time": time.time(), "epoch_seconds": time.time() - epoch_started,
                       "global_step": position.global_step})
        epoch_end.end_epoch(run, position, record, test_stats)
        stop_here(run, position, StopPoint.END_OF_EPOCH)
        position.next_epoch()
    ensure_final(run, epochs)
    say("mapanything_ext", f"training done: {run.output_dir / 'checkpoint-final.pth'}")


