"""`model.pretrained`: initialise a model from an earlier stage or from published weights.

Accepted:
  our checkpoints (checkpoint-best.pth of an earlier stage)  weights_only load, verified first
  MapAnything-style .pth ({"model": state_dict, "args": ...})  full unpickling: needs
                                                              trust_foreign_checkpoints=true
  a Hugging Face model folder or a model.safetensors file     needs the `safetensors` package
Missing and unexpected keys are reported with counts and names; a load that matches
less than MIN_MATCHED_FRACTION of the model's entries is an error, never a silent no-op.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from mapanything_ext.checkpoint import load_checkpoint, verify_checkpoint

MIN_MATCHED_FRACTION = 0.5


class PretrainedLoadError(RuntimeError):
    """model.pretrained points at something missing, unreadable or not matching the model."""


def read_state_dict(path, trust_foreign: bool = False) -> dict:
    path = Path(path)
    if path.is_dir():
        path = path / "model.safetensors"
    if not path.exists():
        raise PretrainedLoadError(f"model.pretrained={path} does not exist (did the earlier stage finish?)")
    if path.suffix == ".safetensors":
        try:
            from safetensors.torch import load_file
        except ImportError:
            raise PretrainedLoadError(f"{path}: reading .safetensors needs `pip install safetensors`") from None
        return load_file(str(path))
    if verify_checkpoint(path).valid:  # one of ours: proven good before use
        return load_checkpoint(path)["model"]
    ckpt = load_checkpoint(path, trust_foreign=trust_foreign)
    return ckpt.get("model", ckpt) if isinstance(ckpt, dict) else ckpt


def load_pretrained(model: nn.Module, path, trust_foreign: bool = False) -> dict:
    """Load matching weights into model (strict=False); returns the key report."""
    state = read_state_dict(path, trust_foreign)
    own = model.state_dict()
    usable = {k: v for k, v in state.items() if k in own and tuple(v.shape) == tuple(own[k].shape)}
    report = {
        "loaded": len(usable),
        "missing": sorted(set(own) - set(usable)),
        "unexpected": sorted(set(state) - set(own)),
        "shape_mismatch": sorted(k for k in state if k in own and tuple(state[k].shape) != tuple(own[k].shape)),
    }
    if len(usable) < MIN_MATCHED_FRACTION * len(own):
        raise PretrainedLoadError(
            f"{path} matches only {len(usable)} of the model's {len(own)} entries (unexpected: "
            f"{_names(report['unexpected'])}; shape mismatch: {_names(report['shape_mismatch'])}): "
            f"wrong file or wrong model config?"
        )
    with torch.no_grad():
        model.load_state_dict(usable, strict=False)
    print(f"[pretrained] {path}: loaded {report['loaded']}/{len(own)} entries; missing {len(report['missing'])} "
          f"{_names(report['missing'])}; unexpected {len(report['unexpected'])} {_names(report['unexpected'])}; "
          f"shape mismatch {len(report['shape_mismatch'])} {_names(report['shape_mismatch'])}", flush=True)
    return report


def _names(keys: list[str], limit: int = 8) -> str:
    shown = ", ".join(keys[:limit])
    return f"[{shown}{', ...' if len(keys) > limit else ''}]"
