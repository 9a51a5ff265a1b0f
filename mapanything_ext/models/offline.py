"""Will a job with this config run on an offline node, without downloading anything?

Checked at the start of every training job (engine) and by `python -m mapanything_ext.preflight`:
for `model=mapanything`, that MapAnything and uniception import, that the DINOv2 hub code is in the
torch hub cache, that `encoder.torch_hub_pretrained` is off when a full checkpoint is given (and its
weights are cached when it is on), that torch hub is not asked to reload; for every model, that
`model.pretrained` exists. Each problem says exactly what to copy where or what to set.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import torch
from omegaconf import DictConfig

DINOV2_HUB_REPO = "facebookresearch_dinov2_main"
DINOV2_ARCH = {"small": "vits14", "base": "vitb14", "large": "vitl14", "giant": "vitg14"}


class PreflightError(RuntimeError):
    """The job would fail or download something on an offline node."""


def problems_of(cfg: DictConfig, resuming: bool = False) -> list[str]:
    """Problems of a job with this config; a job resuming its own checkpoint needs no model.pretrained."""
    found = [] if resuming else _pretrained_problems(cfg.model)
    if cfg.model.get("name") == "mapanything":
        found += _mapanything_problems(cfg.model)
    if cfg.get("logger", {}).get("name") == "wandb" and importlib.util.find_spec("wandb") is None:
        found.append('logger=wandb needs the wandb package: pip install "mapanything-ext[wandb]" (or pip install '
                     'wandb), or use logger=tensorboard')
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
