"""Stage 1 with the full MapAnything v1.1 on a GPU: MapAnything's own loop and ours from the same
start, on the same batches; per-step loss curves and images/s side by side.

    python bench/recipe_gpu.py --data DIR --work DIR [--steps 50] [--variants theirs,ours_fast,...] [--tiny]

Needs a CUDA GPU, MapAnything importable and the DINOv2 hub code in $TORCH_HOME/hub. --data is a
synthetic OPV2V folder whose train split has exactly --steps single-vehicle samples (one epoch =
--steps steps at Stage 1's budget of 4 images: one sample per batch), made here when missing.

  theirs        MapAnything's `train_one_epoch` (its parameter groups, schedule, loss scaler with
                clip 1.0, 2/n_views scaling) over its own sampler on our dataset
  ours_fast     our engine (`python -m mapanything_ext.train.training`) with the recipe's fast
                settings: compiled parts [encoder, info_sharing, dpt_feature_head, downstream_head]
                and the compiled batched criterion
  ours_fast_noclip  the same with train_params.gradient_clip=null (what clipping costs)
  ours_reference    our engine with MapAnything's criterion (loss.impl=reference), eager

Both write TensorBoard's train_loss at every step; images/s is taken from the event wall times of
steps 10..N (compilation and warm-up excluded). Prints a table and writes <work>/recipe_gpu.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from gpu_stages import TINY  # noqa: E402  (the tiny MapAnything at 112x84 of the stages bench)

FAST = ["train_params.compile=[encoder,info_sharing,dpt_feature_head,downstream_head]", "loss.compile=true"]
VARIANTS = {"ours_fast": FAST, "ours_fast_noclip": [*FAST, "train_params.gradient_clip=null"],
            "ours_reference": ["loss.impl=reference"]}
FIRST_TIMED = 10  # steps before this one are warm-up (compilation, cuDNN, allocator)


def log(message: str) -> None:
    print(f"[recipe_gpu {time.strftime('%H:%M:%S')}] {message}", flush=True)


def make_data(data: Path, steps: int, width: int, height: int) -> None:
    """--steps train samples (one vehicle, 10 timestamps per scenario, scenarios made in parallel) and a
    small validate split."""
    if (data / "opv2v" / "train").is_dir():
        return
    code = ("import sys; from mapanything_ext.datasets.synthetic import generate; "
            "generate(sys.argv[1], scenarios=1, frames=int(sys.argv[2]), agents=1, seed=int(sys.argv[3]), "
            "width=int(sys.argv[4]), height=int(sys.argv[5]), splits=(sys.argv[6],), verbose=False)")
    jobs = []
    for seed, start in enumerate(range(0, steps, 10)):
        frames = min(10, steps - start)
        jobs.append([sys.executable, "-c", code, str(data), str(frames), str(seed), str(width), str(height), "train"])
    jobs.append([sys.executable, "-c", code, str(data), "2", "99", str(width), str(height), "validate"])
    started = time.time()
    for proc in [subprocess.Popen(job, cwd=REPO) for job in jobs]:
        if proc.wait() != 0:
            raise SystemExit("data generation failed")
    log(f"data: {steps} train samples at {width}x{height} in {time.time() - started:.0f}s")


def overrides(args, out: Path, init: Path) -> list[str]:
    return ["machine=local", "dataset=opv2v_ft", "model=mapanything", "loss=overall_loss", "stage=stage1",
            f"machine.opv2v_root={args.data / 'opv2v'}", f"machine.opv2v_depth_root={args.data / 'opv2v_depth'}",
            f"machine.num_workers={args.workers}", f"train_params.compile_cache={args.work / 'compile_cache'}",
            f"output_dir={out}", f"model.pretrained={init}", "train_params.print_freq=1",
            # One epoch: its warm-up learning rates are those of Stage 1's 5 epochs (warmup_epochs 10).
            "train_params.epochs=1",
            "train_params.max_eval_steps=1", *(TINY if args.tiny else [])]


def scalars(folder: Path, tag: str) -> list[tuple[float, int, float]]:
    """(wall time, x, value) of a TensorBoard tag, in x order."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    events.Reload()
    return sorted(((e.wall_time, e.step, e.value) for e in events.Scalars(tag)), key=lambda e: e[1])


def rate(events, images_per_step: int) -> float:
    timed = events[FIRST_TIMED - 1:]
    return images_per_step * (len(timed) - 1) / (timed[-1][0] - timed[0][0])


def initial_weights(cfg, path: Path) -> None:
    """A random-init model (seed 0) written once as safetensors: both loops start from it."""
    if path.exists():
        return
    import torch
    from safetensors.torch import save_file

    from mapanything_ext.models.registry import build_model

    torch.manual_seed(0)
    state = build_model(cfg.model).state_dict()
    save_file({k: v.detach().clone().contiguous() for k, v in state.items()}, str(path))


