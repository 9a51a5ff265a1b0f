"""Hydra submitit launchers whose jobs fail when training fails.

hydra-submitit-launcher runs the task inside Hydra's `run_job`, which catches the
exception and returns it: the Slurm job then ends COMPLETED (exit 0) even when training
raised, so an `afterok` dependency would start the next stage on a failed one. These
subclasses re-raise inside the job, so Slurm records FAILED; everything else (job
arrays, requeue through `checkpoint()`) is the plugin's own behaviour. The Slurm launcher
also runs every job step with the srun options of mapanything_ext.slurm_params (the plugin's
config schema has no field for them).

Hydra accepts launchers only from the `hydra_plugins` namespace package, hence this
location outside `mapanything_ext`.
"""

from __future__ import annotations

from hydra.core.utils import JobReturn, JobStatus
from hydra_plugins.hydra_submitit_launcher import submitit_launcher as plugin


class _FailingJobs:
    def __call__(self, *args, **kwargs) -> JobReturn:
        ret = super().__call__(*args, **kwargs)
        if ret.status == JobStatus.FAILED:
            ret.return_value  # noqa: B018 -- the property re-raises the task's exception
        return ret


class SlurmLauncher(_FailingJobs, plugin.SlurmLauncher):
    def launch(self, job_overrides, initial_job_idx):
        from mapanything_ext.slurm_params import srun_args

        self.params["srun_args"] = srun_args(self.config.machine.get("slurm"))
        return super().launch(job_overrides, initial_job_idx)


class LocalLauncher(_FailingJobs, plugin.LocalLauncher):
    pass
