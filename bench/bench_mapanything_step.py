"""Training-step throughput of the real MapAnything: our engine vs MapAnything's own step.

    python bench/bench_mapanything_step.py --data DIR [--configs 4,8,12,12gc,24gc]
        [--variants reference,engine,engine_compile] [--steps 8] [--warmup 3] [--tiny]
        [--loss-parts NAME,NAME]  (what loss.compile compiles in the *_loss variants)

Same model object, same inputs (one cooperative OPV2V sample at 518x392 from the synthetic
generator; 24 views repeat its 12), batch 1, bf16 autocast, random init (full v1.1 unless --tiny):

  reference       MapAnything's own loop body: loss_of_one_batch_multi_view (moves the views,
                  autocast, criterion), float(loss), its NativeScalerWithGradNormCount
                  (GradScaler, clip 1.0), torch.optim.AdamW with default kernels
  engine          our engine's train_step: views already pinned and copied non-blocking,
                  each step's loss read back once the next step is queued (as the train loop does),
                  fused AdamW, clip 1.0 with foreach kernels, no GradScaler (bf16 needs none)
  engine_compile  the same with train_params.compile=[encoder,info_sharing] (compiled in place)
  engine_compile_heads  ... compile=[encoder,info_sharing,dpt_feature_head]
  engine_compile_heads_loss  ... and loss.compile=true (the recommended setting)
  engine_compile_post_loss  ... and the methods _encode_and_fuse_optional_geometric_inputs and
                  downstream_head compiled as well
  engine_compile_all  ... compile=true (the whole model)
  engine_graphs_heads_loss  engine_compile_heads_loss with train_params.compile_mode=reduce-overhead
                  (each compiled part replayed as one CUDA graph)
  engine_graphs_post_loss   engine_compile_post_loss with compile_mode=reduce-overhead
  batched         our engine's step with our view-batched criterion (loss.impl=batched,
                  losses/batched_loss.py) instead of MapAnything's; nothing compiled
  batched_compile_post      ... the model parts of engine_compile_post_loss compiled, criterion eager
  batched_compile_post_loss ... and the batched criterion compiled too (loss.compile=true)
  batched_compile_regional_loss  batched_compile_post_loss with the encoder and info sharing compiled
                  block by block (encoder.model.blocks.*, info_sharing.self_attention_blocks.*, and
                  DINOv2's encoder.model.prepare_tokens_with_masks):
                  Dynamo traces one block per class, not the whole part (run it instead of, not after,
                  the other compiled variants)
  batched_compile_regional_parts_loss  batched_compile_regional_loss without
                  _encode_and_fuse_optional_geometric_inputs (the setting docs/mapanything.md recommends
                  with gradient checkpointing)
  batched_compile_parts_loss  batched_compile_post_loss without _encode_and_fuse_optional_geometric_inputs
                  (the setting docs/mapanything.md recommends without gradient checkpointing: that method
                  breaks into 16 small graphs that cost ~40 s at every start and no speed)
  batched_graphs_parts_loss  batched_compile_parts_loss with train_params.compile_mode=reduce-overhead
                  (each compiled part replayed as one CUDA graph: what the host's launches cost)

Before the batched variants run, each view count's batch goes through both criteria once
(losses/loss_selfcheck.compare, float32 on the GPU, the model's own predictions) and the table
notes the worst relative difference (loss, details, gradients).

Variants run in the order given on the same model object and compiling is cumulative, so list
them from least to most compiled (the reference first). --profile writes, per (variant, views),
the wall and GPU time of each engine phase (forward, loss, backward, optimizer), each phase's GPU
time by kind of kernel (attention, convolution, layout conversion, matrix product, optimizer,
Triton, copies, other: `KERNEL_KINDS`), the operator table and the gzipped Chrome trace.

A config `Ngc` builds the model with all gradient-checkpointing switches on. Prints one
table row per (config, variant): seconds per step, images/s, peak GPU memory allocated and
reserved (CUDA graphs keep their own memory pool, which the allocated figure under-counts), ratio
to the reference. Needs MapAnything, the DINOv2 hub code in $TORCH_HOME/hub and a GPU (--tiny
runs anywhere, to check the script).
"""

from __future__ import annotations

import argparse
import gc
import gzip
import json
import sys
import time
from pathlib import Path