def theirs(args, cfg, init: Path, out: Path) -> None:
    """MapAnything's own train_one_epoch, in this process."""
    import torch
    from omegaconf import OmegaConf
    from safetensors.torch import load_file
    from torch.utils.tensorboard import SummaryWriter

    from mapanything_ext.datasets.build import build_dataset
    from mapanything_ext.models import mapanything_adapter
    from mapanything_ext.models.registry import build_model

    training = mapanything_adapter.import_mapanything("mapanything.train.training")
    tools = mapanything_adapter.import_mapanything("mapanything.utils.train_tools")
    samplers = mapanything_adapter.import_mapanything("mapanything.datasets.base.batched_sampler")
    losses = vars(mapanything_adapter.import_mapanything("mapanything.train.losses"))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # (a CPU: --tiny, to check the script)
    tp = cfg.train_params
    model = build_model(cfg.model).to(device)
    model.load_state_dict(load_file(str(init)))
    criterion = mapanything_adapter._criterion(cfg.loss.train_criterion, losses).to(device)
    dataset = build_dataset(cfg.dataset.train_dataset)
    batch = max(1, tp.max_num_of_imgs_per_gpu // int(cfg.dataset.num_views))
    sampler = samplers.DynamicBatchedMultiFeatureRandomSampler(dataset, pool_sizes=[1], feature_to_batch_size_map={0: batch})

    class ByFirstIndex(torch.utils.data.Dataset):
        def __len__(self):
            return len(dataset)

        def __getitem__(self, index):
            return dataset[int(index[0])]

    loader = torch.utils.data.DataLoader(ByFirstIndex(), batch_sampler=sampler, num_workers=args.workers,
                                         pin_memory=True)
    groups, name_to_idx, idx_to_name = tools.get_parameter_groups(model, tp.lr, tp.weight_decay,
                                                                  submodule_configs=tp.submodule_configs)
    optimizer = torch.optim.AdamW(groups, lr=tp.lr, betas=(0.9, 0.95))
    run_args = OmegaConf.create({"train_params": OmegaConf.to_container(tp, resolve=True), "output_dir": str(out)})
    out.mkdir(parents=True, exist_ok=True)
    writer = SummaryWriter(log_dir=str(out))
    training.train_one_epoch(model, criterion, loader, optimizer, device, 0, tools.NativeScalerWithGradNormCount(),
                             run_args, log_writer=writer, param_groups_name_to_idx_map=name_to_idx,
                             param_groups_idx_to_name_map=idx_to_name, model_without_ddp=model)
    writer.close()
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    (out / "peak.json").write_text(json.dumps({"peak_gib": peak}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--variants", default="theirs,ours_fast,ours_fast_noclip,ours_reference")
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--theirs-only", action="store_true", help=argparse.SUPPRESS)  # the child process
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    size = (112, 84) if args.tiny else (640, 480)
    make_data(args.data, args.steps, *size)
    from mapanything_ext.config import compose_training

    init = args.work / "init.safetensors"
    cfg = compose_training(overrides(args, args.work / "unused", init))
    if args.theirs_only:
        theirs(args, cfg, init, args.work / "theirs")
        return
    initial_weights(cfg, init)
    results = {}
    for variant in args.variants.split(","):
        out = args.work / variant
        started = time.time()
        if variant == "theirs":
            command = [sys.executable, __file__, "--data", str(args.data), "--work", str(args.work), "--steps",
                       str(args.steps), "--workers", str(args.workers), "--theirs-only", *(["--tiny"] if args.tiny else [])]
        else:
            command = [sys.executable, "-m", "mapanything_ext.train.training", *overrides(args, out, init),
                       *VARIANTS[variant]]
        log(f"{variant}: running")
        proc = subprocess.run(command, cwd=REPO, capture_output=True, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        (args.work / f"{variant}.log").write_text(proc.stdout + proc.stderr)
        if proc.returncode != 0:
            log(f"{variant} FAILED ({proc.returncode}): {proc.stderr[-2000:]}")
            continue
        events = scalars(out if variant == "theirs" else out / "tensorboard", "train_loss")
        results[variant] = {"seconds": time.time() - started, "losses": [v for _, _, v in events],
                            "images_per_s": rate(events, 4)}
        if variant == "theirs":
            results[variant]["peak_gib"] = json.loads((out / "peak.json").read_text())["peak_gib"]
        else:
            record = json.loads((out / "log.txt").read_text().splitlines()[-1])
            results[variant]["peak_gib"] = record.get("peak_mem_allocated_gib", float("nan"))
        log(f"{variant}: {len(events)} steps, {results[variant]['images_per_s']:.2f} images/s")
        for checkpoint in out.glob("*.pth"):  # 15 GB each: the disk holds a few
            checkpoint.unlink()
    report(results, args.work)


def report(results: dict, work: Path) -> None:
    base = results.get("theirs")
    print("\n| loop | images/s (steps 10..N) | vs MapAnything's | peak GiB | largest loss difference (relative) | mean |")
    print("|---|---|---|---|---|---|")
    for name, result in results.items():
        if base and name != "theirs":
            diffs = [abs(a - b) / abs(b) for a, b in zip(result["losses"], base["losses"])]
            worst, mean = f"{max(diffs):.2e} (step {diffs.index(max(diffs))})", f"{sum(diffs) / len(diffs):.2e}"
            ratio = f"{result['images_per_s'] / base['images_per_s']:.2f}x"
        else:
            worst = mean = ratio = "-"
        print(f"| {name} | {result['images_per_s']:.2f} | {ratio} | {result['peak_gib']:.1f} | {worst} | {mean} |")
    (work / "recipe_gpu.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
