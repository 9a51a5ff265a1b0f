"""Preflight: the check to run before a 3-day job, on the node (or kind of node) that will run it.

    python -m mapanything_ext.preflight [--scan-all] [--frames N] machine=<profile> model=... [overrides]

It reads the configuration exactly as the training command would, then checks, listing every
problem at once (exit 1 if any, 0 when the job can start; --help: exit 0):

  offline      MapAnything's and the DINOv2 hub code's presence, no download asked (models/offline.py;
               every training job checks this too and stops with the same message)
  data         both roots and the split folders; frames read as the dataset reads them (image size
               against its intrinsic, depth present and plausible) and, where a frame has its LiDAR
               `.pcd`, decoded depth against the LiDAR (median ratio per camera printed): a sample of
               --frames frames per split, every frame with --scan-all (progress bar)
  model        built on this node's device (an environment that cannot build it fails here), and
               model.pretrained loaded into it as the job loads it
  memory       the GPU memory per rank the run will need, estimated for the strategy, world size and
               image budget, against this node's card (or machine.gpu_memory_gib): a warning when
               it would not fit (train/memory_estimate.py)
  loss         loss.impl's self-check on the first training sample
  output       output_dir writable, not held by a live job, disk for three checkpoints

and prints warnings about what will run, but not as a user would expect.
"""

from __future__ import annotations

from omegaconf import DictConfig

from mapanything_ext.preflight.loss_check import loss_check

__all__ = ["loss_check", "warnings_of"]


def warnings_of(cfg: DictConfig) -> list[str]:
    """What will run, but not as a user would expect (the job prints these at start too)."""
    from mapanything_ext import train_params as params

    return [w for w in (params.load(cfg.train_params).warmup_warning(),) if w]