import torch
from torch.utils.data import default_collate

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from mapanything_ext import train_params as params  # noqa: E402
from mapanything_ext.cluster.distributed import DistInfo  # noqa: E402
from mapanything_ext.config import compose_training  # noqa: E402
from mapanything_ext.datasets.build import build_dataset  # noqa: E402
from mapanything_ext.losses.batched_loss import BatchedCriterion  # noqa: E402
from mapanything_ext.models.registry import build_criteria, build_model_on  # noqa: E402
from mapanything_ext.train.compile_cache import CompileCache  # noqa: E402
from mapanything_ext.train.compiling import compile_in_place  # noqa: E402
from mapanything_ext.train.data import to_device  # noqa: E402
from mapanything_ext.train.optim import build_optimizer  # noqa: E402
from mapanything_ext.train.run import Run  # noqa: E402
from mapanything_ext.train.step import read_step, train_step, view_scale  # noqa: E402

# What each engine variant compiles: the model parts (train_params.compile), whether the loss
# parts too (loss.compile), and how (train_params.compile_mode).
HEADS = ["encoder", "info_sharing", "dpt_feature_head"]
POST = HEADS + ["_encode_and_fuse_optional_geometric_inputs", "downstream_head"]
# DINOv2's token preparation too: eagerly, its bicubic resize of the position embedding is one CUDA
# kernel thread per output position looping over all 1,536 channels, 14 ms per step on an H200.
REGIONAL = ["encoder.model.prepare_tokens_with_masks", "encoder.model.blocks.*", "info_sharing.self_attention_blocks.*",
            *POST[2:]]
# The regional setting docs/mapanything.md recommends with gradient checkpointing: without the geometric
# inputs' method, whose loop over the views Dynamo unrolls per view count (Stage 3 has 9 of them).
REGIONAL_PARTS = [*REGIONAL[:3], "dpt_feature_head", "downstream_head"]
COMPILE = {"engine": (None, False, "default"), "engine_compile": (["encoder", "info_sharing"], False, "default"),
           "engine_compile_heads": (HEADS, False, "default"), "engine_compile_heads_loss": (HEADS, True, "default"),
           "engine_compile_post_loss": (POST, True, "default"), "engine_compile_all": (True, False, "default"),
           "engine_graphs_heads_loss": (HEADS, True, "reduce-overhead"),
           "engine_graphs_post_loss": (POST, True, "reduce-overhead"),
           "batched": (None, False, "default"), "batched_compile_post": (POST, False, "default"),
           "batched_compile_post_loss": (POST, True, "default"),
           "batched_compile_regional_loss": (REGIONAL, True, "default"),
           "batched_compile_regional_parts_loss": (REGIONAL_PARTS, True, "default"),
           "batched_compile_parts_loss": (HEADS + ["downstream_head"], True, "default"),
           "batched_graphs_parts_loss": (HEADS + ["downstream_head"], True, "reduce-overhead")}
TINY = ["model.encoder.size=small", "model.encoder.keep_first_n_layers=2", "model.info_sharing.module_args.depth=3",
        "model.info_sharing.module_args.dim=192", "model.info_sharing.module_args.num_heads=3",
        "model.info_sharing.module_args.indices=[0,1]", "model.pred_head.feature_head.feature_dim=32"]


def config(data: Path, tiny: bool, checkpointing: bool, resolution):
    overrides = ["model=mapanything", "loss=overall_loss", "dataset=opv2v_coop_ft", "dataset.num_views=12",
                 f"machine.opv2v_root={data / 'opv2v'}", f"machine.opv2v_depth_root={data / 'opv2v_depth'}",
                 f"dataset.resolution_train=[{resolution[0]},{resolution[1]}]", "dataset.train_split=train",
                 f"model.gradient_checkpointing={str(checkpointing).lower()}"]
    return compose_training(overrides + (TINY if tiny else []))


