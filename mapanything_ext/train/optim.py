"""AdamW over MapAnything's parameter groups, and the learning rate of each group.

Groups as MapAnything's `get_parameter_groups` makes them, so that a step, a frozen part and an
optimizer state dict are the same as its loop's: parameters in `named_parameters` order, a group per
(submodule of `train_params.submodule_configs`, decay or not), named `decay`, `no_decay`,
`<submodule>_decay`, `<submodule>_no_decay` in the order they first occur; no weight decay for 1-D
tensors and names ending in `.bias`; a submodule with lr 0 is frozen (requires_grad off: no gradient,
no optimizer state, its weights bitwise unchanged).

The learning rate is a pure function of the fractional epoch (linear warm-up, then a half-cycle
cosine to min_lr), per group with that group's lr, min_lr and warm-up, so resuming anywhere needs no
scheduler state: the position alone restores it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from mapanything_ext.console import warn
from mapanything_ext.train_params import TrainParams


@dataclass(frozen=True)
class GroupSchedule:
    """What sets one group's learning rate."""

    submodule: str  # "default" or a submodule_configs key
    lr: float
    min_lr: float
    warmup_epochs: float


def param_groups(model: nn.Module, tp: TrainParams) -> tuple[list[dict], list[GroupSchedule]]:
    """The optimizer's groups and each group's schedule; freezes the submodules with lr 0."""
    groups: dict[str, dict] = {}
    schedules: dict[str, GroupSchedule] = {}
    _refuse_unmatched(model, tp)
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        submodule = tp.submodule_of(name)
        if submodule is None and tp.warn_not_in_submodule and tp.submodule_configs:
            warn("optim", f"parameter {name} is in no train_params.submodule_configs entry")
        lr = float(tp.setting(submodule, "lr"))
        if lr == 0:
            param.requires_grad_(False)
            continue
        decays = not (param.ndim == 1 or name.endswith(".bias"))
        group = f"{submodule + '_' if submodule else ''}{'decay' if decays else 'no_decay'}"
        if group not in groups:
            weight_decay = float(tp.setting(submodule, "weight_decay")) if decays else 0.0
            groups[group] = {"params": [], "lr": lr, "weight_decay": weight_decay}
            schedules[group] = GroupSchedule(submodule or "default", lr, float(tp.setting(submodule, "min_lr")),
                                             float(tp.setting(submodule, "warmup_epochs")))
        groups[group]["params"].append(param)
    return list(groups.values()), list(schedules.values())


def _refuse_unmatched(model: nn.Module, tp: TrainParams) -> None:
    """A submodule_configs key that covers no parameter is a typo, not a no-op."""
    names = [name for name, _ in model.named_parameters()]
    unmatched = [key for key in tp.submodule_configs if not any(name.startswith(key) for name in names)]
    if unmatched:
        tops = sorted({name.split(".")[0] for name in names})
        raise ValueError(f"train_params.submodule_configs names {', '.join(unmatched)}, which no parameter of the "
                         f"model starts with; the model's top-level parts are {', '.join(tops)}")


def freeze_zero_lr(model: nn.Module, tp: TrainParams) -> None:
    """Freeze every submodule whose lr is 0 (before DDP or FSDP see which parameters train)."""
    _refuse_unmatched(model, tp)
    for name, param in model.named_parameters():
        if param.requires_grad and float(tp.setting(tp.submodule_of(name), "lr")) == 0:
            param.requires_grad_(False)


def build_optimizer(model: nn.Module, tp: TrainParams) -> tuple[torch.optim.Optimizer, list[GroupSchedule]]:
    groups, schedules = param_groups(model, tp)
    # The fused kernel (one launch for all parameters) where every parameter is on a GPU; it also
    # skips a step with a non-finite gradient on the device (step.py), without a host sync.
    fused = all(p.is_cuda for g in groups for p in g["params"]) and torch.cuda.is_available()
    optimizer = torch.optim.AdamW(groups, lr=float(tp.lr), betas=tuple(tp.betas), fused=fused or None)
    return optimizer, schedules


def lr_at(epoch: float, lr: float, min_lr: float, warmup_epochs: float, epochs: float) -> float:
    """MapAnything's linear_warmup_half_cycle_cosine_decay at a fractional epoch."""
    if epoch < warmup_epochs:
        return lr * epoch / warmup_epochs
    span = max(epochs - warmup_epochs, 1e-12)
    progress = min((epoch - warmup_epochs) / span, 1.0)
    return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def set_lr(optimizer: torch.optim.Optimizer, schedules: list[GroupSchedule], epoch: float, epochs: float) -> None:
    """Every group's learning rate at the fractional epoch."""
    for group, schedule in zip(optimizer.param_groups, schedules):
        group["lr"] = lr_at(epoch, schedule.lr, schedule.min_lr, schedule.warmup_epochs, epochs)


def logged_lrs(optimizer: torch.optim.Optimizer, schedules: list[GroupSchedule]) -> dict[str, float]:
    """`lr` (the default's) and `lr_<submodule>` per configured submodule, as MapAnything logs them."""
    lrs = {}
    for group, schedule in zip(optimizer.param_groups, schedules):
        key = "lr" if schedule.submodule == "default" else f"lr_{schedule.submodule}"
        lrs.setdefault(key, group["lr"])
    return lrs
