"""Model and loss registry: `model.name` / `loss.name` in the config pick the backend.

`compact` is built in; `mapanything` goes through the adapter, the only module that
imports MapAnything (an optional, user-installed dependency).
"""

from __future__ import annotations

from typing import Callable

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from mapanything_ext.console import warn
from mapanything_ext.losses.compact_loss import CompactLoss
from mapanything_ext.models.compact import CompactMapAnything

Criterion = Callable[[list, list], tuple]

_COMPACT_ARGS = ("patch_size", "dim", "depth", "num_heads", "mlp_ratio", "gradient_checkpointing", "dropout")


def build_model(model_cfg: DictConfig) -> nn.Module:
    name = model_cfg.get("name")
    if name == "compact":
        return CompactMapAnything(**{k: model_cfg[k] for k in _COMPACT_ARGS if k in model_cfg})
    if name == "mapanything":
        from mapanything_ext.models.mapanything_adapter import build_mapanything_model

        return build_mapanything_model(model_cfg)
    raise ValueError(f"unknown model.name {name!r}: choose model=compact or model=mapanything")


def build_model_on(model_cfg: DictConfig, device: torch.device) -> nn.Module:
    """The model built where it trains. On a GPU its parameters are created and randomly
    initialised there: seconds for MapAnything's 1.2 B parameters, where the CPU takes 20 to 30 s,
    which every (re)start of a job would pay before its weights are loaded over them anyway. A model
    whose construction cannot run on the GPU is built on the CPU instead, with a warning."""
    if device.type != "cuda":
        return build_model(model_cfg).to(device)
    try:
        with torch.device(device):
            return build_model(model_cfg).to(device)
    except (RuntimeError, TypeError) as err:  # e.g. a tensor of the model's __init__ sent through numpy
        warn("mapanything_ext", f"model.name={model_cfg.get('name')} could not be built on {device} "
              f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}); building it on the CPU "
              f"and moving it (slower start)")
        return build_model(model_cfg).to(device)


def build_criteria(loss_cfg: DictConfig) -> tuple[Criterion, Criterion]:
    """(train criterion, test criterion), each called as criterion(views, preds) -> (loss, details)."""
    name = loss_cfg.get("name")
    if name == "compact_loss":
        kwargs = OmegaConf.to_container(loss_cfg.get("params", {}), resolve=True)
        return CompactLoss(use_confidence=True, **kwargs), CompactLoss(use_confidence=False, **kwargs)
    if name == "overall_loss":
        from mapanything_ext.models.mapanything_adapter import (
            build_mapanything_criteria,
        )

        return build_mapanything_criteria(loss_cfg)
    raise ValueError(f"unknown loss.name {name!r}: choose loss=compact_loss or loss=overall_loss")
