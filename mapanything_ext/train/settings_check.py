"""A resume goes on with what it was trained with: which settings a new job may change, and which not.

A checkpoint holds the whole configuration it was trained with (`args`). When a job resumes, every
setting is compared with it:

  changes what is trained (any setting not listed below: the model, the loss, the data, the
  optimisation and schedule, epochs, the seed, the image budget, the model.pretrained file, ...)
      the job stops before it trains, listing every changed key old -> new. train_params.resume=force
      goes on with the new values (each change logged); a new output_dir starts a new run.
  does not (INERT: where the run writes, the machine, workers, logging, saving and evaluation
  cadence, compiling, which criterion implementation computes the same loss)
      each change is logged, and the job goes on.

model.pretrained is compared by content, not by path: its fingerprint (the CRC-32s of a zip
archive's records, which torch.save writes; a SHA-256 of any other file) is kept in the
checkpoint, so an earlier stage retrained into the same path counts as a change, and a copy
moved elsewhere does not. A pretrained file that is gone is not compared (said so).
"""

from __future__ import annotations

import hashlib
import zipfile
from pathlib import Path

from omegaconf import OmegaConf

INERT = ("output_dir", "machine.", "distributed.", "logger.", "trust_foreign_checkpoints", "hydra",
         "train_params.print_freq", "train_params.eval_freq", "train_params.eval_before_training",
         "train_params.save_freq", "train_params.keep_freq",
         "train_params.save_every_minutes", "train_params.save_every_steps",
         "train_params.restart_when_pretrained_changes", "train_params.max_eval_steps", "train_params.resume",
         "train_params.compile", "train_params.compile_mode", "train_params.compile_cache",
         "train_params.geometry_on_device", "train_params.warn_not_in_submodule", "loss.impl", "loss.compile",
         "model.pretrained")  # (model.pretrained: by content, below)


class SettingsChanged(RuntimeError):
    """The run folder's checkpoint was trained with other settings than this job's."""


def fingerprint(path) -> str | None:
    """Content fingerprint of a weights file (or a Hugging Face folder's model.safetensors); None if absent."""
    path = Path(path)
    if path.is_dir():
        path = path / "model.safetensors"
    if not path.is_file():
        return None
    digest = hashlib.sha256()
    if zipfile.is_zipfile(path):  # the CRC-32s torch.save records: read from the directory, not the data
        with zipfile.ZipFile(path) as archive:
            for info in archive.infolist():
                digest.update(f"{info.filename}:{info.CRC}:{info.file_size};".encode())
        return "zip-crc:" + digest.hexdigest()[:32]
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 24):
            digest.update(chunk)
    return "sha256:" + digest.hexdigest()[:32]


def compare(saved_args: dict, cfg, saved_fingerprint: str | None, force: bool) -> list[str]:
    """Notes for the console (inert changes, forced ones); SettingsChanged when a change that alters
    what is trained is not forced."""
    now = _flat(OmegaConf.to_container(cfg, resolve=True))
    before = _flat(saved_args or {})
    changed = {key: (before.get(key, "<unset>"), now.get(key, "<unset>")) for key in sorted(set(before) | set(now))
               if before.get(key, "<unset>") != now.get(key, "<unset>")}
    inert = {k: v for k, v in changed.items() if k.startswith(INERT)}
    material = {k: v for k, v in changed.items() if k not in inert}
    notes = [f"setting changed since the checkpoint, without effect on what is trained: {k}: {a!r} -> {b!r}"
             for k, (a, b) in inert.items() if k != "model.pretrained"]
    pretrained = now.get("model.pretrained")
    if pretrained and saved_fingerprint:
        current = fingerprint(pretrained)
        if current is None:
            notes.append(f"model.pretrained={pretrained} is gone: not compared with the file the run started from")
        elif current != saved_fingerprint:
            material["model.pretrained (its content)"] = (saved_fingerprint, f"{current} ({pretrained})")
    if material and not force:
        lines = "\n".join(f"  {k}: {a!r} -> {b!r}" for k, (a, b) in material.items())
        raise SettingsChanged(
            f"this run folder's checkpoint was trained with other settings than this job's; resuming would go on "
            f"with a mix:\n{lines}\nUse the original settings to continue the run, a new output_dir to start a new "
            f"one, or train_params.resume=force to continue it with the new values.")
    notes += [f"train_params.resume=force: continuing with {k}: {a!r} -> {b!r}" for k, (a, b) in material.items()]
    return notes


def _flat(tree, prefix: str = "") -> dict:
    if isinstance(tree, dict):
        out = {}
        for key, value in tree.items():
            out.update(_flat(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: tree}
