"""Preemption and time-limit signals, honoured at iteration boundaries.

Slurm warns a job before its time limit with SIGUSR2 (submitit asks for
`--signal=USR2@<signal_delay_s>`), and preempts or `scontrol requeue`s it with SIGTERM.
Our handlers only record the signal. The engine asks `should_stop()` after each
iteration: all ranks agree (an all-reduce of the flag), rank 0 writes checkpoint-last
with the exact position, then `requeue_and_exit()`:

  SIGUSR2 under submitit   hand the signal to submitit's own handler, which pickles the
                           launcher's checkpoint() (the same Hydra task) and runs
                           `scontrol requeue`; its countdown bounds time-outs
  SIGTERM under Slurm      Slurm itself requeues a preempted / requeued job: just exit
  outside Slurm            exit with EXIT_PREEMPTED; rerunning the command resumes

Requeues are bounded: a job restarted more than `slurm.max_num_timeout` times
(SLURM_RESTART_COUNT) stops at start-up with a clear message.
"""

from __future__ import annotations

import os
import signal
import sys
import time

import torch

from mapanything_ext import distributed as dist

EXIT_PREEMPTED = 3
_SIGNALS = (signal.SIGUSR2, signal.SIGTERM)


class RequeueLimitExceeded(RuntimeError):
    """The job was requeued more often than the machine profile allows."""


def check_requeue_budget(max_requeues) -> int:
    """Number of restarts so far; raises when it exceeds max_requeues (None: unbounded)."""
    restarts = int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0)
    if max_requeues is not None and restarts > int(max_requeues):
        raise RequeueLimitExceeded(
            f"Slurm job {os.environ.get('SLURM_JOB_ID')} has been requeued {restarts} times, more than "
            f"machine.slurm.max_num_timeout={max_requeues}; stopping. Its checkpoint-last is intact: raise the "
            f"limit or resubmit the same command to continue."
        )
    return restarts


class PreemptionWatcher:
    def __init__(self):
        self.received: int | None = None
        self.received_at: float | None = None
        self._previous: dict[int, object] = {}

    def install(self) -> None:
        for signum in _SIGNALS:
            self._previous[signum] = signal.getsignal(signum)
            signal.signal(signum, self._record)

    def uninstall(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def _record(self, signum, frame) -> None:
        # Only a flag: the handler may interrupt anything, even a checkpoint write.
        if self.received is None:
            self.received = signum
            self.received_at = time.monotonic()

    def should_stop(self) -> bool:
        """Collective: True on every rank when any rank received a signal."""
        flag = torch.tensor([0.0 if self.received is None else 1.0])
        return bool(dist.all_reduce_max(flag).item() > 0)

    def requeue_and_exit(self) -> None:
        """After checkpoint-last is on disk: let Slurm/submitit requeue, then leave."""
        signum = self.received
        name = signal.Signals(signum).name if signum else "a peer rank's signal"
        waited = f" {time.monotonic() - self.received_at:.1f}s after the signal" if self.received_at else ""
        print(f"[preemption] {name}: checkpoint-last written{waited}, leaving for requeue", flush=True)
        submitit_handler = self._previous.get(signal.SIGUSR2)
        dist.barrier()
        if signum == signal.SIGUSR2 and callable(submitit_handler) and _is_submitit_handler(submitit_handler):
            if dist.get_rank() == 0:
                submitit_handler(signum, None)  # requeues and calls sys.exit
        dist.cleanup()
        sys.exit(EXIT_PREEMPTED)


def _is_submitit_handler(handler) -> bool:
    return getattr(handler, "__module__", "").startswith("submitit")
