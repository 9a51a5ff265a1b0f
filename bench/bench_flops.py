"""FLOPs per image of MapAnything v1.1's training step, and the model FLOP utilisation (MFU) of measured
images/s against a GPU's dense bf16 peak.

    python bench/bench_flops.py --data DIR [--views 4,8,12] [--resolution 518,392] [--device cpu]
        [--rates 4:27.6,8:30.1] [--peak-tflops 989.4] [--tiny]

The forward pass is counted by torch.utils.flop_counter.FlopCounterMode (matrix products and
convolutions; attention by its formula, 4 x batch x heads x queries x keys x head size, registered here
for the CPU kernel, which the counter does not know) on one cooperative sample of `--views` views
(repeated past 12), batch 1, no gradients. A training step is counted as 3 x the forward (the backward
of a matrix product costs two of them), the usual convention of MFU; gradient checkpointing's
recomputed forward is not counted (it is overhead, not model work). Element-wise work, norms and the
criterion are not counted either: they are a few percent. Runs anywhere (the full model's forward on a
CPU takes ~20 s per image); `--rates views:images_per_s,...` adds the MFU of those rates at
`--peak-tflops` (989.4: dense bf16 of an H100 SXM or H200, without sparsity).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode, register_flop_formula

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_mapanything_step import config, sample_views  # noqa: E402

from mapanything_ext.models.registry import build_model_on  # noqa: E402

TRAINING_FACTOR = 3  # forward + backward (two matrix products per forward one)


@register_flop_formula(torch.ops.aten._scaled_dot_product_flash_attention_for_cpu)
def _cpu_attention_flops(query_shape, key_shape, value_shape, *args, **kwargs) -> int:
    batch, heads, queries, head_size = query_shape
    keys = key_shape[2]
    return 2 * batch * heads * queries * keys * head_size + 2 * batch * heads * queries * keys * value_shape[3]


def forward_flops(model, views) -> tuple[int, dict[str, int]]:
    """Total forward FLOPs and those of each top-level part."""
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(views)
    counts = counter.get_flop_counts()
    parts = {name.split(".", 1)[1]: sum(ops.values()) for name, ops in counts.items() if name.count(".") == 1}
    return counter.get_total_flops(), parts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True, help="synthetic OPV2V root (1 scenario, 3 agents)")
    parser.add_argument("--views", default="4,8,12")
    parser.add_argument("--resolution", default="518,392")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--rates", default=None, help="views:images_per_s,... measured elsewhere: adds MFU")
    parser.add_argument("--peak-tflops", type=float, default=989.4, help="the GPU's dense bf16 peak")
    parser.add_argument("--tiny", action="store_true", help="a tiny MapAnything, to check the script")
    args = parser.parse_args()
    device = torch.device(args.device)
    resolution = tuple(int(x) for x in args.resolution.split(","))
    cfg = config(args.data, args.tiny, False, resolution)
    model = build_model_on(cfg.model, device).eval()
    rates = dict(tuple(map(float, pair.split(":"))) for pair in args.rates.split(",")) if args.rates else {}
    print(f"# {'tiny' if args.tiny else 'full v1.1'} MapAnything, {resolution[0]}x{resolution[1]}, "
          f"{sum(p.numel() for p in model.parameters()):,} parameters; training = {TRAINING_FACTOR} x forward")
    print("| views | forward TFLOP/image | training TFLOP/image | parts (forward TFLOP/image) | images/s | MFU |\n"
          "|---|---|---|---|---|---|")
    for n in (int(v) for v in args.views.split(",")):
        started = time.perf_counter()
        views = [{k: v.to(device) if torch.is_tensor(v) else v for k, v in view.items()} for view in sample_views(cfg, n)]
        total, parts = forward_flops(model, views)
        per_image = total / n / 1e12
        shown = ", ".join(f"{name} {flops / n / 1e12:.4f}" for name, flops in sorted(parts.items(), key=lambda kv: -kv[1])
                          if flops / n / 1e12 >= 0.001)
        rate = rates.get(float(n))
        mfu = f"{rate * per_image * TRAINING_FACTOR / args.peak_tflops:.1%}" if rate else "-"
        print(f"| {n} | {per_image:.3f} | {per_image * TRAINING_FACTOR:.2f} | {shown} | {rate or '-'} | {mfu} |",
              flush=True)
        print(f"# {n} views counted in {time.perf_counter() - started:.0f}s", flush=True)


if __name__ == "__main__":
    main()
