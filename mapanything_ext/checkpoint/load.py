"""Loading checkpoints: ours never unpickle code; foreign ones only when the user trusts them."""

from __future__ import annotations

import pickle
from pathlib import Path

import torch

from mapanything_ext.console import say


class ForeignCheckpointError(RuntimeError):
    """A file that needs full unpickling was given without the trust switch."""


def load_checkpoint(path, map_location="cpu", trust_foreign: bool = False, mmap: bool = False) -> dict:
    """mmap=True leaves tensors on disk until used (a 15 GB file: read only what is taken from it)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as err:
        if not trust_foreign:
            raise ForeignCheckpointError(
                f"{path} needs full unpickling (it stores Python objects, e.g. the official MapAnything file's "
                f"OmegaConf config), which can run arbitrary code. If you trust this file, set "
                f"trust_foreign_checkpoints=true. ({str(err).splitlines()[0]})"
            ) from err
    say("checkpoint", f"loading {path} with full unpickling (trust_foreign_checkpoints=true)")
    return torch.load(path, map_location=map_location, weights_only=False)
