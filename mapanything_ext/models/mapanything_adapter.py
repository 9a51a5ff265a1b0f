"""The only module that imports MapAnything (an optional, user-installed dependency).

`model=mapanything` builds the model through MapAnything's public `init_model` from our
`configs/model/mapanything.yaml`; `loss=overall_loss` builds its criterion by evaluating
its loss strings in its own losses namespace and nowhere else. Our views already carry
every key its model and loss read (docs/mapanything.md), so no wrapper sits in between.
"""

from __future__ import annotations

import importlib

import torch
from omegaconf import DictConfig

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


def build_mapanything_criteria(loss_cfg: DictConfig):
    """(train, test) criteria from MapAnything's loss strings, evaluated in its losses module only."""
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
# Tried and left out: `apply_log_to_norm`, `geotrf`, `transform_pose_using_quats_and_trans_2_to_1`
# and `normalize_multiple_pointclouds` (bench/bench_mapanything_loss.py's compiled_more): they halve
# the operations dispatched and compile in seconds on a CPU, but on an H100 compilation had not
# finished after minutes, so they are unmeasured there (docs/mapanything.md, Speed).
LOSS_FUNCTIONS = ("compute_normal_loss", "compute_gradient_matching_loss")
LOSS_MODULES = ("RobustRegressionLoss",)


def compile_loss_parts(criteria, functions=LOSS_FUNCTIONS) -> None:
    """torch.compile `functions` in MapAnything's losses namespace (process-wide, once) and the
    LOSS_MODULES inside `criteria` (in place)."""
    losses = import_mapanything("mapanything.train.losses")
    for name in functions:
        function = getattr(losses, name)
        if not hasattr(function, "_torchdynamo_orig_callable"):
            setattr(losses, name, torch.compile(function))
    module_types = tuple(getattr(losses, name) for name in LOSS_MODULES)
    for criterion in criteria:
        for module in criterion.modules():
            if isinstance(module, module_types):
                module.compile()


def _criterion(expression: str, namespace: dict):
    try:
        # MapAnything's own loss strings, with nothing but its losses namespace and no builtins.
        return eval(expression, {"__builtins__": {}}, namespace)  # noqa: S307
    except Exception as err:
        raise ValueError(f"cannot build the MapAnything criterion {expression!r}: {err}") from err
