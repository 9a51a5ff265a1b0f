"""Learning rate: linear warmup, then a half-cycle cosine down to min_lr.

The rate is a pure function of the fractional epoch, so resuming anywhere (even
mid-epoch) needs no scheduler state: the position alone restores it.
"""

from __future__ import annotations

import math


def lr_at(epoch: float, lr: float, min_lr: float, warmup_epochs: float, epochs: float) -> float:
    if epoch < warmup_epochs:
        return lr * epoch / warmup_epochs
    span = max(epochs - warmup_epochs, 1e-12)
    progress = min((epoch - warmup_epochs) / span, 1.0)
    return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def set_lr(optimizer, lr: float) -> None:
    """Apply lr to every group, scaled by a group's `lr_scale` when it has one."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


def warmup_warning(tp) -> str | None:
    """What the schedule really does when the warm-up is as long as the run or longer; else None."""
    lr, warmup, epochs = float(tp.lr), float(tp.warmup_epochs), float(tp.epochs)
    if warmup < epochs:
        return None
    peak = lr_at(epochs, lr, float(tp.min_lr), warmup, epochs)
    return (f"train_params.warmup_epochs={warmup:g} >= train_params.epochs={epochs:g}: the learning rate rises "
            f"for the whole run, peaks at {peak:.3g} ({100 * peak / lr:.0f}% of train_params.lr={lr:g}) at its end "
            f"and never decays; reaching lr needs {warmup:g} epochs. For a full warm-up and cosine decay within "
            f"this run set a shorter warm-up, e.g. train_params.warmup_epochs={max(epochs / 10, 0.1):g} "
            f"(docs/configuration.md, Learning-rate schedule).")
