"""A run folder per job of a Hydra sweep.

`python -m mapanything_ext.train.training -m ... output_dir=<dir> train_params.lr=1e-3,2e-3` runs
two jobs. Each gets its own run folder under <dir>, named by its job number and the values that
the sweep varies (`job0_lr_0.001`, `job1_lr_0.002`); its checkpoints, log.txt, console.log,
TensorBoard and Hydra files live there, and `.hydra/overrides.yaml` records every override. A
multirun of one job (`-m` without a sweep) keeps <dir> itself, like a single run. A sweep over
output_dir itself keeps the folders it names. Our launchers (hydra_plugins/mapanything_ext_launcher)
apply this before the jobs start.
"""

from __future__ import annotations

import re
from pathlib import Path

MAX_NAME = 100


def _pairs(overrides) -> dict[str, str]:
    return dict(o.split("=", 1) for o in overrides if "=" in o)


def folder_name(job_num: int, swept: dict[str, str]) -> str:
    """job<N> plus the swept values, safe as one path component."""
    parts = [f"job{job_num}"] + [f"{key.lstrip('+~').split('.')[-1]}_{value}" for key, value in swept.items()]
    name = re.sub(r"[^A-Za-z0-9_.+-]+", "-", "_".join(parts))
    return name[:MAX_NAME]


def _swept_keys(typed: list[str]) -> set[str]:
    """Keys whose typed value is a sweep (a comma list, range(...), choice(...)): the values that name a
    job's folder. (A job's other overrides may read differently from the typed ones, `false` as `False`.)"""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    return {o.get_key_element().lstrip("+~") for o in OverridesParser.create().parse_overrides(typed)
            if o.is_sweep_override()}


def run_folder_overrides(config, job_overrides: list, initial_job_idx: int) -> list[list[str]]:
    """Each job's overrides plus its own output_dir (unchanged for a multirun of one job)."""
    job_overrides = [list(o) for o in job_overrides]
    if len(job_overrides) <= 1 and initial_job_idx == 0:
        return job_overrides
    typed = list(config.hydra.overrides.task)  # as typed, with the sweep's comma lists
    given = _pairs(typed)
    varied = _swept_keys(typed)
    base = Path(str(config.output_dir))
    out = []
    for index, overrides in enumerate(job_overrides):
        pairs = _pairs(overrides)
        if pairs.get("output_dir", given.get("output_dir")) != given.get("output_dir"):
            out.append(overrides)  # the sweep names the folders itself
            continue
        swept = {key: value for key, value in pairs.items() if key.lstrip("+~") in varied}
        name = folder_name(initial_job_idx + index, swept)
        out.append([*overrides, f"output_dir='{base / name}'", "hydra.sweep.subdir=."])
    return out
