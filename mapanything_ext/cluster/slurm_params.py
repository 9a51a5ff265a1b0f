"""The one path from a machine profile to submitit's parameters.

`configs/hydra/launcher/submitit_slurm.yaml` is the single place that maps the profile's `slurm`
block (partition, nodes, GPUs, time limit, requeue budget, ...) onto launcher parameters. The Hydra
launcher (`-m hydra/launcher=submitit_slurm`) reads it as Hydra does; the stage pipeline composes the
same config for each stage (`launcher_config`) and turns it into submitit's arguments with the
plugin's own naming rule (`executor_arguments`). Both add our srun options:

Every job step runs under `srun --kill-on-bad-exit=1`: when one task dies (an exception, a
failed save, SIGKILL, the out-of-memory killer), Slurm ends the others at once instead of
leaving them waiting in a collective for up to the distributed timeout.
"""

from __future__ import annotations

import warnings

from omegaconf import OmegaConf

KILL_ON_BAD_EXIT = "--kill-on-bad-exit=1"
# The launcher parameters submitit takes under their own names (hydra-submitit-launcher's
# BaseQueueConf); every other one is a Slurm parameter, passed as `slurm_<name>`.
_BASE = {"timeout_min", "cpus_per_task", "gpus_per_node", "tasks_per_node", "mem_gb", "nodes", "name",
         "stderr_to_stdout"}
_NOT_PARAMETERS = {"_target_", "submitit_folder", "max_num_timeout", "array_parallelism", "setup"}


def srun_args(slurm) -> list[str]:
    """srun options of every job: ours first, then the profile's `slurm.srun_args`."""
    extra = [str(a) for a in (slurm.get("srun_args") or [])] if slurm else []
    return [KILL_ON_BAD_EXIT, *[a for a in extra if a != KILL_ON_BAD_EXIT]]


def launcher_config(overrides: list[str]) -> dict:
    """The submitit_slurm launcher config of the training config these overrides compose."""
    from hydra import compose, initialize_config_dir

    from mapanything_ext.config import CONFIG_DIR, register_resolvers

    register_resolvers()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="(?s).*is validated against ConfigStore schema")
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3", job_name="pipeline"):
            cfg = compose("train", overrides=[*overrides, "hydra/launcher=submitit_slurm"], return_hydra_config=True)
    launcher = OmegaConf.to_container(cfg.hydra.launcher, resolve=True)
    launcher["srun_args"] = srun_args(cfg.machine.get("slurm"))
    return launcher


def executor_arguments(launcher: dict, name: str, extra_sbatch: dict | None = None) -> tuple[dict, dict]:
    """(AutoExecutor(...) keyword arguments, update_parameters(...) keyword arguments)."""
    init = {"slurm_max_num_timeout": int(launcher["max_num_timeout"])}
    update = {key if key in _BASE else f"slurm_{key}": value for key, value in launcher.items()
              if key not in _NOT_PARAMETERS}
    update["name"] = name
    update["slurm_additional_parameters"] = {**(launcher.get("additional_parameters") or {}), **(extra_sbatch or {})}
    return init, update
