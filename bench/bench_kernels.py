"""Kernel choices one by one, on the real MapAnything's training step: where the GPU's time goes,
and what each choice alone saves.

    python bench/bench_kernels.py --data DIR [--configs 8,12] [--settings baseline,sdpa_cudnn,...]
        [--steps 6] [--warmup 2] [--profile] [--compiled VARIANT] [--tiny --device cpu]

Our engine's step (losses/batched_loss.py's criterion, fused AdamW, clip 1.0, bf16 autocast, batch 1
of one cooperative sample at 518x392 repeated to N views; bench/bench_mapanything_step.py's
`batched` variant, or with --compiled one of its compiled variants) timed under each setting alone:

  baseline             torch's own choices (SDPA picks its backend per shape; cudnn.benchmark on,
                       as the other benchmarks run)
  sdpa_cudnn           scaled_dot_product_attention tries cuDNN's attention first (then flash,
                       memory-efficient, math)
  sdpa_flash           flash first (then memory-efficient, math), cuDNN's off
  sdpa_efficient       the memory-efficient kernel first (then math), flash and cuDNN's off
  channels_last_heads  the convolutions of the DPT feature and regression heads in channels_last
                       (their weights converted; cuDNN follows the weight's layout)
  cudnn_benchmark_off  cudnn.benchmark off (train_params.disable_cudnn_benchmark=true, MapAnything's
                       default and ours: what the default costs)

Per (views, setting): seconds per step, images/s, the change against the baseline in ms and %, the
loss of one forward against the same weights under torch's choices (bf16 noise only), peak GiB.
--profile adds, per view count, the baseline step's GPU time by operator (self CUDA time, its share,
and the achieved TFLOP/s where the profiler counts FLOPs: matrix products and convolutions), which
names what to work on next. A compiled variant compiles once with the baseline's choices; the SDPA
settings then take effect only in what runs eagerly, so compare SDPA backends without --compiled.
A setting that changes the weights' layout (channels_last_heads) compiles the parts again for itself
(the compiled code asserts the strides it was traced with), its compile falling in the warm-up steps.
Needs MapAnything, the DINOv2 hub code in $TORCH_HOME/hub and a GPU (--tiny --device cpu checks the
script anywhere).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import sys
from pathlib import Path

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_mapanything_step import (  # noqa: E402
    config,
    engine_stepper,
    measure,
    pinned,
    sample_views,
)

from mapanything_ext.models.registry import build_criteria, build_model_on  # noqa: E402
from mapanything_ext.train.data import to_device  # noqa: E402

DPT_HEADS = ("dpt_feature_head", "dpt_regressor_head")
# Settings that change a weight's strides: compiled code traced before them asserts the old strides.
RELAYOUT = {"channels_last_heads"}


def _sdpa_first(*first: SDPBackend):
    rest = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
    return lambda model, optimizer: sdpa_kernel(
        [*first, *(b for b in rest[rest.index(first[-1]) + 1:] if b not in first)], set_priority=True)


@contextlib.contextmanager
def channels_last_heads(model, optimizer):
    """The DPT heads' 4-D weights (and their AdamW moments: the fused kernel wants one layout) in
    channels_last for the block, back to contiguous after."""
    weights = [p for name in DPT_HEADS if hasattr(model, name)
               for p in getattr(model, name).parameters() if p.dim() == 4]

    def to(layout):
        for p in weights:
            p.data = p.data.contiguous(memory_format=layout)
            for key, value in optimizer.state.get(p, {}).items():
                if torch.is_tensor(value) and value.dim() == 4:
                    optimizer.state[p][key] = value.contiguous(memory_format=layout)

    to(torch.channels_last)
    try:
        yield
    finally:
        to(torch.contiguous_format)


@contextlib.contextmanager
def cudnn_benchmark_off(model, optimizer):
    before = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = False
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = before


SETTINGS = {
    "baseline": lambda model, optimizer: contextlib.nullcontext(),
    "sdpa_cudnn": _sdpa_first(SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION),
    "sdpa_flash": _sdpa_first(SDPBackend.FLASH_ATTENTION),
    "sdpa_efficient": _sdpa_first(SDPBackend.EFFICIENT_ATTENTION),
    "channels_last_heads": channels_last_heads,
    "cudnn_benchmark_off": cudnn_benchmark_off,
}


def fixed_loss(model, criterion, views) -> float:
    """The criterion's loss of one forward, no update (bf16 autocast, as the step runs)."""
    with torch.no_grad(), torch.autocast(views[0]["img"].device.type, dtype=torch.bfloat16):
        preds = model(views)
    loss, _ = criterion(views, preds)
    return float(loss)


