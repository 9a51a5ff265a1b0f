"""Submit Stage 1 -> 2 -> 3 (or a chosen subset) with one command.

    python -m mapanything_ext.pipeline machine=<profile> [--stages stage1,stage2,stage3]
        [--launcher slurm|local] [--nproc-per-node N] [--export] [--dry-run] [--wait]
        [more training overrides ...]

Flags and overrides may come in any order.

slurm   every stage is one Slurm job shaped by the profile's `machine.slurm` settings; each
        later stage depends `afterok` on the one before (a failed stage cancels the rest),
        so the command returns at once, printing the job ids and output folders. With --wait it
        stays until every job has ended and returns non-zero when one did not complete (the
        states come from sacct where the cluster keeps accounting, else from scontrol).
local   the stages run one after another on this machine, each exactly as
        `python -m mapanything_ext.train.training stage=<stage> ...` would; a failure stops it.
        With --nproc-per-node N each stage runs under `torchrun --nproc_per_node=N` (one rank
        per GPU; N=1 puts DDP and the NCCL process group in the path of a one-GPU run too).

--dry-run prints what would be submitted or run (per stage: output folder, Slurm parameters or
command line) and submits nothing.

--export writes each finished stage's checkpoint-best.pth as a Hugging Face model folder
(<output_dir>/hf_export, python -m mapanything_ext.export) for MapAnything's own from_pretrained.

Each later stage starts from the earlier stage's checkpoint-best.pth (model.pretrained),
which the job verifies at start-up. A later stage that already ran from another content of that
file (the earlier stage was trained again) is trained again: its earlier run is moved to
<output_dir>/superseded/<time>/ (train_params.restart_when_pretrained_changes). When the chain starts after Stage 1 the earlier
stage's checkpoint must already exist; that is checked before anything is submitted.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig

from mapanything_ext.cluster.slurm_params import executor_arguments, launcher_config
from mapanything_ext.config import REPO_ROOT, compose_training

STAGES = ("stage1", "stage2", "stage3")


class PipelineError(RuntimeError):
    """The requested chain cannot start (unknown stage, missing earlier checkpoint)."""


def compose_stage(stage: str, overrides: list[str]) -> DictConfig:
    """The training config of one stage."""
    return compose_training([f"stage={stage}", *overrides])


def plan(stages: list[str], overrides: list[str]) -> list[tuple[str, list[str], DictConfig]]:
    """(stage, overrides, composed config) per stage; later stages take the earlier stage's best."""
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        raise PipelineError(f"unknown stage(s) {unknown}; choose from {list(STAGES)}")
    stages = sorted(stages, key=STAGES.index)
    steps, previous_dir = [], None
    for stage in stages:
        stage_overrides = list(overrides)
        if previous_dir is not None:
            stage_overrides.append(f"model.pretrained={previous_dir / 'checkpoint-best.pth'}")
        if stage != "stage1":  # trained again when its earlier stage was trained again since it ran
            stage_overrides.append("train_params.restart_when_pretrained_changes=true")
        cfg = compose_stage(stage, stage_overrides)
        if previous_dir is None and stage != "stage1":
            _require_earlier_checkpoint(stage, cfg)
        steps.append((stage, stage_overrides, cfg))
        previous_dir = Path(cfg.output_dir)
    return steps


def _require_earlier_checkpoint(stage: str, cfg: DictConfig) -> None:
    pretrained = cfg.model.get("pretrained")
    if pretrained and not Path(pretrained).is_file():
        raise PipelineError(
            f"{stage} starts from model.pretrained={pretrained}, which does not exist: run the earlier stage first "
            f"(--stages {STAGES[STAGES.index(stage) - 1]},{stage}) or set model.pretrained"
        )


@dataclass
class StageJob:
    """What one Slurm job runs: compose the stage's config on the node, then train.

    submitit calls checkpoint() when the job is signalled before its time limit; returning
    the same job makes it requeue and resume from checkpoint-last.
    """

    stage: str
    overrides: list
    export: bool = False

    def __call__(self) -> str:
        from mapanything_ext.train.engine import train

        output_dir = train(compose_stage(self.stage, self.overrides))
        if self.export and int(os.environ.get("SLURM_PROCID", "0")) == 0:
            export_stage(output_dir)
        return str(output_dir)

    def checkpoint(self, *args, **kwargs):
        import submitit

        return submitit.helpers.DelayedSubmission(self)


def export_stage(output_dir: Path) -> Path:
    from mapanything_ext.export import export

    return export(Path(output_dir) / "checkpoint-best.pth", Path(output_dir) / "hf_export")


