"""The GPU memory the job will need per rank, estimated (train/memory_estimate.py) for the GPU this node
has (or machine.gpu_memory_gib), with a warning before a run that would not fit."""

from __future__ import annotations

import torch

from mapanything_ext import train_params as params
from mapanything_ext.preflight.run_check import node_device
from mapanything_ext.train import sharding
from mapanything_ext.train.memory_estimate import USABLE_FRACTION, fits
from mapanything_ext.train.optim import freeze_zero_lr

ADVICE = ("machine=gpu24g (fsdp, offload where needed, gradient checkpointing), or distributed.strategy=fsdp, "
          "model.gradient_checkpointing=true, train_params=freeze_encoder, a smaller "
          "train_params.max_num_of_imgs_per_gpu")


def planned_world_size(cfg) -> int:
    """The ranks the job will have: distributed.world_size, else the Slurm profile's GPUs, else this
    node's GPUs (1 without any)."""
    if cfg.distributed.get("world_size"):
        return int(cfg.distributed.world_size)
    slurm = cfg.machine.get("slurm") or {}
    gpus = int(slurm.get("nodes") or 1) * int(slurm.get("gpus_per_node") or 0)
    return gpus or max(1, torch.cuda.device_count())


def check_memory(cfg, model: torch.nn.Module, lines: list[str]) -> None:
    freeze_zero_lr(model, params.load(cfg.train_params))  # the parts the job trains
    world = planned_world_size(cfg)
    card = sharding.card_gib(cfg, node_device())
    offload = sharding.resolve_offload(model, cfg, world, card)[0] and sharding.strategy_of(cfg) == "fsdp"
    estimate = sharding.estimate_memory(model, cfg, world, offload=offload)
    setting = f"{sharding.strategy_of(cfg)}{' with offload' if offload else ''} at world size {world}"
    if card is None:
        lines.append(f"memory: {estimate.describe()}, {setting} (no GPU on this node to compare with; "
                     "machine.gpu_memory_gib=<GiB> compares with a card of that size)")
    elif not fits(estimate, card):
        lines.append(f"WARNING: memory: {estimate.describe()}, {setting}: more than {USABLE_FRACTION:.0%} of the "
                     f"{card:.0f} GiB card, likely out of memory. Try {ADVICE}")
    else:
        lines.append(f"memory: {estimate.describe()}, {setting}: fits the {card:.0f} GiB card")
