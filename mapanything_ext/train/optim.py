"""AdamW with weight decay only where it belongs (not on biases, norms, embeddings of size 1-D)."""

from __future__ import annotations

import torch
from torch import nn


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        # 1-D tensors are biases and norm scales; tokens are learned positions/queries.
        if param.ndim <= 1 or name.endswith(".bias") or "token" in name:
            no_decay.append(param)
        else:
            decay.append(param)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def build_optimizer(model: nn.Module, train_params) -> torch.optim.Optimizer:
    groups = param_groups(model, float(train_params.weight_decay))
    fused = all(p.is_cuda for g in groups for p in g["params"]) and torch.cuda.is_available()
    return torch.optim.AdamW(groups, lr=float(train_params.lr), betas=tuple(train_params.betas), fused=fused or None)
