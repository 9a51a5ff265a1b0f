"""Mid-epoch checkpoints written in the background (train_params.save_every_minutes / save_every_steps).

Without them a crash (an out-of-memory error, a node failure, a killed process) loses everything
since the last epoch's end, hours on real data. A save is due every save_every_steps steps or every
save_every_minutes, as rank 0 judges it (its clock, and whether its last write is done: a disk slower
than the interval postpones saves, never stalls training); its "due" flag travels in the stop poll
every step already makes, so all ranks save at the same step. It is taken where no gradient is
pending, exactly as a stop point's save: the state is gathered (every rank's RNG), then
rank 0 queues copies of its tensors into page-locked host buffers on the GPU's stream (no wait for
the GPU) and a writer thread waits for those copies and writes checkpoint-last atomically
(checkpoint.atomic), while training goes on. The buffers are allocated once, in the background after
the first step, and reused: rank 0 holds a host copy of the training state (about a checkpoint's size).

Any other save, a stop point and the job's end wait for the writer first; a failed background
write is reported and the next save writes the state in full again. A SIGKILL during the write
leaves the previous checkpoint-last (and a temporary file the next start quarantines).
"""

from __future__ import annotations

import threading
import time

import torch

from mapanything_ext.checkpoint import save_on_master
from mapanything_ext.cluster import distributed as dist
from mapanything_ext.cluster import faults
from mapanything_ext.console import say, warn


class BackgroundSaver:
    """When a mid-epoch save is due, and the one write that may be in flight (rank 0)."""

    def __init__(self, every_minutes: float | None, every_steps: int | None, writer: bool):
        self.every_s = float(every_minutes) * 60 if every_minutes else None
        self.every_steps = int(every_steps) if every_steps else None
        self.writer = writer  # rank 0 writes; every rank takes part in the state's gathering
        self.last_saved_at = time.monotonic()
        self.last_saved_step = 0
        self.buffers = HostBuffers()
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._step_before = 0  # the newest state on disk before the write in flight
        # Polls made (the same count on every rank) and the count at the last save: a poll's flag
        # was computed before that save may have made it stale, so only later polls' flags count.
        self._polls = self._saved_at_poll = 0
        self._prepared = False

    @property
    def enabled(self) -> bool:
        return bool(self.every_s or self.every_steps)

    def saved(self, global_step: int) -> None:
        """Any save (an epoch's, a stop's, a resume's starting point) restarts both intervals."""
        self.last_saved_at, self.last_saved_step = time.monotonic(), global_step
        self._saved_at_poll = self._polls

    def poll_flag(self, global_step: int, steps_to_answer: int) -> float:
        """Rank 0's flag for the stop poll about to be queued: 1.0 when a save is due by the time the
        poll is answered (`steps_to_answer` steps on: the next optimizer step) and no write is in flight,
        so a disk slower than the interval postpones saves rather than stalling training."""
        self._polls += 1
        by_clock = self.every_s is not None and time.monotonic() - self.last_saved_at >= self.every_s
        by_steps = self.every_steps is not None and global_step + steps_to_answer - self.last_saved_step >= self.every_steps
        return 1.0 if self.writer and (by_clock or by_steps) and not self.writing() else 0.0

    def due(self, flag_of_last_poll: float) -> bool:
        """The same answer on every rank: the flag of the poll answered last (rank 0's, as the MAX over
        ranks), when that poll was queued after the last save (one queued before it is stale)."""
        return flag_of_last_poll > 0 and self._polls - 1 > self._saved_at_poll

    def prepare_once(self, state_of) -> None:
        """Rank 0, at the first step where the optimizer has its state: allocate the host buffers in
        the background (state_of(): the model's and optimizer's state dicts, as a save nests them)."""
        if self._prepared or not self.enabled:
            return
        self._prepared = True
        if self.writer:
            self.buffers.prepare_in_background(state_of())

    def writing(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self, state: dict, path, previous, global_step: int, saved_step: int) -> None:
        """Hand `state` (live tensors, possibly on the GPU) to the writer: copies queued now, written
        in the background. Rank 0 only; the caller has gathered the state on every rank."""
        self.wait()
        started = time.perf_counter()
        snapshot, copied = self.buffers.copy(state)
        self._step_before, self._error = saved_step, None
        self._thread = threading.Thread(target=self._write, args=(snapshot, copied, path, previous, global_step),
                                        name="background-save", daemon=True)
        self._thread.start()
        say("mapanything_ext", f"background save of global step {global_step} started ({self.buffers.gib():.2f} GiB "
            f"to host memory, queued in {time.perf_counter() - started:.2f}s); training goes on")

    def _write(self, snapshot: dict, copied, path, previous, global_step: int) -> None:
        try:
            started = time.perf_counter()
            if copied is not None:
                copied.synchronize()  # the host copies of this step's tensors are complete
            save_on_master(snapshot, path, keep_previous_as=previous, before_rename=faults.at_background_write)
            say("mapanything_ext", f"background save of global step {global_step} written to {path.name} in "
                f"{time.perf_counter() - started:.2f}s")
        except BaseException as err:  # noqa: BLE001 -- reported by wait(), on the training thread
            self._error = err

    def wait(self) -> BaseException | None:
        """Rank 0: let the write in flight finish; returns its error (reported here), if any."""
        if self._thread is None:
            return None
        self._thread.join()
        self._thread, error, self._error = None, self._error, None
        if error is not None:
            warn("mapanything_ext", f"the background save failed: {error}. Training goes on; the state is written "
                 f"in full at the next save")
        return error

    def settle(self, saved_step: int) -> int:
        """Collective: the global step whose state is on disk once the writer is done (a failed
        write's step is not)."""
        failed = self.wait() is not None if self.writer else False
        return int(dist.broadcast_object(self._step_before if failed else saved_step))


