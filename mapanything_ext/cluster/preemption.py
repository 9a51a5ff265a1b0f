"""Preemption and time-limit signals: which signal means what, who acts on it, and when.

  SIGUSR2   Slurm's warning before the time limit (submitit asks for `--signal=USR2@<signal_delay_s>`).
            Our job asks submitit to requeue it (submitit counts these requeues as time-outs, at most
            `slurm.max_num_timeout`; when that budget is spent, submitit refuses: the job says so, goes
            on training from its fresh checkpoint and Slurm ends it at the limit, state TIMEOUT).
  SIGTERM   Slurm preempts the job or `scontrol requeue` was run: Slurm requeues the job itself
            (no budget of ours; Slurm counts every restart in SLURM_RESTART_COUNT).
  SIGINT    Ctrl-C (a terminal sends it to every rank of a torchrun job): the first one stops the job
            like a preemption, with the exact position saved, and exits EXIT_INTERRUPTED with one line
            saying how to resume; a second one leaves at once (KeyboardInterrupt).

Handlers only record the signal (they may interrupt anything, a checkpoint write too). The
engine asks `stop_requested()` at its stop points (`StopPoint`, below: the one list of them); after
every training step that is not an epoch's last it asks `stop_seen_at_last_poll()`, the same question answered one step late so that asking never
makes the host wait for the GPU. Both are collectives: every rank learns the strongest signal
any rank received, so a signal that reached one rank only (one node's tasks, say) stops the whole
job at the same point. The engine then writes what the position needs (checkpoint-last, or
nothing when nothing new exists) and calls `requeue_and_exit()`:

  SIGUSR2 under submitit   rank 0 runs submitit's own handler (it pickles the launcher's
                           checkpoint(), the same Hydra task, and runs `scontrol requeue`), then
                           every rank leaves together, so `srun --kill-on-bad-exit` cannot kill
                           rank 0 before the requeue is issued
  SIGTERM under Slurm      Slurm requeues the job itself: leave
  otherwise                leave with EXIT_PREEMPTED; rerunning the same command resumes
"""

from __future__ import annotations

import enum
import os
import signal
import sys
import time

import torch

from mapanything_ext.cluster import distributed as dist
from mapanything_ext.console import say

EXIT_PREEMPTED = 3
EXIT_INTERRUPTED = 130  # the shell's code for a process ended by Ctrl-C
# Order matters: when ranks saw different signals, the stronger (later) one wins. A time-limit
# warning anywhere needs submitit's requeue even if another rank also saw a SIGTERM or a Ctrl-C.
_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR2)


class StopPoint(enum.Enum):
    """Where a run honours a stop signal, in the order a run meets them. The value names the point
    in console.log ("... at stop point train_step") and in fault injection (faults.py:
    MAPANYTHING_EXT_FAULT=SIGUSR2@train_step); the text says what the run was doing."""

    STARTUP = "startup"
    INITIAL_EVAL = "initial_eval"
    LOADER_START = "loader_start"
    TRAIN_STEP = "train_step"
    LAST_STEP = "last_step"
    EVAL = "eval"
    END_OF_EPOCH = "end_of_epoch"

    @property
    def text(self) -> str:
        return _STOP_TEXT[self]


_STOP_TEXT = {
    StopPoint.STARTUP: "before training starts",
    StopPoint.INITIAL_EVAL: "during the evaluation before training",
    StopPoint.LOADER_START: "the data loader's start",
    StopPoint.TRAIN_STEP: "after a training step",
    StopPoint.LAST_STEP: "after the epoch's last step",
    StopPoint.EVAL: "during the end-of-epoch evaluation",
    StopPoint.END_OF_EPOCH: "after the epoch's saves",
}


def restarts_so_far() -> int:
    """How often Slurm restarted this job (preemptions, requeues and time-outs together)."""
    return int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0)


