"""One training epoch: MapAnything's `train_one_epoch`, resumable at any step.

Per step, as its loop does: the learning rate of every group is set at the start of each
accumulation from the fractional epoch (this rank's step index / steps per epoch), the step runs
(step.py), and the optimizer steps every accum_iter batches; a trailing partial accumulation at the
epoch's end is discarded, as its loop discards it (`zero_grad` at the next epoch's start).

A step's values are read one step late (the meter's queue), so reading never drains the GPU; a
stop signal is honoured, and a mid-epoch background save taken (background_save.py), only where no
gradient is pending, so the saved state is exact.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass

import torch
from tqdm import tqdm

from mapanything_ext.cluster import faults
from mapanything_ext.cluster.preemption import StopPoint
from mapanything_ext.cluster import distributed as dist
from mapanything_ext.console import say, warn
from mapanything_ext.datasets.base import BAD_SAMPLES_KEY
from mapanything_ext.train.data import to_device
from mapanything_ext.train.optim import logged_lrs, set_lr
from mapanything_ext.train.saving import save_in_background_if_due, stop_here
from mapanything_ext.train.state import Position
from mapanything_ext.train.step import StepResult, read_step, train_step


def train_one_epoch(run, position: Position) -> dict:
    """Train the rest of `position.epoch`; returns the epoch's statistics (log.txt's train_*)."""
    tp, world = run.tp, run.info.world_size
    run.model.train()
    run.optimizer.zero_grad(set_to_none=True)
    sampler = run.train_loader.batch_sampler
    sampler.set_epoch(position.epoch)
    if hasattr(run.train_loader.dataset, "set_epoch"):  # the epoch's random choices (workers copy it)
        run.train_loader.dataset.set_epoch(position.epoch)
    sampler.consumed = position.consumed
    steps_per_epoch = sampler.epoch_batches() // world
    steps_left = len(sampler)
    accum = int(tp.accum_iter)
    meter = EpochMeter(run, position, steps_per_epoch, steps_left)
    try:
        faults.at(StopPoint.LOADER_START)
        asked = time.perf_counter()
        for i, views in enumerate(run.train_loader):
            data_wait = time.perf_counter() - asked
            bad = int(views[0][BAD_SAMPLES_KEY].sum()) if BAD_SAMPLES_KEY in views[0] else 0
            if i == 0:
                stop_here(run, position, StopPoint.LOADER_START, on_stop=meter.close)
            it = position.consumed // world  # this rank's step index within the epoch
            last = i + 1 == steps_left
            if i == 1 or last:
                faults.at(StopPoint.LAST_STEP if last else StopPoint.TRAIN_STEP)
            epoch_f = position.epoch + it / steps_per_epoch
            if it % accum == 0:
                set_lr(run.optimizer, run.schedules, epoch_f, tp.epochs)
            boundary = (it + 1) % accum == 0
            result = train_step(run, to_device(views, run.info.device), run.autocast, accum, boundary)
            position.global_step += 1
            position.consumed += world
            meter.queue(QueuedStep(result, logged_lrs(run.optimizer, run.schedules), it, epoch_f,
                                   len(views) * views[0]["img"].shape[0] * world, data_wait, bad))
            # After the last step the question is asked at once (the epoch's evaluation and saves come
            # next); after the others it is answered one step late, so asking never drains the GPU.
            due = run.background.poll_flag(position.global_step, accum) if boundary and not last else 0.0
            stopping = (boundary or last) and (last or run.watcher.stop_seen_at_last_poll(due))
            if stopping or not run.first_step_reported:
                meter.read_all()  # (a process's first step too: the start-up line times it)
            if stopping:
                stop_here(run, position, StopPoint.LAST_STEP if last else StopPoint.TRAIN_STEP, on_stop=meter.close)
            elif boundary:
                save_in_background_if_due(run, position, before=meter.read_all)
            asked = time.perf_counter()
        meter.read_all()
    finally:
        meter.close()
    run.optimizer.zero_grad(set_to_none=True)  # a partial accumulation is not stepped
    return meter.stats()


class BadDataError(RuntimeError):
    """More training samples were unreadable than dataset.max_bad_fraction allows."""


@dataclass
class QueuedStep:
    """A training step whose work is queued on the device; its values are read one step later."""

    result: StepResult
    lrs: dict
    it: int  # this rank's step index within the epoch
    epoch_f: float
    images: int  # over all ranks
    data_wait: float = 0.0  # seconds this rank waited for the batch
    bad_samples: int = 0  # unreadable samples skipped to make the batch (dataset.on_bad_sample=skip)
    wall: float = 0.0  # seconds since the step before was queued (this loop's pace, the GPU's when it leads)


class EpochMeter:
    """An epoch's steps as their values arrive: the late-read queue, the loss check, the epoch's
    sums, the progress bar, the first-step line and the scalars."""

    def __init__(self, run, position: Position, steps_per_epoch: int, steps_left: int):
        self.run, self.position, self.steps_left = run, position, steps_left
        self.steps_per_epoch = steps_per_epoch
        self.started, self.images, self.waited, self.recorded = time.perf_counter(), 0, 0.0, 0
        self.last_queued = self.started
        self.pending: list[QueuedStep] = []
        done = steps_per_epoch - steps_left
        # A terminal gets a progress bar; a batch job's log (no terminal) gets a line every print_freq
        # steps instead of one carriage-returned line per epoch.
        self.lines = not sys.stderr.isatty()
        self.bar = tqdm(total=steps_per_epoch, initial=done, desc=f"epoch {position.epoch + 1}",
                        disable=run.info.rank != 0 or self.lines, mininterval=2.0, dynamic_ncols=True)

    def queue(self, step: QueuedStep) -> None:
        """Take a step that was just queued on the device; read the one before it."""
        now = time.perf_counter()
        step.wall, self.last_queued = now - self.last_queued, now
        self.read_all()
        self.pending.append(step)

    def read_all(self) -> None:
        while self.pending:
            self._record(self.pending.pop(0))

    def close(self) -> None:
        self.bar.close()

    def _record(self, step: QueuedStep) -> None:
        run = self.run
        values = read_step(run, step.result)
        # MapAnything's meters: the epoch, each logged lr, the (scaled) loss and the criterion's details.
        self.position.accumulate({"epoch": step.epoch_f, **step.lrs, "loss": values.loss, **values.details})
        self._count_norm(values)
        self.images += step.images
        rate = self.images / max(time.perf_counter() - self.started, 1e-9)
        self.bar.set_postfix(loss=f"{values.loss:.4f}", img_s=f"{rate:.1f}", lr=f"{step.lrs['lr']:.2e}",
                             refresh=False)
        self.bar.update(1)
        self.waited += step.data_wait
        self.recorded += 1
        self._count_bad(step.bad_samples)
        if self.lines and (step.it + 1) % int(run.tp.print_freq) == 0:
            self._line(step, values.loss, rate)
        if not run.first_step_reported:
            # Start-up cost of a (re)started job: what a requeue costs beyond the lost iteration.
            say("mapanything_ext", f"first training step done {time.monotonic() - run.started_at:.1f}s after start")
            run.compile_cache.report_first_step()
        run.first_step_reported = True
        if (step.it + 1) % (int(run.tp.accum_iter) * int(run.tp.print_freq)) == 0:  # MapAnything's cadence
            run.scalars.train_step(step.epoch_f, values, step.lrs)

    def _line(self, step: QueuedStep, loss: float, rate: float) -> None:
        """One progress line for a log without a terminal."""
        elapsed = time.perf_counter() - self.started
        per_step = elapsed / max(self.recorded, 1)
        epoch_left = (self.steps_per_epoch - step.it - 1) * per_step
        run_left = epoch_left + (int(self.run.tp.epochs) - self.position.epoch - 1) * self.steps_per_epoch * per_step
        memory = (f", GPU {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB" if self.run.info.device.type == "cuda"
                  else "")
        say("train", f"epoch {self.position.epoch + 1} step {step.it + 1}/{self.steps_per_epoch}: loss {loss:.4f}, "
            f"lr {step.lrs['lr']:.2e}, {rate:.1f} img/s, step {step.wall:.2f}s, data wait {100 * self.waited / max(elapsed, 1e-9):.0f}%"
            f"{memory}; epoch left {_duration(epoch_left)}, run left {_duration(run_left)} (training steps)")

    def _count_bad(self, skipped: int) -> None:
        """Unreadable samples skipped this epoch (kept in the position's counters); too many stop the run."""
        counters = self.position.counters
        counters["bad_samples"] = counters.get("bad_samples", 0) + skipped
        dataset = self.run.cfg.dataset
        allowed = float(dataset.max_bad_fraction) * len(self.run.train_loader.dataset) / self.run.info.world_size
        if counters["bad_samples"] > allowed:
            raise BadDataError(
                f"{counters['bad_samples']} unreadable training samples skipped in epoch {self.position.epoch + 1} "
                f"on rank {self.run.info.rank}, more than dataset.max_bad_fraction={dataset.max_bad_fraction} of "
                f"its share of the {len(self.run.train_loader.dataset)} samples: the data is broken, not a sample or "
                f"two (console.log's [dataset] skipping lines name the files)")

    def _count_norm(self, values) -> None:
        """Optimizer steps' gradient norms and skips, kept in the position's counters (they survive a resume)."""
        counters = self.position.counters
        if values.skipped:
            counters["skipped_steps"] = counters.get("skipped_steps", 0) + 1
            warn("mapanything_ext", f"non-finite gradient (norm {values.grad_norm}): optimizer step skipped, as "
                 f"MapAnything's loss scaler skips it")
        elif values.grad_norm is not None:
            counters["grad_norm_sum"] = counters.get("grad_norm_sum", 0.0) + values.grad_norm
            counters["optimizer_steps"] = counters.get("optimizer_steps", 0) + 1

    def stats(self) -> dict:
        """MapAnything's train statistics (the epoch's mean of each meter), then ours."""
        position, counters = self.position, self.position.counters
        stats = {k: v / max(position.count, 1) for k, v in position.sums.items()}
        if counters.get("optimizer_steps"):
            stats["grad_norm"] = counters["grad_norm_sum"] / counters["optimizer_steps"]
        stats["skipped_steps"] = counters.get("skipped_steps", 0)
        # every rank's skips (every rank computes the stats at the epoch's end)
        stats["bad_samples"] = int(dist.all_reduce_sum(torch.tensor([float(counters.get("bad_samples", 0))])).item())
        if self.images:
            stats["images_per_s"] = self.images / max(time.perf_counter() - self.started, 1e-9)
        stats["steps_run"] = self.steps_left  # by this process (a resumed epoch: the steps after the resume)
        return stats


def _duration(seconds: float) -> str:
    minutes = int(seconds // 60)
    return f"{minutes // 60}h{minutes % 60:02d}m" if minutes >= 60 else f"{minutes}m{int(seconds % 60):02d}s"
