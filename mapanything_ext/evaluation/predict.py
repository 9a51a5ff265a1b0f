"""Load a checkpoint as a model and run it on one sample."""

from __future__ import annotations

from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import default_collate

from mapanything_ext.checkpoint.load import load_verified
from mapanything_ext.models.pretrained import load_pretrained
from mapanything_ext.models.registry import build_model


def load_model(path, model_cfg: DictConfig, device: torch.device, trust_foreign: bool = False) -> torch.nn.Module:
    """Our checkpoints rebuild the architecture they were trained with (their `args.model`);
    anything else (official MapAnything weights) is loaded into `model_cfg`'s architecture."""
    path = Path(path)
    ckpt = load_verified(path, trust_foreign)
    own_args = ckpt.get("args", {}).get("model") if isinstance(ckpt.get("args"), dict) else None
    if own_args is not None and "model" in ckpt:
        cfg = OmegaConf.create({**own_args, "pretrained": None})
        model = build_model(cfg)
        model.load_state_dict(ckpt["model"])
        print(f"[evaluate] {path}: {cfg.name} model of epoch {ckpt.get('epoch')}", flush=True)
    else:
        model = build_model(model_cfg)
        load_pretrained(model, path, trust_foreign=trust_foreign)
    return model.to(device).eval()


def batch_of_one(views: list[dict], device: torch.device) -> list[dict]:
    batch = default_collate([views])
    return [{k: v.to(device) if torch.is_tensor(v) else v for k, v in view.items()} for view in batch]


@torch.no_grad()
def predict(model: torch.nn.Module, views: list[dict]) -> list[dict]:
    """Predictions for views already batched by batch_of_one, moved to the CPU in float32."""
    preds = model(views)
    return [{k: v.detach().float().cpu() for k, v in p.items() if torch.is_tensor(v)} for p in preds]


def to_cpu(views: list[dict]) -> list[dict]:
    return [{k: v.cpu() if torch.is_tensor(v) else v for k, v in view.items()} for view in views]
