"""Stage 3 as users run it: the batches its sampler really draws (a view count and batch size that
change from step to step), MapAnything's own step against ours on the same sequence.

    python bench/bench_stage3_mix.py --data DIR [--steps 100] [--variants reference,batched_compile_regional_parts_loss]
        [--epoch-size 600] [--workers 8] [--tiny] [--device cuda]

The sequence: `stage=stage3` with `opv2v_coop_ft` as the stage sets it (its image budget, 12 images
per GPU; its view counts; gradient checkpointing on), `dataset.train_epoch_size=--epoch-size` (the
synthetic data repeated, as MapAnything's `N @ Dataset` does), our training loader over one or more
epochs: its first --steps batches, complete views in pinned host memory, fed to both variants in the
same order. Variants (bench/bench_mapanything_step.py): `reference` is MapAnything's own loop body,
`batched_compile_regional_parts_loss` the setting docs/mapanything.md recommends with checkpointing.

Per variant: a warm-up of one batch per distinct shape (for a compiled variant: its compile time,
printed per shape as it goes, with the graphs Inductor loaded from its cache, compiled, or compiled
and could not cache; run again with the same TORCHINDUCTOR_CACHE_DIR: a restart's),
then every batch of the sequence timed. Dynamo's silent fallback to eager mode past its recompile
limit is turned into an error here (`fail_on_recompile_limit_hit`): a variant that would fall back
fails, named. Prints the shape mix, then one row per variant: images/s over the sequence, the ratio to
the reference, the warm-up's seconds, graphs Dynamo compiled in the warm-up and during the timed steps
(0 means no shape compiled late), the peak memory. Needs MapAnything, the DINOv2 hub code in
$TORCH_HOME/hub and a GPU (--tiny --device cpu checks the script anywhere).
"""

from __future__ import annotations

import argparse
import collections
import gc
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_mapanything_step import TINY, engine_stepper, pinned, reference_stepper, synchronize  # noqa: E402

from mapanything_ext import train_params as params  # noqa: E402
from mapanything_ext.config import compose_training  # noqa: E402
from mapanything_ext.datasets.build import build_dataset  # noqa: E402
from mapanything_ext.models.registry import build_criteria, build_model_on  # noqa: E402
from mapanything_ext.train.build import epoch_of_size  # noqa: E402
from mapanything_ext.train.compile_cache import cache_counters  # noqa: E402
from mapanything_ext.train.data import build_loader  # noqa: E402


def stage3_config(args):
    overrides = ["model=mapanything", "loss=overall_loss", "stage=stage3",
                 f"machine.opv2v_root={args.data / 'opv2v'}", f"machine.opv2v_depth_root={args.data / 'opv2v_depth'}",
                 "dataset.train_split=train", f"dataset.train_epoch_size={args.epoch_size}"]
    if args.tiny:
        overrides += [*TINY, "dataset.resolution_train=[112,84]", "dataset.resolution_test=[112,84]"]
    return compose_training(overrides)


def sampled_batches(cfg, steps: int, workers: int) -> list:
    """The first `steps` batches the Stage 3 training loader draws (epoch after epoch), complete views."""
    tp = params.load(cfg.train_params)
    dataset = build_dataset(cfg.dataset.train_dataset)
    dataset.geometry_on_device = False  # MapAnything's step takes complete views
    dataset = epoch_of_size(dataset, int(cfg.dataset.train_epoch_size), tp)
    loader = build_loader(dataset, tp, True, 0, 1, workers)
    batches, epoch = [], 0
    while len(batches) < steps:
        loader.batch_sampler.set_epoch(epoch)
        for batch in loader:
            batches.append(pinned(batch))
            if len(batches) == steps:
                break
        epoch += 1
    return batches


def shape_of(batch) -> tuple[int, int]:
    """(views, samples) of a batch."""
    return len(batch), int(batch[0]["img"].shape[0])


