"""`model.pretrained`: initialise a model from an earlier stage or from published weights.

Accepted:
  our checkpoints (checkpoint-best.pth of an earlier stage)  weights_only load, verified first (a damaged one
                                                              is refused, naming its fault)
  MapAnything-style .pth ({"model": state_dict, "args": ...})  full unpickling: needs
                                                              trust_foreign_checkpoints=true
  a Hugging Face model folder or a model.safetensors file     needs the `safetensors` package
Missing and unexpected keys are reported with counts and names; a load that matches
less than MIN_MATCHED_FRACTION of the model's tensors is an error, never a silent no-op.

Aliases: a model may hold one tensor under several names (MapAnything's `dense_head.0.*` is
its `dpt_feature_head.*`), and a safetensors file stores each tensor once, under one of them.
The report counts tensors, not names: a name whose tensor was loaded through another name is
an alias (counted and said so), never "missing".
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from mapanything_ext.checkpoint.load import load_verified
from mapanything_ext.console import say

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
    ckpt = load_verified(path, trust_foreign)  # ours: proven good first, its optimizer state left on disk
    return ckpt.get("model", ckpt) if isinstance(ckpt, dict) else ckpt


def alias_groups(state: dict) -> list[list[str]]:
    """Names of a state dict grouped by the tensor they hold (same storage, offset, shape, strides)."""
    groups: dict[tuple, list[str]] = {}
    for name, tensor in state.items():
        local = tensor.to_local() if hasattr(tensor, "to_local") else tensor  # a sharded model's DTensor
        key = (local.untyped_storage().data_ptr(), local.storage_offset(), tuple(tensor.shape), local.stride(),
               local.device) if local.numel() else ("empty", name)
        groups.setdefault(key, []).append(name)
    return list(groups.values())


def load_pretrained(model: nn.Module, path, trust_foreign: bool = False, load=None) -> dict:
    """Load matching weights into model (strict=False); returns the report, counted in tensors.
    load(state): how the matching tensors go in (a sharded model's loader; default load_state_dict)."""
    state = read_state_dict(path, trust_foreign)
    own = model.state_dict()
    usable = {k: v for k, v in state.items() if k in own and tuple(v.shape) == tuple(own[k].shape)}
    groups = alias_groups(own)
    loaded = [g for g in groups if any(name in usable for name in g)]
    report = {
        "tensors": len(groups),
        "loaded": len(loaded),
        "aliases": sum(len(g) for g in loaded) - len(loaded),
        "missing": sorted(g[0] for g in groups if not any(name in usable for name in g)),
        "unexpected": sorted(set(state) - set(own)),
        "shape_mismatch": sorted(k for k in state if k in own and tuple(state[k].shape) != tuple(own[k].shape)),
    }
    if report["loaded"] < MIN_MATCHED_FRACTION * len(groups):
        raise PretrainedLoadError(
            f"{path} matches only {report['loaded']} of the model's {len(groups)} tensors (unexpected: "
            f"{_names(report['unexpected'])}; shape mismatch: {_names(report['shape_mismatch'])}): "
            f"wrong file or wrong model config?"
        )
    with torch.no_grad():
        if load is None:
            model.load_state_dict(usable, strict=False)
        else:
            load(usable)
    everything = not (report["missing"] or report["unexpected"] or report["shape_mismatch"])
    say("pretrained", f"{path}: loaded {report['loaded']}/{len(groups)} tensors"
          f"{' (every entry matched)' if everything else ''}; {report['aliases']} more names are aliases of "
          f"loaded tensors; missing {len(report['missing'])} {_names(report['missing'])}; unexpected "
          f"{len(report['unexpected'])} {_names(report['unexpected'])}; shape mismatch "
          f"{len(report['shape_mismatch'])} {_names(report['shape_mismatch'])}")
    return report


def _names(keys: list[str], limit: int = 8) -> str:
    shown = ", ".join(keys[:limit])
    return f"[{shown}{', ...' if len(keys) > limit else ''}]"
