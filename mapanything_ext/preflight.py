"""Preflight: will this job run offline, without downloading anything?

    python -m mapanything_ext.preflight machine=<profile> model=mapanything [model.pretrained=...] ...

Runs at the start of every training job too (and stops it with the same message). It also prints
warnings about what will run but not as expected (a warm-up as long as the run). It checks,
for `model=mapanything`: MapAnything and uniception import; the DINOv2 hub code is in the torch
hub cache; `encoder.torch_hub_pretrained` is off when a full checkpoint is given, and its weights
are cached when it is on; torch hub is not asked to reload; and, for every model, that
`model.pretrained` exists. Each problem says exactly what to copy where or what to set. The command
(not the job, which does it with the model's predictions) also runs `loss.impl`'s self-check on the
first training sample: the batched criterion against MapAnything's (models/loss_selfcheck.py).
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import torch
from omegaconf import DictConfig

from mapanything_ext.config import compose_training

DINOV2_HUB_REPO = "facebookresearch_dinov2_main"
DINOV2_ARCH = {"small": "vits14", "base": "vitb14", "large": "vitl14", "giant": "vitg14"}


class PreflightError(RuntimeError):
    """The job would fail or download something on an offline node."""


def problems_of(cfg: DictConfig, resuming: bool = False) -> list[str]:
    """Problems of a job with this config; a job resuming its own checkpoint needs no model.pretrained."""
    found = [] if resuming else _pretrained_problems(cfg.model)
    if cfg.model.get("name") == "mapanything":
        found += _mapanything_problems(cfg.model)
    return found


def check(cfg: DictConfig, resuming: bool = False) -> None:
    found = problems_of(cfg, resuming)
    if found:
        raise PreflightError("preflight found problems:\n" + "\n".join(f"  - {p}" for p in found))


def _pretrained_problems(model_cfg) -> list[str]:
    pretrained = model_cfg.get("pretrained")
    if not pretrained:
        return []
    path = Path(pretrained)
    if path.is_dir() and not (path / "model.safetensors").is_file():
        return [f"model.pretrained={path} is a folder without model.safetensors (a Hugging Face model folder "
                f"holds model.safetensors and config.json)"]
    if not path.exists():
        return [f"model.pretrained={path} does not exist (did the earlier stage finish? is the path visible "
                f"from this node?)"]
    return []


def _mapanything_problems(model_cfg) -> list[str]:
    found = []
    for module in ("mapanything", "uniception"):
        if importlib.util.find_spec(module) is None:
            found.append(f"python package {module!r} is not importable: install MapAnything from your clone "
                         f"(pip install -e <map-anything>), see docs/mapanything.md")
    encoder = model_cfg.encoder
    hub_dir = Path(torch.hub.get_dir())
    if model_cfg.get("torch_hub_force_reload"):
        found.append("model.torch_hub_force_reload=true would download the DINOv2 code: set it to false")
    if encoder.get("uses_torch_hub"):
        code = hub_dir / DINOV2_HUB_REPO
        if not (code / "hubconf.py").is_file():
            found.append(
                f"the DINOv2 hub code is not in the torch hub cache: copy the folder {DINOV2_HUB_REPO} (a checkout "
                f"of github.com/facebookresearch/dinov2, main branch, with hubconf.py) to {code} "
                f"(torch hub dir = $TORCH_HOME/hub, TORCH_HOME={_torch_home()})")
        if encoder.get("torch_hub_pretrained"):
            found += _hub_weight_problems(model_cfg, hub_dir)
    return found


def _hub_weight_problems(model_cfg, hub_dir: Path) -> list[str]:
    if model_cfg.get("pretrained"):
        return ["model.encoder.torch_hub_pretrained=true together with model.pretrained: the full checkpoint "
                "replaces the DINOv2 weights anyway, and fetching them needs the internet; set "
                "model.encoder.torch_hub_pretrained=false"]
    arch = DINOV2_ARCH.get(model_cfg.encoder.get("size"), "vitg14")
    registers = "_reg4" if model_cfg.encoder.get("with_registers") else ""
    weights = hub_dir / "checkpoints" / f"dinov2_{arch}{registers}_pretrain.pth"
    if not weights.is_file():
        return [f"model.encoder.torch_hub_pretrained=true needs the DINOv2 weights in the hub cache: copy "
                f"dinov2_{arch}{registers}_pretrain.pth (from dl.fbaipublicfiles.com/dinov2/) to {weights}, or set "
                f"model.encoder.torch_hub_pretrained=false and give model.pretrained"]
    return []


def _torch_home() -> str:
    return os.environ.get("TORCH_HOME", "~/.cache/torch (default)")


def warnings_of(cfg: DictConfig) -> list[str]:
    """What will run, but not as a user would expect (the job prints these at start too)."""
    from mapanything_ext.train import params

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
    from mapanything_ext.models.loss_selfcheck import LossMismatch, predictions_for_check
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
