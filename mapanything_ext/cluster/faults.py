"""Fault injection for tests of the stop paths: a real signal at an exact phase of a run.

    MAPANYTHING_EXT_FAULT=<signal>@<phase>[@<rank>[@<n>]]     e.g. SIGUSR2@eval@1

makes rank <rank> (default 0) send itself <signal> (SIGUSR2 or SIGTERM) with os.kill when it
enters <phase> for the <n>-th time (default the first) in this process. The phases are the stop points
(preemption.StopPoint), each fired where the run starts the work that point follows:

  startup       after the model is built, before the first batch is fetched
  initial_eval  the first batch of the evaluation before training (train_params.eval_before_training)
  loader_start  before the first batch of an epoch is fetched (data-loader workers starting)
  train_step    the second training step of an epoch (a step in the middle)
  last_step     the last training step of an epoch
  eval          the first batch of an end-of-epoch evaluation
  end_of_epoch  the start of the epoch's checkpoint write (its stop point follows the saves)

and one more phase, not a stop point, for SIGKILL alone (a crash, not a stop):

  background_write  a mid-epoch background save: its temporary file written in full, not yet renamed

The signal is real and goes through the same handler as Slurm's; only its timing is chosen.
Unset (the normal case), `at()` costs one dictionary lookup.
"""

from __future__ import annotations

import os
import signal

from mapanything_ext.cluster import distributed as dist
from mapanything_ext.cluster.preemption import StopPoint
from mapanything_ext.console import say

BACKGROUND_WRITE = "background_write"
PHASES = (*(point.value for point in StopPoint), BACKGROUND_WRITE)
_entered: dict[str, int] = {}


def _parse(spec: str) -> tuple[int, str, int, int]:
    parts = spec.split("@")
    crash = len(parts) >= 2 and parts[:2] == ["SIGKILL", BACKGROUND_WRITE]
    if len(parts) not in (2, 3, 4) or parts[1] not in PHASES or not (parts[0] in ("SIGUSR2", "SIGTERM") or crash):
        raise ValueError(f"MAPANYTHING_EXT_FAULT={spec!r}: expected SIGUSR2|SIGTERM@<phase>[@<rank>[@<n>]] "
                         f"(phases {', '.join(PHASES[:-1])}) or SIGKILL@{BACKGROUND_WRITE}[@<rank>[@<n>]]")
    rank = int(parts[2]) if len(parts) >= 3 else 0
    nth = int(parts[3]) if len(parts) == 4 else 1
    return getattr(signal, parts[0]), parts[1], rank, nth


def at(point: StopPoint) -> None:
    _fire(point.value)


def at_background_write() -> None:
    _fire(BACKGROUND_WRITE)


def _fire(phase: str) -> None:
    spec = os.environ.get("MAPANYTHING_EXT_FAULT")
    if not spec:
        return
    signum, wanted, rank, nth = _parse(spec)
    if phase != wanted or rank != dist.get_rank():
        return
    _entered[phase] = _entered.get(phase, 0) + 1
    if _entered[phase] == nth:
        say("faults", f"rank {rank}: sending itself {signal.Signals(signum).name} at {phase}", every_rank=True)
        os.kill(os.getpid(), signum)
