"""Time of MapAnything's criterion alone (forward + backward), eager against compiled parts.

    python bench/bench_mapanything_loss.py --data DIR [--views 4,12] [--variants eager,compiled]

The criterion is the train criterion of loss=overall_loss; its inputs are one cooperative OPV2V
sample (from the synthetic generator, repeated past its views) and the predictions of a tiny
MapAnything at the same resolution (the criterion's cost depends on the prediction shapes only),
detached so that only the criterion's own backward runs. Variants, cumulative, in the order given:

  eager          MapAnything's criterion as it is
  compiled       loss.compile=true (mapanything_adapter.LOSS_FUNCTIONS and LOSS_MODULES)
  compile:A+B    also compile these functions or module classes of MapAnything's losses
                 namespace, e.g. compile:normalize_multiple_pointclouds+geotrf (compilation is
                 process-wide and cannot be undone: run one process per set to compare sets)

Prints ms per criterion call (forward + backward), the loss (it must not change) and the
warm-up time (compilation). Needs MapAnything and the DINOv2 hub code in $TORCH_HOME/hub.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from bench_mapanything_step import config, sample_views, synchronize  # noqa: E402

from mapanything_ext.models import mapanything_adapter  # noqa: E402
from mapanything_ext.models.registry import build_criteria, build_model_on  # noqa: E402
from mapanything_ext.train.data import to_device  # noqa: E402

def detached_predictions(model, views):
    with torch.autocast(views[0]["img"].device.type, dtype=torch.bfloat16):
        preds = model(views)
    return [{k: v.detach().float().requires_grad_() if torch.is_tensor(v) and v.is_floating_point() else v
             for k, v in p.items()} for p in preds]


def time_criterion(criterion, views, preds, steps: int, warmup: int, device) -> tuple[float, float, float]:
    started = time.perf_counter()
    for _ in range(warmup):
        loss, _ = criterion(views, preds)
        loss.backward()
    synchronize(device)
    warm = time.perf_counter() - started
    started = time.perf_counter()
    for _ in range(steps):
        loss, _ = criterion(views, preds)
        loss.backward()
    synchronize(device)
    return (time.perf_counter() - started) / steps, float(loss), warm


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True, help="synthetic OPV2V root (1 scenario, 3 agents)")
    parser.add_argument("--views", default="4,12")
    parser.add_argument("--variants", default="eager,compiled")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--resolution", default="518,392")
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args()
    device = torch.device(args.device)
    resolution = tuple(int(x) for x in args.resolution.split(","))
    cfg = config(args.data, True, False, resolution)
    torch.manual_seed(0)
    model = build_model_on(cfg.model, device)
    criterion = build_criteria(cfg.loss)[0]
    inputs = {}
    for n in (int(v) for v in args.views.split(",")):
        views = to_device(sample_views(cfg, n), device)
        inputs[n] = (views, detached_predictions(model, views))
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"# {name}, torch {torch.__version__}, {resolution[0]}x{resolution[1]}, batch 1, {args.steps} timed calls")
    print("| views | variant | ms per call | loss | warm-up s |\n|---|---|---|---|---|", flush=True)
    for variant in args.variants.split(","):
        if variant == "compiled":
            mapanything_adapter.compile_loss_parts([criterion])
        elif variant.startswith("compile:"):
            mapanything_adapter.compile_loss_parts([criterion], tuple(variant.split(":", 1)[1].split("+")))
        for n, (views, preds) in inputs.items():
            seconds, loss, warm = time_criterion(criterion, views, preds, args.steps, args.warmup, device)
            print(f"| {n} | {variant} | {seconds * 1e3:.1f} | {loss:.6f} | {warm:.0f} |", flush=True)


if __name__ == "__main__":
    main()
