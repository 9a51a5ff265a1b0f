"""What the job needs besides data: the model built on this node's device, model.pretrained loaded into
it (every entry matched as the job loads it), disk for three checkpoints, an output folder that can be
written and that no live job holds.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path

import torch

from mapanything_ext.cluster import run_lock

# A save needs room for the new file while checkpoint-last and checkpoint-previous exist.
CHECKPOINTS_ON_DISK = 3


def node_device() -> torch.device:
    return torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")


def check_model(cfg, lines: list[str], problems: list[str]) -> torch.nn.Module | None:
    """Build the model on this node's device (where an environment that cannot build it fails, a
    torchvision that does not match torch, say) and load model.pretrained into it."""
    from mapanything_ext.models.registry import build_model_on

    device = node_device()
    started = time.perf_counter()
    try:
        model = build_model_on(cfg.model, device)
    except Exception as err:  # noqa: BLE001 -- any failure to build is what the user must see
        problems.append(f"model {cfg.model.name} cannot be built on {device}: {type(err).__name__}: "
                        f"{str(err).splitlines()[0] if str(err) else ''}")
        return None
    params = sum(p.numel() for p in model.parameters())
    lines.append(f"model: {cfg.model.name} built on {device} ({params:,} parameters) in "
                 f"{time.perf_counter() - started:.1f}s")
    pretrained = cfg.model.get("pretrained")
    if pretrained and Path(pretrained).exists():
        from mapanything_ext.models.pretrained import load_pretrained

        try:
            load_pretrained(model, pretrained, trust_foreign=bool(cfg.get("trust_foreign_checkpoints")))
            lines.append(f"model.pretrained: {pretrained} verified and loaded")
        except Exception as err:  # noqa: BLE001 -- a torn, foreign or mismatched file: say which
            problems.append(f"model.pretrained={pretrained} does not load into {cfg.model.name}: {err}")
    return model


def checkpoint_bytes(model: torch.nn.Module) -> int:
    """A training checkpoint's size: fp32 weights plus AdamW's two moments for the trainable ones."""
    weights = sum(p.numel() * 4 for p in model.parameters())
    moments = sum(p.numel() * 8 for p in model.parameters() if p.requires_grad)
    return weights + moments


def check_output(cfg, model: torch.nn.Module | None, lines: list[str], problems: list[str]) -> None:
    folder = Path(cfg.output_dir)
    existing = next(p for p in (folder, *folder.parents) if p.exists())
    if not existing.is_dir():
        problems.append(f"output_dir={folder}: {existing} is a file, not a folder")
        return
    try:
        with tempfile.NamedTemporaryFile(dir=existing, prefix=".preflight-", delete=True):
            pass
    except OSError as err:
        problems.append(f"output_dir={folder} cannot be written ({existing}: {err.strerror or err})")
        return
    lock = folder / run_lock.LOCK_NAME
    if lock.exists():
        holder = run_lock.read_holder(lock)
        verdict = run_lock.judge(holder)
        if verdict == "alive":
            problems.append(f"output_dir={folder} is in use by a running job ({run_lock.describe(holder)}): a second "
                            f"job there would be refused; wait for it, or give this one another output_dir")
        else:
            lines.append(f"output: {lock} left by a job that is gone ({verdict}): the next job takes it over")
    free = shutil.disk_usage(existing).free
    if model is not None:
        needed = CHECKPOINTS_ON_DISK * checkpoint_bytes(model)
        verdict = "enough" if free >= needed else "NOT enough"
        lines.append(f"output: {folder} writable; {free / 1e9:.1f} GB free, {verdict} for {CHECKPOINTS_ON_DISK} "
                     f"checkpoints of {needed / CHECKPOINTS_ON_DISK / 1e9:.2f} GB")
        if free < needed:
            problems.append(f"output_dir={folder}: {free / 1e9:.1f} GB free on its file system, a run needs about "
                            f"{needed / 1e9:.1f} GB ({CHECKPOINTS_ON_DISK} checkpoints of "
                            f"{needed / CHECKPOINTS_ON_DISK / 1e9:.2f} GB: last, previous and the one being written)")
    elif os.access(existing, os.W_OK):
        lines.append(f"output: {folder} writable; {free / 1e9:.1f} GB free (checkpoint size unknown: no model)")