def submit_slurm(steps, export: bool = False) -> list[str]:
    import submitit

    job_ids, previous = [], None
    for stage, stage_overrides, cfg in steps:
        output_dir = Path(cfg.output_dir)
        # The same launcher config as `-m hydra/launcher=submitit_slurm` with these overrides.
        launcher = launcher_config([f"stage={stage}", *stage_overrides])
        after = {"dependency": f"afterok:{previous}", "kill_on_invalid_dep": "yes"} if previous else {}
        init, update = executor_arguments(launcher, f"mapanything_ext_{stage}", after)
        executor = submitit.AutoExecutor(folder=output_dir / ".submitit" / "%j", cluster="slurm", **init)
        executor.update_parameters(**update)
        output_dir.mkdir(parents=True, exist_ok=True)
        job = executor.submit(StageJob(stage, stage_overrides, export))
        after = f" (after {previous})" if previous else ""
        print(f"[pipeline] {stage}: Slurm job {job.job_id}{after} -> {output_dir}", flush=True)
        job_ids.append(job.job_id)
        previous = job.job_id
    return job_ids


def local_command(stage: str, overrides: list[str], nproc_per_node: int | None) -> list[str]:
    entry = ["-m", "mapanything_ext.train.training", f"stage={stage}", *overrides]
    if not nproc_per_node:
        return [sys.executable, *entry]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc_per_node}",
            *entry]


def run_local(steps, nproc_per_node: int | None = None, export: bool = False) -> None:
    for stage, stage_overrides, cfg in steps:
        output_dir = Path(cfg.output_dir)
        print(f"[pipeline] {stage}: running -> {output_dir}", flush=True)
        cmd = local_command(stage, stage_overrides, nproc_per_node)
        if subprocess.run(cmd, cwd=REPO_ROOT).returncode != 0:
            raise PipelineError(f"{stage} failed (see {output_dir / 'console.log'}); later stages not run")
        print(f"[pipeline] {stage}: done, best checkpoint {output_dir / 'checkpoint-best.pth'}", flush=True)
        if export:
            export_stage(output_dir)


def wait_for_jobs(job_ids: list[str], poll_s: float = 5.0, unreadable_s: float = 600.0) -> None:
    """Until every job has ended; PipelineError naming those that did not complete, or when Slurm has
    not answered about a job for unreadable_s (the jobs go on; `status` or sacct tells their end)."""
    from mapanything_ext.cluster.slurm_jobs import job_state

    ended: dict[str, str] = {}
    last_answer = time.monotonic()
    while len(ended) < len(job_ids):
        for job in job_ids:
            if job in ended:
                continue
            found = job_state(job)
            if found is None:
                if time.monotonic() - last_answer > unreadable_s:
                    raise PipelineError(f"no Slurm controller has answered about job {job} for {unreadable_s:.0f}s "
                                        f"(sacct and scontrol failed): stopped waiting; the jobs themselves go on")
                continue
            last_answer = time.monotonic()
            if not found.active:
                ended[job] = found.state or "GONE (forgotten by Slurm)"
                print(f"[pipeline] Slurm job {job}: {ended[job]}", flush=True)
        if len(ended) < len(job_ids):
            time.sleep(poll_s)
    failed = {job: state for job, state in ended.items() if state != "COMPLETED"}
    if failed:
        raise PipelineError(f"Slurm job(s) did not complete: {failed}")


def print_plan(steps, launcher: str, nproc_per_node: int | None) -> None:
    for stage, stage_overrides, cfg in steps:
        print(f"[pipeline] {stage} -> {cfg.output_dir}")
        if launcher == "slurm":
            init, update = executor_arguments(launcher_config([f"stage={stage}", *stage_overrides]),
                                              f"mapanything_ext_{stage}")
            print(f"  submitit: {init} {update}")
        else:
            print("  " + " ".join(local_command(stage, stage_overrides, nproc_per_node)))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stages", default=",".join(STAGES), help="comma-separated subset of stage1,stage2,stage3")
    parser.add_argument("--launcher", choices=("slurm", "local"), default="slurm")
    parser.add_argument("--nproc-per-node", type=int, default=None,
                        help="local launcher: run each stage under torchrun with this many ranks (one per GPU)")
    parser.add_argument("--export", action="store_true",
                        help="export each stage's best checkpoint as a Hugging Face folder (<output_dir>/hf_export)")
    parser.add_argument("--dry-run", action="store_true", help="print what would be submitted or run, then stop")
    parser.add_argument("--wait", action="store_true",
                        help="slurm launcher: wait for every stage's job; non-zero exit when one did not complete")
    parser.add_argument("overrides", nargs="*", help="training overrides, e.g. machine=<profile> model=mapanything")
    args = parser.parse_intermixed_args(argv)
    try:
        if args.nproc_per_node and args.launcher != "local":
            raise PipelineError("--nproc-per-node applies to --launcher local only (on Slurm the profile sets the ranks)")
        steps = plan([s for s in args.stages.split(",") if s], args.overrides)
        if args.dry_run:
            print_plan(steps, args.launcher, args.nproc_per_node)
        elif args.launcher == "slurm":
            job_ids = submit_slurm(steps, args.export)
            if args.wait:
                wait_for_jobs(job_ids)
        else:
            run_local(steps, args.nproc_per_node, args.export)
    except PipelineError as err:
        sys.exit(f"[pipeline] error: {err}")


if __name__ == "__main__":
    main()
