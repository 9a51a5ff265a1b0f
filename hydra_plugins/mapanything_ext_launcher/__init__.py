"""Hydra submitit launchers whose jobs fail when training fails.

hydra-submitit-launcher runs the task inside Hydra's `run_job`, which catches the
exception and returns it: the Slurm job then ends COMPLETED (exit 0) even when training
raised, so an `afterok` dependency would start the next stage on a failed one. These
subclasses re-raise inside the job, so Slurm records FAILED; everything else (job
arrays, requeue through `checkpoint()`) is the plugin's own behaviour. The Slurm launcher
also runs every job step with the srun options of mapanything_ext.cluster.slurm_params (the plugin's
config schema has no field for them).

Every launcher here also gives each job of a sweep its own run folder
(mapanything_ext/cluster/sweeps.py), so jobs never share checkpoints, logs or locks; `basic_run_folders`
(the default of `-m`) is Hydra's in-process launcher with that one addition.

Hydra accepts launchers only from the `hydra_plugins` namespace package, hence this
location outside `mapanything_ext`.
"""

from __future__ import annotations

from hydra._internal.core_plugins.basic_launcher import BasicLauncher as _HydraBasicLauncher
from hydra.core.utils import JobReturn, JobStatus
from hydra_plugins.hydra_submitit_launcher import submitit_launcher as plugin

from mapanything_ext.cluster.sweeps import run_folder_overrides


class _RunFolders:
    def launch(self, job_overrides, initial_job_idx):
        return super().launch(run_folder_overrides(self.config, job_overrides, initial_job_idx), initial_job_idx)


class _FailingJobs:
    def __call__(self, *args, **kwargs) -> JobReturn:
        ret = super().__call__(*args, **kwargs)
        if ret.status == JobStatus.FAILED:
            ret.return_value  # noqa: B018 -- the property re-raises the task's exception
        return ret


class SlurmLauncher(_RunFolders, _FailingJobs, plugin.SlurmLauncher):
    def launch(self, job_overrides, initial_job_idx):
        from mapanything_ext.cluster.slurm_params import srun_args

        self.params["srun_args"] = srun_args(self.config.machine.get("slurm"))
        return super().launch(job_overrides, initial_job_idx)


class LocalLauncher(_RunFolders, _FailingJobs, plugin.LocalLauncher):
    pass


class BasicLauncher(_RunFolders, _HydraBasicLauncher):
    pass
