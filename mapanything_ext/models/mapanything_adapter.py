"""The only module that imports MapAnything (an optional, user-installed dependency).

`model=mapanything` builds the model through MapAnything's public `init_model` from our
`configs/model/mapanything.yaml`; `loss=overall_loss` builds its criterion from its loss
strings, parsed against a whitelist of its own losses namespace (losses/loss_strings.py:
no `eval`). Our views already carry every key its model and loss read (docs/mapanything.md),
so no wrapper sits in between.
"""

from __future__ import annotations

import importlib
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from mapanything_ext.console import say
from mapanything_ext.losses.loss_strings import build_loss

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
    say("mapanything", f"building {model_cfg.model_str} (encoder {model_cfg.encoder.name}, "
          f"info sharing depth {model_cfg.info_sharing.module_args.depth}, gradient checkpointing "
          f"encoder={model_cfg.encoder.gradient_checkpointing} "
          f"info_sharing={model_cfg.info_sharing.module_args.gradient_checkpointing} "
          f"pred_head={model_cfg.pred_head.gradient_checkpointing})")
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
    impl = str(loss_cfg.get("impl") or "auto")
    if loss_cfg.get("compile") and impl == "reference":
        # Only here: with auto/batched the reference runs once, in float64, for the self-check.
        compile_loss_parts(criteria)
    # Only the train criterion is compiled: evaluation runs without gradients (another graph to
    # compile) and rarely, so compiling the test criterion would cost more time than it saves.
    compile_train = bool(loss_cfg.get("compile"))
    return tuple(_chosen(role, impl, criterion, compile_train and role == "train")
                 for role, criterion in zip(("train", "test"), criteria))


def _chosen(role: str, impl: str, reference, compile_batched: bool):
    """The reference criterion and, where it can compute the same, the batched one (loss.impl picks)."""
    from mapanything_ext.losses.batched_loss import BatchedCriterion
    from mapanything_ext.losses.loss_selfcheck import ChosenCriterion

    if impl == "reference":
        return ChosenCriterion(role, impl, reference, None, "not asked for")
    try:
        batched = BatchedCriterion(batched_spec_of(reference), compile=compile_batched)
    except BatchedUnsupported as err:
        return ChosenCriterion(role, impl, reference, None, f"not implemented for {err}")
    return ChosenCriterion(role, impl, reference, batched)


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


# ---- the view-batched criterion (losses/batched_loss.py): what it implements, read off MapAnything's ----


class BatchedUnsupported(ValueError):
    """The criterion uses a class or option the batched criterion does not implement."""


_AGGREGATORS = ("ConfAndExcludeTopNPercentPixelLoss", "ExcludeTopNPercentPixelLoss")
_FACTORED = ("FactoredGeometryScaleRegr3DPlusNormalGMLoss", "FactoredGeometryScaleRegr3D")
# Options of the factored loss the batched criterion implements only at these values.
_FIXED = {"norm_mode": "avg_dis", "ambiguous_loss_value": 0, "flatten_across_image_only": True,
          "compute_absolute_pose_loss": True, "compute_pairwise_relative_pose_loss": False,
          "convert_predictions_to_view0_frame": False}


def batched_spec_of(criterion):
    """The LossSpec of the batched criterion that computes what `criterion` (built from MapAnything's
    loss strings) computes; BatchedUnsupported names the part it does not implement."""
    from mapanything_ext.losses.batched_loss import LossSpec

    aggregator, mask = criterion, criterion._loss2
    if type(aggregator).__name__ not in _AGGREGATORS:
        raise BatchedUnsupported(f"{type(aggregator).__name__} as the first term (implemented: {', '.join(_AGGREGATORS)})")
    conf = type(aggregator).__name__ == _AGGREGATORS[0]
    spec = dict(
        factored=_factored_spec(aggregator.pixel_loss), weight=float(aggregator._alpha),
        conf_sets=tuple(aggregator.conf_loss_set_indices) if conf else (),
        exclude_sets=tuple(aggregator.exclude_loss_set_indices if conf else aggregator.loss_set_indices),
        conf_alpha=float(aggregator.conf_alpha) if conf else 0.0, top_n_percent=aggregator.top_n_percent,
        exclude_real_only=bool(aggregator.apply_to_real_data_only), mask_weight=_mask_weight(mask))
    result = LossSpec(**spec)
    try:
        result.check()
    except ValueError as err:
        raise BatchedUnsupported(str(err)) from None
    return result


def _mask_weight(mask) -> float | None:
    if mask is None:
        return None
    if type(mask).__name__ != "NonAmbiguousMaskLoss" or type(mask.criterion).__name__ != "BCELoss":
        raise BatchedUnsupported(f"{mask!r} as the second term (implemented: NonAmbiguousMaskLoss(BCELoss()))")
    if mask._loss2 is not None:
        raise BatchedUnsupported(f"more than two terms ({mask._loss2!r})")
    return float(mask._alpha)


def _factored_spec(pixel):
    from mapanything_ext.losses.batched_loss import FactoredSpec

    name = type(pixel).__name__
    if name not in _FACTORED or pixel._loss2 is not None or pixel._alpha != 1:
        raise BatchedUnsupported(f"pixel loss {pixel!r} (implemented: {' or '.join(_FACTORED)}, unweighted)")
    robust = pixel.criterion
    if type(robust).__name__ != "RobustRegressionLoss":
        raise BatchedUnsupported(f"regression {robust!r} (implemented: RobustRegressionLoss)")
    for option, value in _FIXED.items():
        if getattr(pixel, option) != value:
            raise BatchedUnsupported(f"{name}({option}={getattr(pixel, option)!r}) (implemented: {value!r})")
    plus = name == _FACTORED[0]
    weights = {"pts3d": pixel.world_frame_points_loss_weight, "cam_pts3d": pixel.cam_frame_points_loss_weight,
               "depth": pixel.depth_loss_weight, "ray_directions": pixel.ray_directions_loss_weight,
               "pose_quats": pixel.pose_quats_loss_weight, "pose_trans": pixel.pose_trans_loss_weight,
               "scale": pixel.scale_loss_weight, "normal": pixel.normal_loss_weight if plus else 0.0,
               "gradient_matching": pixel.gm_loss_weight if plus else 0.0}
    return FactoredSpec(
        name=name, robust_alpha=float(robust.alpha), robust_c=float(robust.scaling_c),
        loss_in_log=bool(pixel.loss_in_log), depth_type=pixel.depth_type_for_loss,
        norm_predictions=bool(pixel.norm_predictions), world_points=bool(pixel.compute_world_frame_points_loss),
        normal_and_gm=plus,
        normal_and_gm_synthetic_only=bool(getattr(pixel, "apply_normal_and_gm_loss_to_synthetic_data_only", False)),
        weights={key: float(value) for key, value in weights.items()})
