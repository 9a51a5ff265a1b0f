"""Fault injection for tests of the stop paths: a real signal at an exact phase of a run.

    MAPANYTHING_EXT_FAULT=<signal>@<phase>[@<rank>]     e.g. SIGUSR2@eval@1

makes rank <rank> (default 0) send itself <signal> (SIGUSR2 or SIGTERM) with os.kill when it
enters <phase> for the first time in this process. The phases are the stop points
(preemption.StopPoint), each fired where the run starts the work that point follows:

  startup       after the model is built, before the first batch is fetched
  initial_eval  the first batch of the evaluation before training (train_params.eval_before_training)
  loader_start  before the first batch of an epoch is fetched (data-loader workers starting)
  train_step    the second training step of an epoch (a step in the middle)
  last_step     the last training step of an epoch
  eval          the first batch of an end-of-epoch evaluation
  end_of_epoch  the start of the epoch's checkpoint write (its stop point follows the saves)

The signal is real and goes through the same handler as Slurm's; only its timing is chosen.
Unset (the normal case), `at()` costs one dictionary lookup.
"""

from __future__ import annotations

import os
import signal

from mapanything_ext.cluster import distributed as dist
from mapanything_ext.cluster.preemption import StopPoint
from mapanything_ext.console import say

PHASES = tuple(point.value for point in StopPoint)
_fired: set[str] = set()


def _parse(spec: str) -> tuple[int, str, int]:
    parts = spec.split("@")
    if len(parts) not in (2, 3) or parts[1] not in PHASES or parts[0] not in ("SIGUSR2", "SIGTERM"):
        raise ValueError(f"MAPANYTHING_EXT_FAULT={spec!r}: expected SIGUSR2|SIGTERM@<phase>[@<rank>], "
                         f"phases {', '.join(PHASES)}")
    return getattr(signal, parts[0]), parts[1], int(parts[2]) if len(parts) == 3 else 0


def at(point: StopPoint) -> None:
    spec = os.environ.get("MAPANYTHING_EXT_FAULT")
    if not spec:
        return
    phase = point.value
    signum, wanted, rank = _parse(spec)
    if phase == wanted and rank == dist.get_rank() and phase not in _fired:
        _fired.add(phase)
        say("faults", f"rank {rank}: sending itself {signal.Signals(signum).name} at {phase}", every_rank=True)
        os.kill(os.getpid(), signum)
