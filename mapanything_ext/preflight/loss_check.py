"""loss.impl's self-check on the first training sample, before any model exists: the batched
criterion against MapAnything's (losses/loss_selfcheck.py), the ground truth disturbed standing in
for the model's predictions (the job repeats it with the model's own at its start).
"""

from __future__ import annotations

import importlib.util

from omegaconf import DictConfig


def loss_check(cfg: DictConfig) -> tuple[list[str], list[str]]:
    """(lines, problems) of loss.impl's self-check on the first training sample, with the ground
    truth disturbed standing in for the model's predictions (the job repeats it with the model's)."""
    if cfg.loss.get("name") != "overall_loss" or str(cfg.loss.get("impl") or "auto") == "reference":
        return [], []
    if importlib.util.find_spec("mapanything") is None:
        return [], []  # _mapanything_problems says so
    from torch.utils.data import default_collate

    from mapanything_ext.datasets.build import build_dataset
    from mapanything_ext.losses.loss_selfcheck import (
        LossMismatch,
        predictions_for_check,
    )
    from mapanything_ext.models.registry import build_criteria

    try:
        views = default_collate([build_dataset(cfg.dataset.train_dataset)[0]])
    except Exception as err:  # noqa: BLE001 -- a data problem is reported, the check skipped
        return [f"loss: not checked, the first training sample cannot be read: {err}"], []
    lines, problems = [], []
    try:
        for criterion in build_criteria(cfg.loss):
            lines.append("loss: " + criterion.self_check(views, predictions_for_check(views)))
    except (LossMismatch, ValueError) as err:  # loss.impl=batched that cannot or does not agree
        problems.append(str(err))
    return lines, problems
