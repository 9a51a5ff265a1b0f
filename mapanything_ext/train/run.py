"""The state of one training job on one rank, shared by the engine's parts (built by build.py)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from omegaconf import DictConfig

from mapanything_ext.cluster import distributed as dist
from mapanything_ext.cluster.preemption import PreemptionWatcher
from mapanything_ext.run_log import Scalars
from mapanything_ext.train.background_save import BackgroundSaver
from mapanything_ext.train.compile_cache import CompileCache
from mapanything_ext.train.optim import GroupSchedule
from mapanything_ext.train_params import TrainParams


@dataclass
class Run:
    cfg: DictConfig
    tp: TrainParams
    info: dist.DistInfo
    output_dir: Path
    model: torch.nn.Module  # what trains: the module, or its DDP wrapper
    module: torch.nn.Module  # the model without its DDP wrapper
    optimizer: torch.optim.Optimizer
    schedules: list[GroupSchedule]  # one per optimizer group
    train_criterion: object
    test_criterion: object
    train_loader: object
    test_loader: object
    test_name: str  # log.txt's and TensorBoard's prefix of the test statistics (MapAnything's test set name)
    watcher: PreemptionWatcher | None
    autocast: torch.dtype | None  # bf16 on a GPU when train_params.amp, else None (full precision)
    compile_cache: CompileCache  # torch.compile's caches of this job (folder None: torch's default)
    started_at: float = field(default_factory=time.monotonic)  # train() sets it to its own start
    scalars: Scalars | None = None  # opened once the resume position is known
    first_step_reported: bool = False
    saved_step: int = 0  # global step of the newest state on disk (a fresh start: 0, nothing to save)
    pretrained_fingerprint: str | None = None  # content of the model.pretrained file the run started from
    wandb_run_id: str | None = None  # logger=wandb: the W&B run this training run logs to (kept in checkpoints)
    background: BackgroundSaver | None = None  # mid-epoch saves (train_params.save_every_minutes/_steps)


def autocast_dtype(tp: TrainParams, device: torch.device) -> torch.dtype | None:
    """Autocast dtype, or None: bf16 on GPU when train_params.amp, full precision on CPU."""
    if not tp.amp or device.type != "cuda":
        return None
    return torch.bfloat16
