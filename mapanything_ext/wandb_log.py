"""Weights & Biases beside TensorBoard (`logger=wandb`, an optional dependency: pip install
"mapanything-ext[wandb]"): the scalars TensorBoard gets, at the same x (`epoch_1000x`), on rank 0.

One training run is one W&B run, whatever the cluster does: its id is kept in every checkpoint
(`resume.wandb_run_id`) and in `<output_dir>/wandb_run_id` (for a job stopped before its first save),
and a requeued or resumed job continues it (`resume="allow"`). Points are plotted against
`epoch_1000x`, not W&B's own step, so a resumed job re-logging the steps after its checkpoint adds
points instead of being refused. `logger.mode=offline` needs no network (`wandb sync` later).
A W&B that cannot start (no network in online mode, say) is reported and the job goes on with
TensorBoard: a logging service never stops a long training run.
"""

from __future__ import annotations

import secrets
from pathlib import Path

from mapanything_ext.console import warn

ID_FILE = "wandb_run_id"


class WandbMissing(ImportError):
    """logger=wandb without the wandb package."""


def run_id_for(output_dir: Path, from_checkpoint: str | None) -> str:
    """The W&B run id of this training run: the checkpoint's, else the run folder's, else a new one
    (written to the run folder at once)."""
    path = output_dir / ID_FILE
    run_id = from_checkpoint or (path.read_text().strip() if path.is_file() else "") or secrets.token_hex(4)
    path.write_text(run_id + "\n")
    return run_id


class WandbScalars:
    def __init__(self, logger_cfg, output_dir: Path, run_id: str, config: dict):
        import wandb

        self._run = None
        try:
            self._run = wandb.init(
                project=logger_cfg.get("project"), entity=logger_cfg.get("entity"), id=run_id, resume="allow",
                dir=str(output_dir), mode=logger_cfg.get("mode") or None, name=logger_cfg.get("run_name") or output_dir.name,
                group=logger_cfg.get("group"), tags=list(logger_cfg.get("tags") or []), config=config)
        except Exception as err:  # noqa: BLE001 -- see the module docstring
            warn("wandb", f"W&B did not start ({type(err).__name__}: {err}); this job logs to TensorBoard only. On a "
                 f"node without network use logger.mode=offline (then `wandb sync {output_dir / 'wandb'}`)")
            return
        self._run.define_metric("epoch_1000x")
        self._run.define_metric("*", step_metric="epoch_1000x")

    def add(self, scalars: dict, x: int) -> None:
        if self._run is not None:
            self._run.log({**scalars, "epoch_1000x": x})

    def close(self) -> None:
        if self._run is not None:
            self._run.finish()
            self._run = None


def open_wandb(cfg, output_dir: Path, run_id_from_checkpoint: str | None, config: dict) -> tuple[WandbScalars, str]:
    try:
        import wandb  # noqa: F401
    except ImportError:
        raise WandbMissing('logger=wandb needs the wandb package: pip install "mapanything-ext[wandb]" (or '
                           'pip install wandb), or use logger=tensorboard') from None
    run_id = run_id_for(output_dir, run_id_from_checkpoint)
    return WandbScalars(cfg.logger, output_dir, run_id, config), run_id
