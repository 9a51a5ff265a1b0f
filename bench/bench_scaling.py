"""DDP scaling of our training step: images/s at N ranks against N x the rate at one, per rank.

    python bench/bench_scaling.py --data DIR [--ranks 1,2,4] [--settings stage1,stage3]
        [--steps 10] [--warmup 3] [--tiny | --compact] [--extra OVERRIDE ...]

For each setting and each rank count it starts `torchrun --nproc_per_node=N` on this file (so
DDP, NCCL on GPUs, gloo on a CPU), each rank building the run exactly as the training command does
(build.build_run: our loader with its image budget, DDP with model.find_unused_parameters, the
optimizer, loss.impl's self-check) and timing `step.train_step` on the batches our loader deals it:

  step ms       wall time of the step (synchronised), mean over the timed steps
  data ms       time waiting for the loader's next batch
  all-reduce ms GPU time of NCCL all-reduce kernels per step (gloo: CPU time), from torch.profiler
                over 2 further steps; DDP overlaps most of it with the backward
  peak GiB      peak GPU memory allocated
  images/s      images of all ranks per second of the slowest rank

and prints one row per rank, then the totals with the scaling efficiency
images/s(N) / (N x images/s(1)) (goal: >= 0.9). Every process gets NVLink multicast off
(NCCL_NVLS_ENABLE=0, TORCH_SYMM_MEM_DISABLE_MULTICAST=1, NVSHMEM_DISABLE_NVLS=1), as the lent
multi-GPU machines need. Settings (full v1.1 MapAnything, random init, 518x392, bf16):

  stage1   Stage 1: single-vehicle views, 4 per sample, image budget 4
  stage3   Stage 3: cooperative, 4 to 10 views, image budget 12, gradient checkpointing

--tiny uses the tiny MapAnything, --compact the compact model at 56x42 on a CPU (checks the script).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

NO_MULTICAST = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
SETTINGS = {
    "stage1": ["stage=stage1"],
    "stage3": ["stage=stage3", "model.pretrained=null"],
}
TINY = ["model.encoder.size=small", "model.encoder.keep_first_n_layers=2", "model.info_sharing.module_args.depth=3",
        "model.info_sharing.module_args.dim=192", "model.info_sharing.module_args.num_heads=3",
        "model.info_sharing.module_args.indices=[0,1]", "model.pred_head.feature_head.feature_dim=32"]
COMPACT = ["model=compact", "loss=compact_loss", "dataset.resolution_train=[56,42]", "dataset.resolution_test=[56,42]",
           "model.dim=32", "model.depth=1", "model.num_heads=2"]


def overrides(args, setting: str, out: Path) -> list[str]:
    model = COMPACT if args.compact else ["model=mapanything", "loss=overall_loss", *(TINY if args.tiny else [])]
    return [f"machine.opv2v_root={args.data / 'opv2v'}", f"machine.opv2v_depth_root={args.data / 'opv2v_depth'}",
            f"machine.num_workers={args.workers}", "dataset.train_split=train", *SETTINGS[setting], *model,
            f"output_dir={out}", f"train_params.max_steps_per_epoch={args.warmup + args.steps + 2}",
            "train_params.amp=true", *args.extra]


# ---- one rank (under torchrun) ---------------------------------------------------------------------


def rank_main(args) -> None:
    from mapanything_ext.cluster import distributed as dist
    from mapanything_ext.config import compose_training
    from mapanything_ext.train.build import (
        build_run,
        choose_loss_impl,
        first_sample_views,
    )
    from mapanything_ext.train.data import to_device
    from mapanything_ext.train.step import train_step

    info = dist.init_distributed_mode()
    cfg = compose_training(overrides(args, args.setting, args.out))
    run = build_run(cfg, info, args.out)
    choose_loss_impl(run, lambda: first_sample_views(run))
    run.model.train()
    timed = {"step": [], "data": [], "images": []}
    batches = endless(run.train_loader)
    for index in range(args.warmup + args.steps):
        started = time.perf_counter()
        views = to_device(next(batches), info.device)
        waited = time.perf_counter() - started
        started = time.perf_counter()
        train_step(run, views, run.autocast)
        _synchronize(info.device)
        if index >= args.warmup:
            timed["step"].append(time.perf_counter() - started)
            timed["data"].append(waited)
            timed["images"].append(len(views) * views[0]["img"].shape[0])
    all_reduce = _all_reduce_ms(run, batches, info.device)
    peak = torch.cuda.max_memory_allocated(info.device) / 2**30 if info.device.type == "cuda" else float("nan")
    mine = {"rank": info.rank, "host": os.uname().nodename, "step_ms": 1e3 * _mean(timed["step"]),
            "data_ms": 1e3 * _mean(timed["data"]), "all_reduce_ms": all_reduce, "peak_gib": peak,
            "images": sum(timed["images"]), "seconds": sum(timed["step"]) + sum(timed["data"])}
    everyone = dist.all_gather_object(mine)
    if info.rank == 0:
        Path(args.result).write_text(json.dumps(everyone))
    dist.cleanup()


def endless(loader):
    """The loader's batches, epoch after epoch (a small dataset at several ranks has few per epoch)."""
    epoch = 0
    while True:
        loader.batch_sampler.set_epoch(epoch)
        yield from loader
        epoch += 1


