"""Loading checkpoints: ours never unpickle code; foreign ones only when the user trusts them."""

from __future__ import annotations

import pickle
from pathlib import Path

import torch

from mapanything_ext.console import say


class ForeignCheckpointError(RuntimeError):
    """A file that needs full unpickling was given without the trust switch."""


class DamagedCheckpointError(RuntimeError):
    """A checkpoint that fails verification for a fault of its content: never used."""


def load_verified(path, trust_foreign: bool = False) -> dict:
    """A checkpoint to take weights from (model.pretrained, evaluate): one of ours only once verified
    (tensors memory-mapped), a foreign one (MapAnything's) as load_checkpoint loads it; a damaged file
    or one the machine cannot read is refused, naming the fault."""
    from mapanything_ext.checkpoint.verify import CheckpointReadError, verify_checkpoint

    result = verify_checkpoint(path)
    if result.valid:
        return load_checkpoint(path, mmap=True)
    if result.read_error:
        raise CheckpointReadError(f"{path}: {result.reason}")
    if not result.foreign:
        raise DamagedCheckpointError(f"{path} fails verification and is not used: {result.reason} "
                                     f"(check_ckpt {path} says the same; use another checkpoint of that run)")
    return load_checkpoint(path, trust_foreign=trust_foreign)


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
