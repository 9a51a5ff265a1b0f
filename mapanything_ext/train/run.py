"""The state of one training job on one rank, shared by the engine's parts."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from omegaconf import DictConfig

from mapanything_ext import distributed as dist
from mapanything_ext.preemption import PreemptionWatcher
from mapanything_ext.run_log import Scalars


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
    scalars: Scalars | None  # opened once the resume step is known
    watcher: PreemptionWatcher
    started_at: float = field(default_factory=time.monotonic)  # train() sets it to its own start
    first_step_reported: bool = False
    saved_step: int = 0  # global step of the newest state on disk (a fresh start: 0, nothing to save)
    bar: object = None  # the epoch's progress bar, closed before a stop prints

    @property
    def tp(self):
        return self.cfg.train_params


def amp_dtype(run: Run):
    """Autocast dtype, or None: bf16 on GPU when train_params.amp, full precision on CPU."""
    if not run.tp.amp or run.info.device.type != "cuda":
        return None
    return torch.bfloat16