def operator_table(step, batch, rows: int = 25) -> str:
    """One step's GPU time by operator (self CUDA time), with the achieved TFLOP/s where counted."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], with_flops=True) as prof:
        step(batch)
        torch.cuda.synchronize()
    # Eager operators (aten::*, their kernels counted once) and compiled code (triton kernels).
    averages = [a for a in prof.key_averages() if a.self_device_time_total > 0 and
                (a.key.startswith("aten::") or a.key.startswith("triton"))]
    total = sum(a.self_device_time_total for a in averages)
    lines = [f"GPU time {total / 1e3:.1f} ms in one step (aten operators and triton kernels)",
             "| operator | calls | GPU ms | share | TFLOP/s |",
             "|---|---|---|---|---|"]
    for a in sorted(averages, key=lambda a: -a.self_device_time_total)[:rows]:
        rate = f"{a.flops / (a.self_device_time_total * 1e-6) / 1e12:.0f}" if a.flops else ""
        lines.append(f"| {a.key[:70]} | {a.count} | {a.self_device_time_total / 1e3:.1f} | "
                     f"{100 * a.self_device_time_total / total:.1f}% | {rate} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True, help="synthetic OPV2V root (1 scenario, 3 agents)")
    parser.add_argument("--configs", default="8,12", help="view counts; `Ngc` with gradient checkpointing")
    parser.add_argument("--settings", default=",".join(SETTINGS))
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--profile", action="store_true", help="the baseline's GPU time by operator")
    parser.add_argument("--compiled", default="batched", help="bench_mapanything_step variant (default eager)")
    parser.add_argument("--resolution", default="518,392")
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.benchmark = True
    resolution = tuple(int(x) for x in args.resolution.split(","))
    settings = args.settings.split(",")
    unknown = [s for s in settings if s not in SETTINGS]
    if unknown:
        parser.error(f"unknown settings {unknown}: choose from {', '.join(SETTINGS)}")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"# {name}, torch {torch.__version__}, {'tiny' if args.tiny else 'full v1.1'} MapAnything, "
          f"{resolution[0]}x{resolution[1]}, batch 1, bf16, step `{args.compiled}`, {args.steps} timed steps after "
          f"{args.warmup} warm-up", flush=True)
    for views_name in args.configs.split(","):
        checkpointing = views_name.endswith("gc")
        views = int(views_name.rstrip("gc"))
        cfg = config(args.data, args.tiny, checkpointing, resolution)
        torch.manual_seed(0)
        model = build_model_on(cfg.model, device)
        criterion, _ = build_criteria(cfg.loss)
        criterion.to(device)
        batch = pinned(sample_views(cfg, views))
        step, optimizer = engine_stepper(cfg, model, criterion, device, args.compiled)
        on_device = to_device(batch, device)
        print(f"\n## {views} views, gradient checkpointing {'on' if checkpointing else 'off'}\n"
              "| setting | s/step | images/s | vs baseline (ms) | vs baseline | loss vs baseline | peak GiB |\n"
              "|---|---|---|---|---|---|---|", flush=True)
        base = None
        for setting in settings:
            gc.collect()
            plain = fixed_loss(model, criterion.batched, on_device)  # the same weights, torch's choices
            recompile = setting in RELAYOUT and args.compiled != "batched"
            with SETTINGS[setting](model, optimizer):
                try:
                    if recompile:
                        torch._dynamo.reset()
                    loss = fixed_loss(model, criterion.batched, on_device)
                    seconds, peak, _ = measure(step, batch, args.steps, args.warmup, device)
                except Exception as err:  # a backend that refuses a shape: named, then go on
                    print(f"| {setting} | failed: {type(err).__name__}: {str(err)[:150]} | | | | | |", flush=True)
                    optimizer.zero_grad(set_to_none=True)
                    continue
                finally:
                    if recompile:  # back to the layout the next setting's compiled code expects
                        torch._dynamo.reset()
                if setting == "baseline":
                    base = seconds
                    if args.profile and device.type == "cuda":
                        table = operator_table(step, batch)
            change = f"{(seconds - base) * 1e3:+.1f} | {100 * (base / seconds - 1):+.1f}%" if base else "- | -"
            change += f" | {abs(loss - plain) / abs(plain):.1e}"
            print(f"| {setting} | {seconds:.3f} | {views / seconds:.1f} | {change} | {peak:.1f} |", flush=True)
        if args.profile and device.type == "cuda" and base:
            print(f"\n{table}", flush=True)
        optimizer.zero_grad(set_to_none=True)
        del step, optimizer, model
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