def graphs_compiled() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def run_variant(step, batches, device) -> dict:
    """Warm-up over one batch per shape, then the whole sequence timed."""
    first_of_shape = {}
    for batch in batches:
        first_of_shape.setdefault(shape_of(batch), batch)
    graphs, started = graphs_compiled(), time.perf_counter()
    for shape, batch in first_of_shape.items():
        shape_started, shape_graphs, lookups = time.perf_counter(), graphs_compiled(), cache_counters()
        step(batch)
        synchronize(device)
        d = {key: value - lookups[key] for key, value in cache_counters().items()}
        print(f"#   warm-up {shape[0]} views x {shape[1]}: {time.perf_counter() - shape_started:.1f}s, "
              f"{graphs_compiled() - shape_graphs} graphs (FX graph cache: {d['fxgraph_cache_hit']} loaded, "
              f"{d['fxgraph_cache_miss']} compiled, {d['fxgraph_cache_bypass']} compiled that it cannot hold)",
              flush=True)
    warmup_s, warmup_graphs = time.perf_counter() - started, graphs_compiled() - graphs
    if device.type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    graphs, started = graphs_compiled(), time.perf_counter()
    for batch in batches:
        step(batch)
    synchronize(device)
    seconds = time.perf_counter() - started
    images = sum(views * samples for views, samples in map(shape_of, batches))
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
    return {"seconds": seconds, "images": images, "images_per_s": images / seconds, "warmup_s": warmup_s,
            "warmup_graphs": warmup_graphs, "late_graphs": graphs_compiled() - graphs, "peak_gib": peak}


def measure(cfg, variant: str, batches, device) -> dict:
    """One variant on a model of its own, built from the same seed: a compiled variant compiles the
    model in place, and no other variant may run those compiled parts."""
    torch.manual_seed(0)
    started = time.perf_counter()
    model = build_model_on(cfg.model, device)
    criterion, _ = build_criteria(cfg.loss)
    criterion.to(device)
    print(f"# {variant}: model and criterion built in {time.perf_counter() - started:.0f}s", flush=True)
    if variant == "reference":
        step, optimizer = reference_stepper(model, criterion.reference, device)
    else:
        step, optimizer = engine_stepper(cfg, model, criterion, device, variant)
    try:
        return run_variant(step, batches, device)
    finally:
        optimizer.zero_grad(set_to_none=True)
        del step, optimizer, model, criterion
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True, help="synthetic OPV2V root (1 scenario, 3 agents)")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--variants", default="reference,batched_compile_regional_parts_loss")
    parser.add_argument("--epoch-size", type=int, default=600, help="dataset.train_epoch_size")
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--tiny", action="store_true", help="a tiny MapAnything at 112x84, to check the script")
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = True  # as MapAnything's training script sets it
    torch.backends.cudnn.benchmark = True
    torch._dynamo.config.fail_on_recompile_limit_hit = True  # no silent eager fallback
    cfg = stage3_config(args)
    started = time.perf_counter()
    batches = sampled_batches(cfg, args.steps, args.workers)
    mix = collections.Counter(map(shape_of, batches))
    print(f"# {len(batches)} batches of Stage 3's sampler loaded in {time.perf_counter() - started:.0f}s; "
          f"(views, samples): count = {dict(sorted(mix.items()))}", flush=True)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"# {name}, torch {torch.__version__}, {'tiny' if args.tiny else 'full v1.1'} MapAnything, gradient "
          f"checkpointing {cfg.model.gradient_checkpointing}, bf16", flush=True)
    print("| variant | steps | images | seconds | images/s | vs reference | warm-up s | graphs (warm-up) | "
          "graphs (timed) | peak GiB |\n|---|---|---|---|---|---|---|---|---|---|", flush=True)
    reference = None
    for variant in args.variants.split(","):
        try:
            row = measure(cfg, variant, batches, device)
        except Exception as err:  # an eager fallback, out of memory, a failed compile: named, then go on
            print(f"| {variant} | failed: {type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''} "
                  f"| | | | | | | | |", flush=True)
            continue
        if variant == "reference":
            reference = row["images_per_s"]
        ratio = f"{row['images_per_s'] / reference:.2f}x" if reference else "-"
        print(f"| {variant} | {len(batches)} | {row['images']} | {row['seconds']:.1f} | {row['images_per_s']:.2f} | "
              f"{ratio} | {row['warmup_s']:.1f} | {row['warmup_graphs']} | {row['late_graphs']} | "
              f"{row['peak_gib']:.1f} |", flush=True)


if __name__ == "__main__":
    main()