def _all_reduce_ms(run, batches, device) -> float:
    """Per step: GPU time of NCCL all-reduce kernels (gloo: CPU time of its all-reduce calls)."""
    from torch.profiler import ProfilerActivity, profile

    from mapanything_ext.train.data import to_device
    from mapanything_ext.train.step import train_step

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(2):
            train_step(run, to_device(next(batches), device), run.autocast)
        _synchronize(device)
    total = 0.0
    for event in prof.key_averages():
        name = event.key.lower()
        if device.type == "cuda" and "nccl" in name and "allreduce" in name.replace("_", ""):
            total += event.device_time_total
        elif device.type != "cuda" and name.startswith("gloo:all_reduce"):
            total += event.cpu_time_total
    return total / 2 / 1e3


def _synchronize(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _mean(values) -> float:
    return sum(values) / max(len(values), 1)


# ---- the driver --------------------------------------------------------------------------------------


def launch(args, setting: str, ranks: int, work: Path) -> list[dict]:
    result = work / f"{setting}_{ranks}.json"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}",
               str(Path(__file__).resolve()), "--rank-main", "--setting", setting, "--result", str(result),
               "--out", str(work / f"{setting}_{ranks}"), *_passed_on(args)]
    started = time.perf_counter()
    proc = subprocess.run(command, cwd=REPO, env={**os.environ, **NO_MULTICAST}, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.stdout.write(proc.stdout[-4000:] + proc.stderr[-4000:])
        raise SystemExit(f"{setting} at {ranks} ranks failed (exit {proc.returncode})")
    print(f"# {setting}, {ranks} rank(s): {time.perf_counter() - started:.0f} s with start-up", flush=True)
    return json.loads(result.read_text())


def _passed_on(args) -> list[str]:
    passed = ["--data", str(args.data), "--steps", str(args.steps), "--warmup", str(args.warmup),
              "--workers", str(args.workers)]
    passed += ["--tiny"] * args.tiny + ["--compact"] * args.compact
    for extra in args.extra:
        passed += ["--extra", extra]
    return passed


def rate(rows: list[dict]) -> float:
    """Images of all ranks per second of the slowest rank (DDP steps in lockstep)."""
    return sum(r["images"] for r in rows) / max(r["seconds"] for r in rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True, help="synthetic OPV2V root (800x600 for the real figures)")
    parser.add_argument("--ranks", default="1,2")
    parser.add_argument("--settings", default="stage1,stage3")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--workers", type=int, default=3, help="data-loader workers per rank")
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--compact", action="store_true")
    parser.add_argument("--extra", action="append", default=[], help="one more training override (repeatable)")
    parser.add_argument("--work", type=Path, default=None, help="folder for the runs (default: a temporary one)")
    parser.add_argument("--rank-main", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--setting", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rank_main:
        rank_main(args)
        return
    work = args.work or Path(tempfile.mkdtemp(prefix="bench_scaling_"))
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU (gloo)"
    print(f"# {device} x up to {max(int(r) for r in args.ranks.split(','))}, torch {torch.__version__}, "
          f"{args.steps} timed steps after {args.warmup} warm-up", flush=True)
    for setting in args.settings.split(","):
        rows = {int(n): launch(args, setting, int(n), work) for n in args.ranks.split(",")}
        print(f"\n{setting}\n| ranks | rank | host | step ms | data ms | all-reduce ms | peak GiB |\n|---|---|---|---|---|---|---|")
        for n, ranks in rows.items():
            for r in ranks:
                print(f"| {n} | {r['rank']} | {r['host']} | {r['step_ms']:.1f} | {r['data_ms']:.1f} | "
                      f"{r['all_reduce_ms']:.1f} | {r['peak_gib']:.1f} |")
        base = rate(rows[min(rows)]) / min(rows)
        print("\n| ranks | images/s | per rank | efficiency (goal >= 0.9) |\n|---|---|---|---|")
        for n, ranks in rows.items():
            print(f"| {n} | {rate(ranks):.2f} | {rate(ranks) / n:.2f} | {rate(ranks) / (n * base):.2f} |")


if __name__ == "__main__":
    main()