class HostBuffers:
    """Host copies of a state's tensors, reused from save to save: page-locked for the GPU's
    tensors (so their copies are queued, not waited for), plain for the CPU's."""

    def __init__(self):
        self._held: dict[tuple, torch.Tensor] = {}
        self._preparing: threading.Thread | None = None

    def gib(self) -> float:
        return sum(t.numel() * t.element_size() for t in self._held.values()) / 2**30

    def prepare_in_background(self, state: dict) -> None:
        """Allocate the buffers `state`'s tensors need, off the training thread (page-locking ~15 GB
        takes seconds, which the first save would otherwise stall for)."""
        shapes = {key: (t.shape, t.dtype, t.is_cuda) for key, t in _tensors(state)}
        self._preparing = threading.Thread(target=self._allocate_all, args=(shapes,), name="save-buffers",
                                           daemon=True)
        self._preparing.start()

    def _allocate_all(self, shapes: dict) -> None:
        for key, (shape, dtype, is_cuda) in shapes.items():
            self._buffer(key, shape, dtype, is_cuda)

    def _buffer(self, key: tuple, shape, dtype, pinned: bool) -> torch.Tensor:
        held = self._held.get(key)
        if held is None or held.shape != shape or held.dtype != dtype:
            held = torch.empty(shape, dtype=dtype, pin_memory=pinned)
            self._held[key] = held
        return held

    def copy(self, state: dict):
        """The state with every tensor replaced by its host copy, and the event that marks the GPU
        copies done (None when every tensor was on the CPU: copied at once)."""
        if self._preparing is not None:
            self._preparing.join()
            self._preparing = None
        on_gpu = False

        def host_copy(key, tensor):
            nonlocal on_gpu
            buffer = self._buffer(key, tensor.shape, tensor.dtype, tensor.is_cuda)
            buffer.copy_(tensor.detach(), non_blocking=tensor.is_cuda)
            on_gpu |= tensor.is_cuda
            return buffer

        snapshot = _map_tensors(state, host_copy, ())
        if not on_gpu:
            return snapshot, None
        event = torch.cuda.Event()
        event.record()
        return snapshot, event


def _tensors(obj, key=()):
    if isinstance(obj, torch.Tensor):
        yield key, obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from _tensors(v, (*key, k))
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from _tensors(v, (*key, i))


def _map_tensors(obj, fn, key):
    if isinstance(obj, torch.Tensor):
        return fn(key, obj)
    if isinstance(obj, dict):
        return {k: _map_tensors(v, fn, (*key, k)) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_map_tensors(v, fn, (*key, i)) for i, v in enumerate(obj)]
    if isinstance(obj, tuple):
        return tuple(_map_tensors(v, fn, (*key, i)) for i, v in enumerate(obj))
    return obj