class PreemptionWatcher:
    def __init__(self):
        self.received: int | None = None
        self.received_at: float | None = None  # wall clock: ranks on other hosts compare it
        self.agreed: int | None = None
        self.agreed_at: float | None = None  # the earliest signal of any rank
        self._previous: dict[int, object] = {}
        self._queued_poll = None  # stop_seen_at_last_poll's reduction in flight
        self.also_at_last_poll = 0.0

    def install(self) -> None:
        for signum in _SIGNALS:
            self._previous[signum] = signal.getsignal(signum)
            signal.signal(signum, self._record)

    def _record(self, signum, frame) -> None:
        # Only a flag: the handler may interrupt anything, even a checkpoint write.
        if signum == signal.SIGINT and self.received == signal.SIGINT:
            raise KeyboardInterrupt("a second Ctrl-C: leaving at once")
        if signum == signal.SIGINT and self.received is None:
            sys.stderr.write("\n[preemption] Ctrl-C: stopping at the next stop point with the position saved "
                             "(Ctrl-C again to leave at once)\n")
        if self.received is None or _SIGNALS.index(signum) > _SIGNALS.index(self.received):
            self.received = signum
        if self.received_at is None:
            self.received_at = time.time()

    def stop_requested(self) -> bool:
        """Collective: True on every rank when any rank received a signal; remembers which."""
        seen = dist.all_reduce_max(self._flags()).tolist()
        strongest = [s for s, flag in zip(_SIGNALS, seen) if flag > 0]
        self.agreed = strongest[-1] if strongest else None
        self.agreed_at = -seen[-1] if strongest else None
        return self.agreed is not None

    def stop_seen_at_last_poll(self, also: float = 0.0) -> bool:
        """Collective, without waiting for the GPU: queues this rank's flags into a MAX all-reduce
        and answers from the reduction the previous call queued (False at the first call). Every
        rank answers from the same reduction, so all stop at the same step: one step after the one
        whose poll first carried the signal. The train loop polls this way at every step, where
        stop_requested() would drain the GPU's queue each time; the stop itself then goes through
        stop_requested(), which agrees (a received signal stays recorded). `also` rides along (the
        MAX over ranks of the previous call's comes back as `also_at_last_poll`): a background save's
        "due" flag needs no collective of its own."""
        flags = torch.cat([self._flags(), torch.tensor([float(also)], dtype=torch.float64)])
        previous, self._queued_poll = self._queued_poll, dist.queue_all_reduce_max(flags)
        if previous is None:
            return False
        values = previous.get().tolist()
        self.also_at_last_poll = values[-1]
        return any(flag > 0 for flag in values[:-2])

    def _flags(self) -> torch.Tensor:
        # For one MAX all-reduce: a flag per signal, and minus the arrival time (so the earliest wins).
        seen = torch.zeros(len(_SIGNALS) + 1, dtype=torch.float64)
        seen[-1] = -1e18
        if self.received is not None:
            seen[_SIGNALS.index(self.received)] = 1.0
            seen[-1] = -self.received_at
        return seen

    def requeue_and_exit(self, what_was_saved: str) -> None:
        """After what the position needs is on disk: let Slurm/submitit requeue, then leave. When
        submitit refuses (its time-out budget is spent) every rank returns instead and training goes
        on until Slurm ends the job at its time limit (state TIMEOUT), from a checkpoint on disk."""
        signum = self.agreed
        source = "this rank" if self.received == signum else "another rank"
        waited = f", {time.time() - self.agreed_at:.2f}s after the signal" if self.agreed_at else ""
        if signum == signal.SIGINT:
            say("preemption", f"SIGINT (Ctrl-C, received by {source}): {what_was_saved}{waited}; interrupted: "
                f"rerun the same command to resume")
            dist.cleanup()
            sys.exit(EXIT_INTERRUPTED)
        say("preemption", f"{signal.Signals(signum).name} (received by {source}): {what_was_saved}{waited}; leaving "
            f"for requeue")
        code, refused = EXIT_PREEMPTED, None
        submitit_handler = self._previous.get(signal.SIGUSR2)
        if signum == signal.SIGUSR2 and dist.get_rank() == 0 and _is_submitit_handler(submitit_handler):
            try:
                submitit_handler(signum, None)  # checkpoint() + scontrol requeue, then sys.exit
            except SystemExit as exit_:
                code = exit_.code
            except Exception as err:  # submitit refuses: its time-out budget is spent
                refused = str(err)
        # Nobody leaves before rank 0 has handed the requeue to Slurm (or learnt it is refused).
        refused = dist.broadcast_object(refused)
        if refused:
            say("preemption", f"not requeued: {refused} (machine.slurm.max_num_timeout). The job runs on until Slurm "
                f"ends it at its time limit (TIMEOUT); the newest checkpoint holds this position: resubmit the same "
                f"command to continue.")
            self.received = self.received_at = self.agreed = self.agreed_at = None
            return
        dist.cleanup()
        sys.exit(code)


def _is_submitit_handler(handler) -> bool:
    return callable(handler) and getattr(handler, "__module__", "").startswith("submitit")
