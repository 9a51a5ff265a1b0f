"""Preflight: will this job run offline, without downloading anything?

    python -m mapanything_ext.preflight machine=<profile> model=mapanything [model.pretrained=...] ...

Runs at the start of every training job too (and stops it with the same message). It also prints
warnings about what will run but not as expected (a warm-up as long as the run). It checks,
for `model=mapanything`: MapAnything and uniception import; the DINOv2 hub code is in the torch
hub cache; `encoder.torch_hub_pretrained` is off when a full checkpoint is given, and its weights
are cached when it is on; torch hub is not asked to reload; and, for every model, that
`model.pretrained` exists. Each problem says exactly what to copy where or what to set. The command
(not the job, which does it with the model's predictions) also runs `loss.impl`'s self-check on the
first training sample: the batched criterion against MapAnything's (losses/loss_selfcheck.py).
"""

from __future__ import annotations

import importlib.util
import sys

import torch
from omegaconf import DictConfig

from mapanything_ext.config import compose_training
from mapanything_ext.models.offline import problems_of


def warnings_of(cfg: DictConfig) -> list[str]:
    """What will run, but not as a user would expect (the job prints these at start too)."""
    from mapanything_ext import train_params as params

    return [w for w in (params.load(cfg.train_params).warmup_warning(),) if w]


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


def main(argv=None) -> int:
    cfg = compose_training(list(sys.argv[1:] if argv is None else argv))
    found = problems_of(cfg)
    lines, loss_problems = loss_check(cfg)
    for line in lines:
        print(f"[preflight] {line}")
    found += loss_problems
    for warning in warnings_of(cfg):
        print(f"[preflight] WARNING: {warning}")
    for problem in found:
        print(f"[preflight] PROBLEM: {problem}")
    print(f"[preflight] {'OK: nothing will be downloaded' if not found else f'{len(found)} problem(s)'} "
          f"(model {cfg.model.name}, torch hub dir {torch.hub.get_dir()})")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
