"""The only module that imports MapAnything (an optional, user-installed dependency).

`model=mapanything` builds the model through MapAnything's public `init_model` from our
`configs/model/mapanything.yaml`; `loss=overall_loss` builds its criterion from its loss
strings, parsed against a whitelist of its own losses namespace (models/loss_strings.py:
no `eval`). Our views already carry every key its model and loss read (docs/mapanything.md),
so no wrapper sits in between.
"""

from __future__ import annotations

import importlib
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from mapanything_ext.models.loss_strings import build_loss

INSTALL_HINT = (
    "MapAnything is not installed in this environment. It is an optional dependency that you install "
    "yourself: `git clone https://github.com/facebookresearch/map-anything && pip install -e map-anything` "
    "(it brings uniception==0.1.7, timm, torchvision, ...; see docs/mapanything.md). "
    "model=compact loss=compact_loss runs without it."
)


class MapAnythingMissing(ImportError):
    """MapAnything (or a package it needs) cannot be imported."""


def import_mapanything(module: str = "mapanything"):
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise MapAnythingMissing(f"{INSTALL_HINT} (import of {module} failed: {err})") from err


def build_mapanything_model(model_cfg: DictConfig):
    models = import_mapanything("mapanything.models")
    print(f"[mapanything] building {model_cfg.model_str} (encoder {model_cfg.encoder.name}, "
          f"info sharing depth {model_cfg.info_sharing.module_args.depth}, gradient checkpointing "
          f"encoder={model_cfg.encoder.gradient_checkpointing} "
          f"info_sharing={model_cfg.info_sharing.module_args.gradient_checkpointing} "
          f"pred_head={model_cfg.pred_head.gradient_checkpointing})", flush=True)
    return models.init_model(model_cfg.model_str, model_cfg.model_config,
                             torch_hub_force_reload=bool(model_cfg.torch_hub_force_reload))


def hub_config(model_cfg: DictConfig) -> dict:
    """The JSON-clean config MapAnything's `from_pretrained` rebuilds the model from: exactly what its
    `__init__` receives from our config (its own save_pretrained would store the config after
    `__init__` added the MLP layer *class*, which JSON cannot hold)."""
    config = OmegaConf.to_container(model_cfg.model_config, resolve=True)
    config["torch_hub_force_reload"] = False
    return config


def save_hf_folder(model, model_cfg: DictConfig, folder) -> Path:
    """Write `model` as a Hugging Face model folder (config.json + model.safetensors) that
    MapAnything's own `MapAnything.from_pretrained(folder)` loads."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(folder), config=hub_config(model_cfg))
    return folder


def build_mapanything_criteria(loss_cfg: DictConfig):
    """(train, test) criteria from MapAnything's loss strings, built from its losses module only."""
    losses = import_mapanything("mapanything.train.losses")
    namespace = {name: getattr(losses, name) for name in dir(losses) if not name.startswith("_")}
    train_string = loss_cfg.train_criterion
    test_string = loss_cfg.get("test_criterion") or train_string
    criteria = _criterion(train_string, namespace), _criterion(test_string, namespace)
    if loss_cfg.get("compile"):
        compile_loss_parts(criteria)
    return criteria


# MapAnything's criterion issues about 2,700 small operations per 4-view step, one kernel launch
# each, so the GPU waits on the host while it runs. Half of them come from these pure-tensor parts
# of its losses module (normal loss, multi-scale gradient matching, robust regression), which hold
# no host synchronisation but at most a data-dependent branch. Compiling them fuses each into a few
# kernels (on an H100, the loss's kernels per 4-view step went from 2,366 to 1,558 and the
# backward's from 5,345 to 4,069); what they compute stays MapAnything's code, and the rest of the
# criterion (its per-view bookkeeping, which reads values back to the host) stays eager.
# Compiling more of it was measured and left out (docs/mapanything.md, Speed): each further helper
# (`geotrf`, `apply_log_to_norm`, ...) replaces a few eager operations with a compiled call whose
# host cost is as large, and some recompile for every input rank until the recompile limit.
LOSS_FUNCTIONS = ("compute_normal_loss", "compute_gradient_matching_loss")
LOSS_MODULES = ("RobustRegressionLoss",)


def compile_loss_parts(criteria, names=LOSS_FUNCTIONS + LOSS_MODULES) -> None:
    """torch.compile the named parts of MapAnything's losses namespace: functions process-wide
    (once), module classes as their instances inside `criteria` (in place)."""
    losses = import_mapanything("mapanything.train.losses")
    unknown = [name for name in names if not hasattr(losses, name)]
    if unknown:
        raise ValueError(f"not in MapAnything's losses namespace, cannot compile: {', '.join(unknown)}")
    parts = {name: getattr(losses, name) for name in names}
    for name, part in parts.items():
        if not isinstance(part, type) and not hasattr(part, "_torchdynamo_orig_callable"):
            setattr(losses, name, torch.compile(part))
    module_types = tuple(part for part in parts.values() if isinstance(part, type))
    for criterion in criteria:
        for module in criterion.modules():
            if module_types and isinstance(module, module_types):
                module.compile()


def _criterion(expression: str, namespace: dict):
    return build_loss(expression, namespace)