def sample_views(cfg, count: int) -> list[dict]:
    """`count` views of one cooperative sample, collated as a batch of one (repeated past 12)."""
    views = build_dataset(cfg.dataset.train_dataset)[0]
    views = (views * ((count + len(views) - 1) // len(views)))[:count]
    return default_collate([views])


def pinned(batch):
    """Page-locked, as our DataLoader delivers batches on a GPU machine (pin_memory=True)."""
    if not torch.cuda.is_available():
        return batch
    return [{k: v.pin_memory() if torch.is_tensor(v) else v for k, v in view.items()} for view in batch]


def shallow_copy(batch):
    return [dict(view) for view in batch]


def reference_stepper(model, criterion, device):
    """MapAnything's own step, as its train_one_epoch runs it (its parameter groups, its scaler
    clipping at 1.0, its 2/n_views loss scaling and its host read of the loss)."""
    from mapanything.utils.inference import loss_of_one_batch_multi_view
    from mapanything.utils.train_tools import (
        NativeScalerWithGradNormCount,
        get_parameter_groups,
    )

    groups, _, _ = get_parameter_groups(model, 1e-4, 0.05)
    optimizer = torch.optim.AdamW(groups, lr=1e-4, betas=(0.9, 0.95))
    scaler = NativeScalerWithGradNormCount()

    def step(batch):
        result = loss_of_one_batch_multi_view(shallow_copy(batch), model, criterion, device, use_amp=True,
                                              amp_dtype="bf16")
        loss, _ = result["loss"]
        loss = loss * view_scale(len(batch))
        float(loss)
        scaler(loss, optimizer, parameters=model.parameters(), update_grad=True, clip_grad=1.0)
        optimizer.zero_grad()

    return step, optimizer


def engine_stepper(cfg, model, criterion, device, variant: str, loss_parts: tuple[str, ...] | None = None):
    compile_what, compile_loss, mode = COMPILE[variant]
    if compile_what:
        compile_in_place(model, compile_what, mode)
    if variant.startswith("batched"):
        criterion = BatchedCriterion(criterion.batched.spec, compile=compile_loss)  # as the adapter builds it
    elif compile_loss:
        from mapanything_ext.models.mapanything_adapter import (
            LOSS_FUNCTIONS,
            LOSS_MODULES,
            compile_loss_parts,
        )

        compile_loss_parts([criterion], loss_parts or LOSS_FUNCTIONS + LOSS_MODULES)
    info = DistInfo(0, 1, 0, device, False, 7200.0)
    tp = params.load(cfg.train_params)
    optimizer, schedules = build_optimizer(model, tp)
    run = Run(cfg=cfg, tp=tp, info=info, output_dir=Path("/tmp"), model=model, module=model, optimizer=optimizer,
              schedules=schedules, train_criterion=criterion, test_criterion=criterion, train_loader=None,
              test_loader=None, test_name="test", watcher=None, autocast=torch.bfloat16, compile_cache=CompileCache())

    queued = []

    def step(batch):
        # As the train loop does: the step before is read (its loss checked) once this one is queued.
        queued.append(train_step(run, to_device(batch, device), torch.bfloat16))
        if len(queued) == 2:
            read_step(run, queued.pop(0))

    return step, optimizer


def worst_differences(model, criterion, views) -> str:
    """Loss, details and per-tensor gradients of the two criteria on the model's predictions."""
    from mapanything_ext.losses.loss_selfcheck import loss_details_gradients

    with torch.autocast(views[0]["img"].device.type, dtype=torch.bfloat16):
        preds = [{k: v.detach() if torch.is_tensor(v) else v for k, v in p.items()} for p in model(views)]
    ref_loss, ref_details, ref_grads = loss_details_gradients(criterion.reference, views, preds)
    loss, details, grads = loss_details_gradients(criterion.batched, views, preds)
    rel = lambda a, b: abs(a - b) / max(abs(b), 1e-6)  # noqa: E731
    detail = max(rel(details.get(k, float("nan")), v) for k, v in ref_details.items())
    grad = max(float((grads[k] - g).norm() / g.norm().clamp_min(1e-30)) for k, g in ref_grads.items())
    same_keys = "same keys" if details.keys() == ref_details.keys() else "KEYS DIFFER"
    return f"loss {rel(loss, ref_loss):.1e}, details {detail:.1e} ({same_keys}), gradients {grad:.1e}"


def synchronize(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(step, batch, steps: int, warmup: int, device) -> tuple[float, float, float]:
    """Seconds per step and peak memory (allocated, reserved) of the timed steps (warm-up, with
    its one-off allocations such as cuDNN autotuning and optimizer state, is not counted)."""
    started = time.perf_counter()
    for _ in range(warmup):
        step(batch)
    synchronize(device)
    print(f"# {warmup} warm-up steps (compilation included) took {time.perf_counter() - started:.0f}s", flush=True)
    if device.type == "cuda":
        # Memory cached by earlier variants or by warm-up alone would count as reserved otherwise.
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    started = time.perf_counter()
    for _ in range(steps):
        step(batch)
    synchronize(device)
    seconds = (time.perf_counter() - started) / steps
    if device.type != "cuda":
        return seconds, float("nan"), float("nan")
    return seconds, torch.cuda.max_memory_allocated(device) / 2**30, torch.cuda.max_memory_reserved(device) / 2**30


def profile_step(step, batch, out: Path) -> float:
    """Where one step's time goes: a table of operators by GPU time, the step's phases (wall time
    against the GPU time of the kernels launched in each), and the gzipped Chrome trace. Returns
    the step's GPU busy time (ms, kernels and copies)."""
    from torch.profiler import ProfilerActivity, profile

    out.parent.mkdir(parents=True, exist_ok=True)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        step(batch)
        torch.cuda.synchronize()
    table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=40, max_name_column_width=60)
    trace = out.with_suffix(".json")
    prof.export_chrome_trace(str(trace))
    events = json.loads(trace.read_text())["traceEvents"]
    with gzip.open(str(trace) + ".gz", "wt") as packed:
        json.dump(events, packed)
    trace.unlink()
    phases = phase_table(events)
    out.write_text(phases + "\n\n" + table)
    print(phases, flush=True)
    return sum(e["dur"] for e in events if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")) / 1e3


def phase_table(events: list[dict]) -> str:
    """Per engine phase (the mapanything_ext.* ranges): wall ms, GPU-kernel ms of the kernels
    launched inside it, kernel count, and the top kernels; the GPU is starved where wall >> GPU."""
    phases = sorted((e for e in events if e.get("cat") == "user_annotation" and e["name"].startswith("mapanything_ext.")),
                    key=lambda e: e["ts"])
    # Library kernels are launched through the runtime API, Triton's (compiled code) through the driver's.
    launches = {e["args"]["correlation"]: e["ts"] for e in events
                if e.get("cat") in ("cuda_runtime", "cuda_driver") and "correlation" in e.get("args", {})}
    kernels = [e for e in events if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")]
    per_phase = {p["name"]: [] for p in phases}
    for kernel in kernels:
        launched = launches.get(kernel.get("args", {}).get("correlation"))
        owner = next((p["name"] for p in phases if launched is not None and p["ts"] <= launched <= p["ts"] + p["dur"]),
                     None)
        if owner:
            per_phase[owner].append(kernel)
    lines = ["| phase | wall ms | GPU ms | kernels | top kernels (ms) |", "|---|---|---|---|---|"]
    for p in phases:
        mine = per_phase[p["name"]]
        by_name: dict[str, float] = {}
        for k in mine:
            by_name[k["name"][:50]] = by_name.get(k["name"][:50], 0.0) + k["dur"] / 1e3
        top = "; ".join(f"{n} {t:.1f}" for n, t in sorted(by_name.items(), key=lambda kv: -kv[1])[:4])
        lines.append(f"| {p['name']} | {p['dur'] / 1e3:.1f} | {sum(k['dur'] for k in mine) / 1e3:.1f} | "
                     f"{len(mine)} | {top} |")
    lines += ["", kind_table(per_phase)]
    if kernels:
        span = max(k["ts"] + k["dur"] for k in kernels) - min(k["ts"] for k in kernels)
        lines.append(f"GPU busy {sum(k['dur'] for k in kernels) / 1e3:.1f} ms of a {span / 1e3:.1f} ms kernel span, "
                     f"{len(kernels)} kernels")
    return "\n".join(lines)


# What a kernel is, by its name (first match wins): where the GPU time goes beyond the top kernels.
KERNEL_KINDS = (
    ("attention", ("fmha", "flash", "sdpa", "attention", "attn")),
    ("convolution", ("conv", "wgrad", "dgrad", "fprop", "implicit_gemm", "xmma_fprop", "winograd")),
    ("layout", ("nchwtonhwc", "nhwctonchw", "transpose", "permute")),
    ("matrix product", ("gemm", "nvjet", "cutlass", "xmma", "sm90_", "sm80_", "cublas")),
    ("optimizer", ("adam", "multi_tensor", "foreach", "lpnorm")),
    ("compiled (triton)", ("triton",)),
    ("copy / fill", ("memcpy", "memset", "copy", "fill")),
)


def kernel_kind(name: str) -> str:
    low = name.lower()
    return next((kind for kind, keys in KERNEL_KINDS if any(k in low for k in keys)), "other (eager elementwise, norms)")


def kind_table(per_phase: dict[str, list[dict]]) -> str:
    """GPU ms per (phase, kind of kernel): how much of each phase is matrix products and attention,
    the work that counts toward MFU, and how much is everything between them."""
    kinds = [k for k, _ in KERNEL_KINDS] + ["other (eager elementwise, norms)"]
    lines = ["| phase | " + " | ".join(kinds) + " |", "|---|" + "---|" * len(kinds)]
    for phase, mine in per_phase.items():
        ms = dict.fromkeys(kinds, 0.0)
        for k in mine:
            ms[kernel_kind(k["name"])] += k["dur"] / 1e3
        lines.append(f"| {phase} | " + " | ".join(f"{ms[k]:.1f}" for k in kinds) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True, help="synthetic OPV2V root (1 scenario, 3 agents)")
    parser.add_argument("--configs", default="4,8,12,12gc,24gc")
    parser.add_argument("--variants", default="reference,engine,engine_compile_heads")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--tiny", action="store_true", help="a tiny MapAnything, to check the script")
    parser.add_argument("--resolution", default="518,392")
    parser.add_argument("--profile", type=Path, default=None,
                        help="also write a torch.profiler table of one step per (variant, views) into this folder")
    parser.add_argument("--profile-variants", default=None, help="profile only these variants (comma list)")
    parser.add_argument("--loss-parts", default=None,
                        help="what loss.compile compiles in the *_loss variants (names in MapAnything's losses "
                             "namespace, comma list; default: mapanything_adapter.LOSS_FUNCTIONS + LOSS_MODULES)")
    parser.add_argument("--device", default="cuda", help="cuda (the benchmark) or cpu (to check the script)")
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = True  # as MapAnything's training script sets it
    torch.backends.cudnn.benchmark = True
    resolution = tuple(int(x) for x in args.resolution.split(","))
    configs = args.configs.split(",")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"# {name}, torch {torch.__version__}, {'tiny' if args.tiny else 'full v1.1'}"
          f" MapAnything, {resolution[0]}x{resolution[1]}, batch 1, bf16, {args.steps} timed steps after "
          f"{args.warmup} warm-up", flush=True)
    print("| views | grad ckpt | variant | s/step | images/s | peak GiB | reserved GiB | vs reference |\n"
          "|---|---|---|---|---|---|---|---|", flush=True)
    for checkpointing in (False, True):
        chosen = [c for c in configs if c.endswith("gc") == checkpointing]
        if chosen:
            run_group(args, device, resolution, checkpointing, [int(c.rstrip("gc")) for c in chosen])


def run_group(args, device, resolution, checkpointing: bool, view_counts: list[int]) -> None:
    cfg = config(args.data, args.tiny, checkpointing, resolution)
    torch.manual_seed(0)
    started = time.perf_counter()
    model = build_model_on(cfg.model, device)
    criterion, _ = build_criteria(cfg.loss)
    criterion.to(device)
    print(f"# model built in {time.perf_counter() - started:.0f}s: "
          f"{sum(p.numel() for p in model.parameters()):,} parameters", flush=True)
    batches = {n: pinned(sample_views(cfg, n)) for n in view_counts}
    if any(v.startswith("batched") for v in args.variants.split(",")):
        for n in view_counts:
            print(f"# {n} views: batched vs reference criterion, float32 on {device.type}, worst relative "
                  f"difference: {worst_differences(model, criterion, to_device(batches[n], device))}", flush=True)
    reference = {}
    for variant in args.variants.split(","):
        if variant == "reference":
            step, optimizer = reference_stepper(model, criterion.reference, device)
        else:
            step, optimizer = engine_stepper(cfg, model, criterion, device, variant,
                                             tuple(args.loss_parts.split(",")) if args.loss_parts else None)
        for n in view_counts:
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
            try:
                seconds, peak, reserved = measure(step, batches[n], args.steps, args.warmup, device)
            except Exception as err:  # out of memory, or a variant that fails to compile: report, go on
                reason = "out of memory" if isinstance(err, torch.OutOfMemoryError) else f"failed: {err!r}"[:300]
                print(f"| {n} | {'on' if checkpointing else 'off'} | {variant} | {reason} | | | | |", flush=True)
                optimizer.zero_grad(set_to_none=True)
                continue
            rate = n / seconds
            if args.profile and variant in (args.profile_variants or variant).split(","):
                busy = profile_step(step, batches[n],
                                    args.profile / f"profile_{variant}_{n}{'gc' if checkpointing else ''}.txt")
                if busy > 0:  # a GPU ran it
                    print(f"# {n} views, {variant}: wall {seconds * 1e3:.1f} ms per step (unprofiled) against "
                          f"{busy:.1f} ms of GPU work (profiled step): {seconds * 1e3 / busy:.2f}x", flush=True)
            if variant == "reference":
                reference[n] = rate
            ratio = f"{rate / reference[n]:.2f}x" if n in reference else "-"
            print(f"| {n} | {'on' if checkpointing else 'off'} | {variant} | {seconds:.3f} | {rate:.1f} | {peak:.1f} | "
                  f"{reserved:.1f} | {ratio} |", flush=True)
        optimizer.zero_grad(set_to_none=True)
        del optimizer, step
    del model


if __name__ == "__main__":
    main()
