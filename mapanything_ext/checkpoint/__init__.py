"""Checkpoints that cannot be half-written, and resumes that start from a proven-good one.

  save_on_master(obj, path)      atomic write by global rank 0 (free space checked, temp file, fsync,
                                 rename, fsync dir)
  link_on_master(src, path)      the same file under a second name (hard link), atomically
  verify_checkpoint(path)        valid / invalid with a reason (docs/checkpoints.md lists them)
  prepare_resume(output_dir)     quarantine leftovers and bad files, pick the checkpoint to resume from
  choose_in_background(dir)      the same sweep and choice started early in a thread (rank 0), for
                                 prepare_resume(dir, <it>) to collect
  load_checkpoint(path, ...)     weights_only load; foreign pickles only with the trust switch
"""

from mapanything_ext.checkpoint.atomic import CheckpointWriteError, link_on_master, save_on_master
from mapanything_ext.checkpoint.format import FORMAT_VERSION, REQUIRED_KEYS
from mapanything_ext.checkpoint.load import ForeignCheckpointError, load_checkpoint
from mapanything_ext.checkpoint.quarantine import choose_in_background, prepare_resume, quarantine
from mapanything_ext.checkpoint.verify import CheckResult, verify_checkpoint

__all__ = [
    "FORMAT_VERSION", "REQUIRED_KEYS", "CheckResult", "CheckpointWriteError", "ForeignCheckpointError",
    "choose_in_background", "link_on_master", "load_checkpoint", "prepare_resume", "quarantine", "save_on_master",
    "verify_checkpoint",
]
