"""Hydra/OmegaConf glue: the `${repo_root:}` resolver, the typed schemas and config-to-plain conversion.

The config tree lives in `<checkout>/configs`; profiles point data and experiment
folders inside the checkout by default, which the `repo_root` resolver makes
independent of the current working directory.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

REPO_ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR = REPO_ROOT / "configs"


def register_resolvers() -> None:
    """Register our resolvers and typed schemas once (idempotent: Hydra may import us twice)."""
    from mapanything_ext import train_params as params

    if not OmegaConf.has_resolver("repo_root"):
        OmegaConf.register_new_resolver("repo_root", lambda: str(REPO_ROOT))
    params.register()


def compose_training(overrides: list[str]) -> DictConfig:
    """The training config as `python -m mapanything_ext.train.training <overrides>` composes it."""
    from hydra import compose, initialize_config_dir

    register_resolvers()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3", job_name="compose"):
        return compose("train", overrides=list(overrides))


def to_plain(cfg: DictConfig | Any) -> Any:
    """Resolved config as plain dict/list/scalars, safe for torch.load(weights_only=True)."""
    if isinstance(cfg, DictConfig) or OmegaConf.is_config(cfg):
        return OmegaConf.to_container(cfg, resolve=True)
    return cfg


register_resolvers()
