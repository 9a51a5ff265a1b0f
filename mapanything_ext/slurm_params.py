"""The one place that turns a machine profile's `slurm` block into submitit's parameters.

Used by the Hydra launchers (hydra_plugins/mapanything_ext_launcher) and by the stage pipeline.
Every job step runs under `srun --kill-on-bad-exit=1`: when one task dies (an exception, a
failed save, SIGKILL, the out-of-memory killer), Slurm ends the others at once instead of
leaving them waiting in a collective for up to the distributed timeout.
"""

from __future__ import annotations

KILL_ON_BAD_EXIT = "--kill-on-bad-exit=1"


def srun_args(slurm) -> list[str]:
    """srun options of every job: ours first, then the profile's `slurm.srun_args`."""
    extra = [str(a) for a in (slurm.get("srun_args") or [])] if slurm else []
    return [KILL_ON_BAD_EXIT, *[a for a in extra if a != KILL_ON_BAD_EXIT]]


def executor_parameters(slurm, name: str, extra_sbatch: dict | None = None) -> dict:
    """AutoExecutor.update_parameters(...) for one job shaped by the profile."""
    sbatch = dict(slurm.get("additional_parameters") or {})
    sbatch.update(extra_sbatch or {})
    return dict(
        name=name, timeout_min=int(slurm.timeout_min), nodes=int(slurm.nodes),
        tasks_per_node=int(slurm.tasks_per_node), gpus_per_node=int(slurm.gpus_per_node or 0),
        cpus_per_task=int(slurm.cpus_per_task), mem_gb=slurm.mem_gb, stderr_to_stdout=True,
        slurm_partition=slurm.partition, slurm_account=slurm.account, slurm_qos=slurm.qos,
        slurm_signal_delay_s=int(slurm.signal_delay_s), slurm_additional_parameters=sbatch,
        slurm_srun_args=srun_args(slurm),
    )
