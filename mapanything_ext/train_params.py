"""`train_params`: one typed schema, its defaults and its checks.

The schema is registered with Hydra (`configs/train_params/default.yaml` extends it), so a key that
is not listed here is refused when the command line is read (`train_params.lr_typo=1` and
`+train_params.anything=...` both stop with Hydra's "Key ... not in 'TrainParams'"), and values are
type-checked there. `load(cfg.train_params)` gives the engine the typed object, whose
`__post_init__` holds the checks that span fields.

The names are MapAnything's own (`mapanything/train/training.py` reads the same ones), so a
user's fork overrides work unchanged; ours are added beside them and documented in
docs/configuration.md.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

SCHEDULES = ("linear_warmup_half_cycle_cosine_decay",)
BATCHING = ("mapanything", "by_view_count")


@dataclass
class SubmoduleConfig:
    """Optimisation of the parameters whose names start with the key (MapAnything's semantics):
    every unset value is the default's; lr 0 freezes the submodule (no gradients, no optimizer state)."""

    lr: Optional[float] = None
    min_lr: Optional[float] = None
    warmup_epochs: Optional[float] = None
    weight_decay: Optional[float] = None
    schedule_type: Optional[str] = None


@dataclass
class TrainParams:
    # Seed of the model's initialisation and of every random draw of the run (+ rank).
    seed: int = 0
    # Images per GPU and step. batching=mapanything: a batch holds max(1, this // dataset.num_views)
    # samples whatever their actual view count (MapAnything's sampler); by_view_count: as many samples
    # as fit with their actual view count (never over the budget).
    max_num_of_imgs_per_gpu: int = 48
    batching: str = "mapanything"
    # Gradient accumulation: the optimizer steps every accum_iter batches (the loss is divided by it).
    accum_iter: int = 1
    epochs: int = 100
    # Optimiser (AdamW) and schedule (linear warm-up, then half-cycle cosine to min_lr), absolute lr.
    lr: float = 1.0e-4
    min_lr: float = 1.0e-6
    warmup_epochs: float = 10.0
    weight_decay: float = 0.05
    betas: List[float] = field(default_factory=lambda: [0.9, 0.95])
    schedule_type: str = "linear_warmup_half_cycle_cosine_decay"
    # Per-submodule optimisation: {<parameter-name prefix>: SubmoduleConfig}; see the presets
    # train_params=freeze_encoder|finetune_with_lower_encoder_lr|finetune_heads_only|lower_encoder_lr.
    # (Typed as Any for Hydra, whose struct mode refuses new keys in a dict of dataclasses; load()
    # turns each entry into a SubmoduleConfig, refusing unknown fields.)
    submodule_configs: Dict[str, Any] = field(default_factory=dict)
    # Print every trainable parameter that no submodule_configs entry covers.
    warn_not_in_submodule: bool = False
    # bf16 autocast on a GPU (ignored on a CPU); fp16 is refused (it needs loss scaling).
    amp: bool = True
    amp_dtype: str = "bf16"
    # cudnn.benchmark off (MapAnything's default: view counts and shapes vary).
    disable_cudnn_benchmark: bool = True
    # The test samples are the same every epoch (ours are fixed by seed and index: true is the only choice).
    freeze_val_samples_across_all_epochs: bool = True
    # Clip the global gradient norm to this value on every optimizer step (MapAnything: 1.0); null:
    # no clipping (the norm is still computed and logged as train_grad_norm).
    gradient_clip: Optional[float] = 1.0
    # torch.compile in place: false, true (whole model) or a list of submodule/method names, `<list>.*`
    # for one compiled block per ModuleList entry (docs/mapanything.md, Fast settings on a GPU).
    compile: Any = False
    compile_mode: str = "default"
    # Where torch.compile keeps what it compiled, relative to output_dir or absolute; null: torch's /tmp.
    compile_cache: Any = "${oc.select:machine.compile_cache,compile_cache}"
    # Per-pixel geometry of each view derived on the training device (lean views from the workers).
    geometry_on_device: bool = True
    # Evaluate every eval_freq epochs; once before training on a fresh start (initial_eval.json).
    eval_freq: int = 1
    eval_before_training: bool = False
    # checkpoint-last every save_freq epochs; checkpoint-<N>.pth kept every keep_freq epochs (N counts from 1).
    save_freq: int = 1
    keep_freq: int = 10
    # Mid-epoch checkpoint-last with the exact position, written in the background (training does not
    # wait for the disk), every this many minutes (rank 0's clock) and/or training steps; null or 0: off.
    save_every_minutes: Optional[float] = 30.0
    save_every_steps: Optional[int] = None
    # Steps between progress scalars (TensorBoard) and console lines.
    print_freq: int = 20
    # Resume from output_dir's newest good checkpoint: true; false: start over; force: resume even where
    # settings that change what is trained differ from the checkpoint's (train/settings_check.py).
    resume: Any = True
    # A training checkpoint of MapAnything's own loop (its checkpoint-last.pth) to continue as this run
    # when output_dir has no checkpoint of ours yet: same epoch, optimizer moments and LR position. Its
    # args are pickled, so it needs trust_foreign_checkpoints=true. Give this run a new output_dir.
    resume_ckpt: Optional[str] = None
    # When model.pretrained's content differs from the one this run folder's checkpoints started from (an
    # earlier stage retrained), move this stage's earlier run aside (<output_dir>/superseded/<time>/) and
    # train it again from the new weights; false: refuse, as any changed setting is refused. The
    # pipeline sets it for Stages 2 and 3.
    restart_when_pretrained_changes: bool = False
    # End each epoch after this many steps / evaluate at most this many batches per rank (null: all).
    max_steps_per_epoch: Optional[int] = None
    max_eval_steps: Optional[int] = None
    # Stop when the (view-scaled) train loss is non-finite, or above max_loss_value when checked.
    check_loss_instability: bool = True
    max_loss_value: float = 1000.0

    def __post_init__(self) -> None:
        problems = list(self._problems())
        if problems:
            raise ValueError("; ".join(problems))

    def _problems(self):
        if self.amp and self.amp_dtype != "bf16":
            yield (f"train_params.amp_dtype={self.amp_dtype} is not supported: fp16 needs loss scaling, which this "
                   f"engine does not do. Use train_params.amp_dtype=bf16 (no loss scaling needed) or train_params.amp=false")
        if self.batching not in BATCHING:
            yield f"train_params.batching={self.batching!r}: choose one of {', '.join(BATCHING)}"
        for name, sub in [("default", self), *self.submodule_configs.items()]:
            schedule = sub.schedule_type or self.schedule_type
            if schedule not in SCHEDULES:
                yield f"train_params schedule_type {schedule!r} ({name}) is not implemented: use {SCHEDULES[0]}"
            if sub.lr is not None and sub.lr < 0:
                yield f"train_params lr of {name} is {sub.lr}: it must be >= 0 (0 freezes a submodule)"
        if self.resume not in (True, False, "force"):
            yield f"train_params.resume={self.resume!r}: true, false or force"
        if self.accum_iter < 1:
            yield f"train_params.accum_iter={self.accum_iter}: it must be >= 1"
        if self.max_num_of_imgs_per_gpu < 1:
            yield f"train_params.max_num_of_imgs_per_gpu={self.max_num_of_imgs_per_gpu}: it must be >= 1"
        if not self.freeze_val_samples_across_all_epochs:
            yield ("train_params.freeze_val_samples_across_all_epochs=false is not supported: our test samples are "
                   "fixed by (seed, index), the same every epoch")
        if self.gradient_clip is not None and self.gradient_clip <= 0:
            yield f"train_params.gradient_clip={self.gradient_clip}: a positive norm, or null for no clipping"
        for key in ("save_every_minutes", "save_every_steps"):
            value = getattr(self, key)
            if value is not None and value < 0:
                yield f"train_params.{key}={value}: a positive interval, or null (or 0) for no mid-epoch saves"

    def warmup_warning(self) -> str | None:
        """What the schedule really does when the warm-up is as long as the run or longer; else None."""
        lr, warmup, epochs = float(self.lr), float(self.warmup_epochs), float(self.epochs)
        if warmup < epochs:
            return None
        peak = lr * epochs / warmup  # still warming up at the run's end
        return (f"train_params.warmup_epochs={warmup:g} >= train_params.epochs={epochs:g}: the learning rate rises "
                f"for the whole run, peaks at {peak:.3g} ({100 * peak / lr:.0f}% of train_params.lr={lr:g}) at its "
                f"end and never decays; reaching lr needs {warmup:g} epochs. For a full warm-up and cosine decay "
                f"within this run set a shorter warm-up, e.g. train_params.warmup_epochs={max(epochs / 10, 0.1):g} "
                f"(docs/configuration.md, Learning-rate schedule).")

    def submodule_of(self, param_name: str) -> str | None:
        """The submodule_configs key covering a parameter (the first prefix that matches), or None."""
        return next((key for key in self.submodule_configs if param_name.startswith(key)), None)

    def setting(self, submodule: str | None, name: str):
        """A submodule's optimisation value, falling back to the default's."""
        value = getattr(self.submodule_configs[submodule], name) if submodule else None
        return getattr(self, name) if value is None else value


def load(node: DictConfig) -> TrainParams:
    """The typed, checked train_params of a composed config. Keys added with `+train_params.<key>`
    pass Hydra's struct check, so unknown keys are refused here too."""
    if isinstance(node, TrainParams):
        return node
    plain = OmegaConf.to_container(node, resolve=True)
    _refuse_unknown("train_params", plain, TrainParams)
    subs = {}
    for key, sub in (plain.pop("submodule_configs", None) or {}).items():
        if not isinstance(sub, dict):
            raise ValueError(f"train_params.submodule_configs.{key} must be a mapping like {{lr: 0}}, not {sub!r}")
        _refuse_unknown(f"train_params.submodule_configs.{key}", sub, SubmoduleConfig)
        subs[key] = SubmoduleConfig(**sub)
    return TrainParams(**plain, submodule_configs=subs)


def _refuse_unknown(where: str, values: dict, schema) -> None:
    known = set(schema.__dataclass_fields__)
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {', '.join(unknown)}; the keys are {', '.join(sorted(known))} "
                         f"(mapanything_ext/train_params.py, docs/configuration.md)")


def register() -> None:
    """Make the schema the base of configs/train_params/*.yaml (idempotent)."""
    ConfigStore.instance().store(group="train_params", name="schema", node=TrainParams)
