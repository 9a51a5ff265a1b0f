"""Hydra entry point: python -m mapanything_ext.train.training [overrides...]

In-process by default; `-m hydra/launcher=submitit_slurm machine=<profile>` sends the
same job to Slurm (one job per run, every launcher parameter from the profile).
"""

from __future__ import annotations

import warnings

import hydra
from omegaconf import DictConfig

from mapanything_ext.config import CONFIG_DIR, register_resolvers

register_resolvers()
# Our configs/hydra/launcher/submitit_*.yaml take their values from the machine profile and are
# checked against the plugin's schema of the same name; that check is what we want, not a warning.
warnings.filterwarnings("ignore", message="(?s).*is validated against ConfigStore schema with the same name")


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="train")
def main(cfg: DictConfig) -> None:
    from mapanything_ext.train.engine import train

    train(cfg)


if __name__ == "__main__":
    main()
