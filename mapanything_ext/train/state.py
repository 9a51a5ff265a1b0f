"""The saved training state: what a checkpoint holds and how a run gets it back, side by side.

A checkpoint is `{"model", "optimizer", "scaler", "epoch", "best_so_far", "args", "resume"}` (the
first six as MapAnything's own checkpoints name them; docs/checkpoints.md). `resume` is the
position: the next thing to do, `epoch`, and `consumed`, how many batches of that epoch's global
batch list (datasets/batch_sampler.py) the job has used; `epoch_complete` marks a position after
the epoch's evaluation and saves (a position with every batch consumed but not complete is one whose
evaluation is still due: a stop during it reruns it on resume); the sampler's state says what
`consumed` means, the RNG states of every rank, and the running sums of the epoch in progress.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from mapanything_ext.checkpoint import load_checkpoint
from mapanything_ext.cluster import distributed as dist
from mapanything_ext.config import to_plain
from mapanything_ext.train import rng_state, settings_check, sharding


@dataclass
class Position:
    epoch: int = 0
    consumed: int = 0  # global batches of this epoch used (all ranks together)
    global_step: int = 0
    best_so_far: float = math.inf  # the lowest test loss_med so far (checkpoint-best's)
    epoch_complete: bool = False
    # Running sums of the epoch in progress (one value per step each), so a mid-epoch resume logs the
    # whole epoch; counters: the epoch's optimizer steps, their gradient norms, skipped steps.
    sums: dict = field(default_factory=dict)
    count: int = 0
    counters: dict = field(default_factory=dict)

    def next_epoch(self) -> None:
        self.epoch += 1
        self.consumed, self.sums, self.count, self.counters, self.epoch_complete = 0, {}, 0, {}, False

    def accumulate(self, values: dict) -> None:
        for key, value in values.items():
            self.sums[key] = self.sums.get(key, 0.0) + float(value)
        self.count += 1


def checkpoint_of(run, position: Position) -> dict:
    """The state to write at `position` (collective: every rank's RNG state is gathered)."""
    rng = dist.all_gather_object(rng_state.capture())
    sampler = run.train_loader.batch_sampler.state_dict(consumed=position.consumed)
    sampler["epoch"] = position.epoch
    model_state, optimizer_state = sharding.full_state(run.module, run.optimizer)  # FSDP: gathered to rank 0
    return {
        "model": model_state,
        "optimizer": optimizer_state,
        "scaler": None,  # bf16 autocast needs no loss scaling (fp16 is refused at start)
        "epoch": position.epoch,
        "best_so_far": float(position.best_so_far),
        "args": to_plain(run.cfg),
        "resume": {"epoch": position.epoch, "consumed": position.consumed, "epoch_complete": position.epoch_complete,
                   "global_step": position.global_step, "sampler": sampler, "rng": rng,
                   "sums": dict(position.sums), "count": position.count, "counters": dict(position.counters),
                   "pretrained_fingerprint": run.pretrained_fingerprint, "wandb_run_id": run.wandb_run_id},
    }


def restore(run, path: Path) -> tuple[Position, list[str]]:
    """Model, optimizer, RNG and sampler of `run` as the checkpoint at `path` left them; returns the
    position and notes for the console (a changed world size, say)."""
    ckpt = load_checkpoint(path, map_location="cpu", mmap=True)
    run.pretrained_fingerprint = ckpt["resume"].get("pretrained_fingerprint")
    run.wandb_run_id = ckpt["resume"].get("wandb_run_id")
    changes = settings_check.compare(ckpt["args"], run.cfg, run.pretrained_fingerprint, run.tp.resume == "force")
    try:
        sharding.load_model_state(run.module, ckpt["model"])
    except RuntimeError as err:
        raise RuntimeError(
            f"cannot resume from {path}: it was written with a different model configuration than this run's "
            f"(use the original overrides, or a new output_dir to start over). {str(err).splitlines()[0]}"
        ) from None
    try:
        sharding.load_optimizer_state(run.module, run.optimizer, ckpt["optimizer"])
    except (ValueError, KeyError, IndexError) as err:
        raise RuntimeError(
            f"cannot resume from {path}: its optimizer has other parameter groups than this run's ({err}); "
            f"train_params.submodule_configs or the model changed. Use the original overrides, or a new output_dir."
        ) from None
    state = ckpt["resume"]
    position = _position_of(state, ckpt["best_so_far"])
    notes = [_restore_rng(state["rng"], run.info.rank, run.info.world_size, int(run.tp.seed), position.epoch)]
    saved_world = int(state.get("sampler", {}).get("world_size", run.info.world_size))
    if position.epoch_complete:
        position.next_epoch()
        if saved_world != run.info.world_size:
            notes.append(f"world size changed from {saved_world} to {run.info.world_size} at the end of epoch "
                         f"{position.epoch - 1}: the next epoch is dealt to {run.info.world_size} rank(s)")
    else:
        sampler_state = {**state["sampler"], "consumed": position.consumed, "epoch": position.epoch}
        notes.append(run.train_loader.batch_sampler.load_state_dict(sampler_state))
    return position, [note for note in changes + notes if note]


class ContinuationError(RuntimeError):
    """A checkpoint of MapAnything's own loop that cannot be continued here."""


def continue_mapanything_run(run, path: Path, trust_foreign: bool) -> tuple[Position, list[str]]:
    """Model, optimizer and position of `run` as a training checkpoint of MapAnything's own loop
    (`{"model", "optimizer", "scaler", "epoch", "args", "best_so_far"}`, saved after its epoch
    `epoch`, counted from 0) left them: the run goes on with the next epoch, as that loop's resume
    does (`start_epoch = epoch + 1`), its learning rate at that epoch's start. Returns the position
    and notes for the console."""
    from mapanything_ext.checkpoint.verify import archive_problem

    problem = archive_problem(Path(path))
    if problem:
        raise ContinuationError(f"cannot continue MapAnything's run from {path}: {problem}")
    ckpt = load_checkpoint(path, map_location="cpu", trust_foreign=trust_foreign)
    missing = [key for key in ("model", "optimizer", "epoch") if key not in ckpt]
    if missing:
        raise ContinuationError(
            f"cannot continue MapAnything's run from {path}: it has no {', '.join(missing)} (a training checkpoint "
            f"of MapAnything's loop has model, optimizer and epoch; checkpoint-final holds the model only: give it "
            f"as model.pretrained)")
    if "resume" in ckpt:
        raise ContinuationError(f"{path} is a checkpoint of ours: resume it by running in its folder, or give it "
                                f"as model.pretrained")
    try:
        sharding.load_model_state(run.module, ckpt["model"])
        sharding.load_optimizer_state(run.module, run.optimizer, ckpt["optimizer"])
    except (RuntimeError, ValueError, KeyError, IndexError) as err:
        raise ContinuationError(
            f"cannot continue MapAnything's run from {path} with this configuration: {str(err).splitlines()[0]} "
            f"(the model config and train_params.submodule_configs must be those of that run)") from None
    epoch = int(ckpt["epoch"]) + 1
    steps = run.train_loader.batch_sampler.epoch_batches() // run.info.world_size
    position = Position(epoch=epoch, global_step=epoch * steps, best_so_far=float(ckpt.get("best_so_far", math.inf)))
    notes = [f"continuing MapAnything's run from {path}: {epoch} epoch(s) trained there, this run trains from "
             f"epoch {epoch + 1} on (its learning rate at {epoch}.0 epochs), AdamW moments of "
             f"{len(ckpt['optimizer'].get('state', {}))} tensors, best_so_far {position.best_so_far:.6g}; its loss "
             f"scaler's state is not needed (bf16)"]
    notes += _changed_settings(ckpt.get("args"), run.tp)
    return position, notes


def _changed_settings(args, tp) -> list[str]:
    """What this run sets otherwise than the continued one did (MapAnything's train_params names)."""
    try:
        theirs = args.train_params
    except AttributeError:
        return []
    notes = []
    for key in ("lr", "min_lr", "warmup_epochs", "epochs", "weight_decay", "accum_iter", "max_num_of_imgs_per_gpu"):
        value = theirs.get(key) if hasattr(theirs, "get") else None
        if value is not None and value != getattr(tp, key):
            notes.append(f"WARNING: train_params.{key} is {getattr(tp, key)} here, {value} in the continued run")
    return notes


def _position_of(state: dict, best_so_far: float) -> Position:
    consumed = state.get("consumed")
    if consumed is None:  # written before positions were global
        consumed = int(state["iteration"]) * int(state.get("sampler", {}).get("world_size", 1))
    return Position(epoch=int(state["epoch"]), consumed=int(consumed), global_step=int(state["global_step"]),
                    best_so_far=float(best_so_far), epoch_complete=bool(state["epoch_complete"]),
                    sums=dict(state.get("sums", {})), count=int(state.get("count", 0)),
                    counters=dict(state.get("counters", {})))


def _restore_rng(saved, rank: int, world_size: int, seed: int, epoch: int) -> str | None:
    """This rank's saved RNG state; a rank the writer did not have is seeded afresh (returns a note)."""
    if isinstance(saved, dict):  # one state for all ranks (single-process writer)
        saved = [saved]
    if rank < len(saved) and len(saved) == world_size:
        rng_state.restore(saved[rank])
        return None
    if rank < len(saved):
        rng_state.restore(saved[rank])
    else:
        rng_state.seed_everything(seed + 1000 * (epoch + 1) + rank)
    return (f"RNG states of {len(saved)} rank(s) saved, {world_size} now: ranks below {len(saved)} take theirs, "
            f"the others are seeded from train_params.seed; the run is exact, not bitwise equal to one "
            f"that kept its world size")
