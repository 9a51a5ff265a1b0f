"""The real model where users run it: MapAnything v1.1, Stage 1 -> 2 -> 3 through our own commands on a GPU.

    python bench/gpu_stages.py --work DIR [--data DIR] [--steps 6] [--eval-steps 2] [--skip-preemption]
        [--export] [--nproc-per-node 1] [--tiny] [--compile-restart [--regional | --parts LIST]
        [--restart-stage stage1|stage3] [--compile-cache DIR]]

--tiny uses a tiny MapAnything at 112x84 to check the script anywhere (a CPU too), figures meaningless.
--compile-restart measures only what a requeue costs with torch.compile on (step 7 below), nothing else.

Needs a CUDA GPU (about 60 GiB of memory for Stage 3's 12 images), MapAnything installed and the
DINOv2 hub code in $TORCH_HOME/hub (docs/mapanything.md), and ~50 GB of free disk under --work.
What it does, printing a table at the end (and writing DIR/gpu_stages.json):

 1. synthetic OPV2V data at the real 800x600 (or --data, made with
    `python -m mapanything_ext.datasets.synthetic DIR --scenarios 1 --frames 4 --agents 3 --width 800 --height 600`)
 2. a randomly initialised full v1.1 MapAnything written by its own `save_pretrained` (the Hugging Face
    layout users download): Stage 1's model.pretrained; its load report must say every entry matched
 3. unless --skip-preemption: Stage 1 under `torchrun --nproc_per_node=1`, sent a real SIGUSR2 at its
    second step (MAPANYTHING_EXT_FAULT; it stops after the third), the checkpoint verified, then resumed
    to the end of the epoch
 4. `python -m mapanything_ext.pipeline --launcher local --nproc-per-node N` with model=mapanything
    loss=overall_loss, each stage's own image budget and views, Stage 3 with gradient checkpointing,
    `train_params.max_steps_per_epoch=--steps`, one epoch per stage, bf16; Stage 2 and 3 start from the
    earlier stage's checkpoint-best.pth
 5. the per-step losses of the resumed Stage 1 against the pipeline's uninterrupted Stage 1
 6. with --export: Stage 3's best exported (python -m mapanything_ext.export), reloaded with MapAnything's
    own from_pretrained, predictions compared with our checkpoint's on a fixed input
 7. with --compile-restart (instead of 3 to 6): Stage 1 (or --restart-stage stage3: Stage 3, its
    variable view counts and checkpointing; two epochs, the signal in the second) compiled as fast as it trains (train_params.compile=
    [encoder,info_sharing,dpt_feature_head,downstream_head] and loss.compile=true; --regional: the encoder
    and info sharing block by block; --parts: any list), stopped by SIGUSR2 at its
    second step (the job stops after its third), then started again in the same run folder
    (a requeue): time from start to the first training step of both starts, and what the second took
    from the run's compile cache (train_params.compile_cache, <run>/compile_cache/; --compile-cache DIR:
    a shared one, e.g. the folder bench_stage3_mix.py filled, so that both starts find it warm)
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

TINY = ["model.encoder.size=small", "model.encoder.keep_first_n_layers=2", "model.info_sharing.module_args.depth=3",
        "model.info_sharing.module_args.dim=192", "model.info_sharing.module_args.num_heads=3",
        "model.info_sharing.module_args.indices=[0,1]", "model.pred_head.feature_head.feature_dim=32",
        "dataset.resolution_train=[112,84]", "dataset.resolution_test=[112,84]"]
STAGE_DIRS = {"stage1": "opv2v_ft_stage1", "stage2": "opv2v_coop_stage2_full", "stage3": "opv2v_coop_stage3_varviews"}
# Keep NVLink multicast off wherever several GPUs share a host (it can take a host's GPUs down).
NO_MULTICAST = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


def log(message: str) -> None:
    print(f"[gpu_stages {time.strftime('%H:%M:%S')}] {message}", flush=True)


def make_data(work: Path, given: Path | None) -> Path:
    if given:
        return given
    from mapanything_ext.datasets.synthetic import generate

    root = work / "data"
    if not (root / "opv2v").is_dir():
        log("rendering synthetic OPV2V at 800x600 (a few minutes on one core)")
        generate(root, scenarios=1, frames=4, agents=3, seed=0, width=800, height=600, verbose=False)
    return root


def make_pretrained(work: Path, args) -> tuple[Path, dict]:
    """A random v1.1 model in the official Hugging Face layout, through MapAnything's save_pretrained."""
    import torch

    from mapanything_ext.config import compose_training
    from mapanything_ext.models.mapanything_adapter import save_hf_folder
    from mapanything_ext.models.registry import build_model_on

    folder = work / "map-anything-v1.1-random"
    if (folder / "model.safetensors").is_file():
        return folder, {}
    cfg = compose_training(["model=mapanything", "loss=overall_loss", *(TINY if args.tiny else [])])
    started = time.perf_counter()
    torch.manual_seed(0)
    model = build_model_on(cfg.model, torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    built = time.perf_counter() - started
    save_hf_folder(model, cfg.model, folder)
    size = sum(p.stat().st_size for p in folder.iterdir())
    log(f"random v1.1 model: built in {built:.0f}s, save_pretrained -> {folder} ({size / 1e9:.2f} GB) in "
        f"{time.perf_counter() - started - built:.0f}s")
    return folder, {"hf_folder_gb": size / 1e9}


def common_overrides(data: Path, experiments: Path, args) -> list[str]:
    return [
        "machine=local", "model=mapanything", "loss=overall_loss",
        f"machine.opv2v_root={data / 'opv2v'}", f"machine.opv2v_depth_root={data / 'opv2v_depth'}",
        f"machine.root_experiments_dir={experiments}", f"machine.num_workers={args.workers}",
        "train_params.epochs=1", "train_params.warmup_epochs=0.5", f"train_params.max_steps_per_epoch={args.steps}",
        f"train_params.max_eval_steps={args.eval_steps}", "train_params.print_freq=1",
        "train_params.gradient_clip=1.0", *(TINY if args.tiny else []),
    ]


def torchrun(nproc: int, overrides: list[str], env_extra: dict | None = None, log_file: Path | None = None) -> int:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "mapanything_ext.train.training", *overrides]
    env = {**os.environ, **NO_MULTICAST, **(env_extra or {})}
    with open(log_file, "a") if log_file else open(os.devnull, "w") as out:
        return subprocess.run(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT).returncode


def verify_seconds(path: Path) -> float:
    from mapanything_ext.checkpoint import verify_checkpoint

    started = time.perf_counter()
    result = verify_checkpoint(path)
    if not result.valid:
        raise RuntimeError(f"{path} does not verify: {result.reason}")
    return time.perf_counter() - started


def step_losses(run_dir: Path) -> dict[int, float]:
    """train/loss per global step from the run's TensorBoard files (print_freq=1)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    losses = {}
    for events in sorted((run_dir / "tensorboard").glob("events.*")):
        acc = EventAccumulator(str(events), size_guidance={"scalars": 0})
        acc.Reload()
        if "train/loss" in acc.Tags()["scalars"]:
            losses.update({e.step: e.value for e in acc.Scalars("train/loss")})
    return losses


def console_figures(run_dir: Path) -> dict:
    text = (run_dir / "console.log").read_text(errors="replace")
    first = [float(x) for x in re.findall(r"first training step done ([\d.]+)s after start", text)]
    saves = re.findall(r"saved (\S+)(?: \(linked as [^)]*\))? \([^)]*, ([\d.]+) GB\) in ([\d.]+)s", text)
    matched = "(every entry matched)" in text
    return {"first_step_s": first, "saves": [(n, float(gb), float(s)) for n, gb, s in saves],
            "pretrained_every_entry_matched": matched}


def preemption(data: Path, work: Path, pretrained: Path, args) -> dict:
    """Stage 1 sent SIGUSR2 at its second step (stops after the third), verified, resumed; figures."""
    run_dir = work / "preempted_stage1"
    shutil.rmtree(run_dir, ignore_errors=True)
    overrides = [*common_overrides(data, work / "unused", args), "stage=stage1", f"output_dir={run_dir}",
                 f"model.pretrained={pretrained}"]
    console = work / "preempted_stage1.log"
    log("Stage 1 with a SIGUSR2 at its second step")
    code = torchrun(args.nproc_per_node, overrides, {"MAPANYTHING_EXT_FAULT": "SIGUSR2@train_step@0"}, console)
    if code == 0:
        raise RuntimeError(f"the preempted run did not stop (see {console})")
    text = (run_dir / "console.log").read_text()
    line = [ln for ln in text.splitlines() if ln.startswith("[preemption]")][-1]
    signal_to_saved = float(re.search(r"([\d.]+)s after the signal", line).group(1))
    verify_s = verify_seconds(run_dir / "checkpoint-last.pth")
    log(f"stopped: {line}; verified in {verify_s:.1f}s")
    restarted = time.monotonic()
    if torchrun(args.nproc_per_node, overrides, log_file=console) != 0:
        raise RuntimeError(f"the resumed run failed (see {console})")
    first = console_figures(run_dir)["first_step_s"][-1]
    log(f"resumed run finished in {time.monotonic() - restarted:.0f}s; first step {first:.1f}s after its start")
    figures = {"stop_line": line, "signal_to_saved_s": signal_to_saved, "verify_s": verify_s,
               "resumed_first_step_s": first, "checkpoint_gb": (run_dir / "checkpoint-last.pth").stat().st_size / 1e9,
               "step_losses": step_losses(run_dir)}
    for checkpoint in run_dir.glob("*.pth"):  # disk: the pipeline's three stages need it
        checkpoint.unlink()
    return figures


def pipeline(data: Path, work: Path, pretrained: Path, args) -> dict:
    experiments = work / "experiments"
    cmd = [sys.executable, "-m", "mapanything_ext.pipeline", "--launcher", "local",
           "--nproc-per-node", str(args.nproc_per_node), *common_overrides(data, experiments, args),
           f"model.pretrained={pretrained}"]
    log("pipeline: " + " ".join(cmd[1:]))
    started = time.monotonic()
    with open(work / "pipeline.log", "a") as out:
        code = subprocess.run(cmd, cwd=REPO, env={**os.environ, **NO_MULTICAST}, stdout=out,
                              stderr=subprocess.STDOUT).returncode
    if code != 0:
        raise RuntimeError(f"the pipeline failed (see {work / 'pipeline.log'})")
    log(f"pipeline done in {time.monotonic() - started:.0f}s")
    from mapanything_ext.run_log import read_epoch_records

    rows = {}
    for stage, folder in STAGE_DIRS.items():
        run_dir = experiments / folder
        record = read_epoch_records(run_dir)[-1]
        losses = step_losses(run_dir)
        figures = console_figures(run_dir)
        best = run_dir / "checkpoint-best.pth"
        rows[stage] = {
            "images_per_s": record.get("train_images_per_s"),
            "peak_allocated_gib": record.get("peak_mem_allocated_gib"),
            "peak_reserved_gib": record.get("peak_mem_reserved_gib"),
            "checkpoint_gb": best.stat().st_size / 1e9,
            "names_sharing_one_file": best.stat().st_nlink,
            "save_s": figures["saves"][-1][2] if figures["saves"] else None,
            "verify_s": verify_seconds(best),
            "first_step_s": figures["first_step_s"][0] if figures["first_step_s"] else None,
            "first_loss": losses[min(losses)], "last_loss": losses[max(losses)], "steps": len(losses),
            "pretrained_every_entry_matched": figures["pretrained_every_entry_matched"],
        }
    return rows


# The settings docs/mapanything.md recommends. Not _encode_and_fuse_optional_geometric_inputs: it
# breaks into 16 small graphs whose loading cost 37 to 41 s at every start on an H200, for no speed.
COMPILED_PARTS = "[encoder,info_sharing,dpt_feature_head,downstream_head]"
REGIONAL_PARTS = ("[encoder.model.prepare_tokens_with_masks,encoder.model.blocks.*,info_sharing.self_attention_blocks.*,"
                  "dpt_feature_head,downstream_head]")


def compile_restart(data: Path, work: Path, pretrained: Path, args) -> dict:
    """A stage compiled, preempted at its second step, requeued: the start-up cost of both starts."""
    if args.steps < 4:  # the signal at step 2 stops the job after step 3 (the stop poll answers a step late)
        raise SystemExit("--compile-restart needs --steps 4 or more (the requeued start must have a step left)")
    stage = args.restart_stage
    run_dir = work / f"compile_restart_{stage}"
    shutil.rmtree(run_dir, ignore_errors=True)  # a cold first start: its compile cache lies in the run folder
    parts = args.parts or (REGIONAL_PARTS if args.regional else COMPILED_PARTS)
    overrides = [*common_overrides(data, work / "unused", args), f"stage={stage}", f"output_dir={run_dir}",
                 f"model.pretrained={pretrained}", f"train_params.compile={parts}", "loss.compile=true"]
    if args.compile_cache:
        overrides.append(f"train_params.compile_cache={args.compile_cache.absolute()}")
    fault, when = "SIGUSR2@train_step@0", "its second step"
    if stage == "stage3":
        # The synthetic data repeated, as bench_stage3_mix does (its view counts need samples), and two
        # epochs, stopped at the second one's second step: the first start has seen a whole epoch of
        # shapes, as a preempted Stage 3 has, so the requeue's first batch is a shape seen before, but
        # not necessarily the shape the first start compiled first.
        overrides = [o for o in overrides if not o.startswith("train_params.epochs=")]
        overrides += ["dataset.train_epoch_size=600", "train_params.epochs=2"]
        fault, when = "SIGUSR2@train_step@0@2", "the second step of its second epoch"
    console = work / f"compile_restart_{stage}.log"
    log(f"{stage}, train_params.compile={parts}, loss.compile=true: first start "
        f"({'the shared compile cache ' + str(args.compile_cache) if args.compile_cache else 'cold compile cache'}), "
        f"SIGUSR2 at {when}")
    if torchrun(args.nproc_per_node, overrides, {"MAPANYTHING_EXT_FAULT": fault}, console) == 0:
        raise RuntimeError(f"the first start did not stop (see {console})")
    log("the same run started again (a requeue)")
    if torchrun(args.nproc_per_node, overrides, log_file=console) != 0:
        raise RuntimeError(f"the requeued start failed (see {console})")
    text = (run_dir / "console.log").read_text(errors="replace")
    first = console_figures(run_dir)["first_step_s"]
    cache = args.compile_cache or run_dir / "compile_cache"
    figures = {"first_step_s": first,
               "cache_at_start": re.findall(r"\[compile_cache\] torch\.compile cache: \S+ \((.*?), checked in", text),
               "cache_at_first_step": re.findall(r"\[compile_cache\] first step: (.*)", text),
               "cache_mb": sum(p.stat().st_size for p in cache.rglob("*") if p.is_file()) / 1e6}
    for start, seconds, state, hits in zip(("first start", "requeued start"), first, figures["cache_at_start"],
                                           figures["cache_at_first_step"]):
        log(f"{start}: first training step {seconds:.1f}s after start; cache at start: {state}; {hits}")
    for checkpoint in run_dir.glob("*.pth"):  # disk
        checkpoint.unlink()
    return figures


def compare_losses(straight: Path, resumed: dict) -> dict:
    a, b = step_losses(straight), resumed
    common = sorted(set(a) & set(b))
    diffs = {step: abs(a[step] - b[step]) / max(abs(a[step]), 1e-12) for step in common}
    return {"steps": common, "straight": [a[s] for s in common], "resumed": [b[s] for s in common],
            "max_rel_diff": max(diffs.values()) if diffs else None,
            "bitwise_equal_steps": [s for s in common if a[s] == b[s]]}


def export_round_trip(work: Path, data: Path, best: Path, args) -> dict:
    import torch

    from mapanything_ext.config import compose_training
    from mapanything_ext.evaluation.predict import batch_of_one, load_model
    from mapanything_ext.export import export
    from mapanything_ext.models.mapanything_adapter import import_mapanything
    from mapanything_ext.datasets.build import build_dataset

    folder = work / "exported_stage3"
    started = time.perf_counter()
    export(best, folder)
    seconds = time.perf_counter() - started
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cfg = compose_training(["model=mapanything", "loss=overall_loss", f"machine.opv2v_root={data / 'opv2v'}",
                            f"machine.opv2v_depth_root={data / 'opv2v_depth'}", *(TINY if args.tiny else [])])
    views = batch_of_one(build_dataset(cfg.dataset.test_dataset)[0], device)  # 4 views at 518x392
    ours = load_model(best, cfg.model, device)
    with torch.no_grad():
        a = [{k: v.float().cpu() for k, v in p.items() if torch.is_tensor(v)} for p in ours(views)]
    del ours
    theirs = import_mapanything("mapanything.models").MapAnything.from_pretrained(str(folder)).to(device).eval()
    with torch.no_grad():
        b = [{k: v.float().cpu() for k, v in p.items() if torch.is_tensor(v)} for p in theirs(views)]
    worst = max(float((x[k] - y[k]).abs().max()) for x, y in zip(a, b) for k in x)
    size = sum(p.stat().st_size for p in folder.iterdir()) / 1e9
    return {"export_s": seconds, "folder_gb": size, "max_abs_prediction_diff": worst,
            "equal": worst == 0.0}


COLUMNS = (("images/s", "images_per_s", "{:.2f}"), ("peak alloc GiB", "peak_allocated_gib", "{:.1f}"),
           ("peak reserved GiB", "peak_reserved_gib", "{:.1f}"), ("checkpoint GB", "checkpoint_gb", "{:.2f}"),
           ("names on it", "names_sharing_one_file", "{}"), ("save s", "save_s", "{:.1f}"),
           ("verify s", "verify_s", "{:.1f}"), ("first step s", "first_step_s", "{:.1f}"),
           ("first loss", "first_loss", "{:.4f}"), ("last loss", "last_loss", "{:.4f}"))


def table(rows: dict) -> str:
    lines = ["| stage | " + " | ".join(title for title, _, _ in COLUMNS) + " |", "|---" * (len(COLUMNS) + 1) + "|"]
    for stage, row in rows.items():
        cells = ["-" if row.get(key) is None else form.format(row[key]) for _, key, form in COLUMNS]
        lines.append(f"| {stage} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--data", type=Path, default=None)
    parser.add_argument("--steps", type=int, default=6, help="train_params.max_steps_per_epoch of every stage")
    parser.add_argument("--eval-steps", type=int, default=2, help="train_params.max_eval_steps")
    parser.add_argument("--workers", type=int, default=4, help="machine.num_workers")
    parser.add_argument("--nproc-per-node", type=int, default=1)
    parser.add_argument("--skip-preemption", action="store_true")
    parser.add_argument("--export", action="store_true")
    parser.add_argument("--tiny", action="store_true", help="a tiny MapAnything at 112x84: checks the script anywhere")
    parser.add_argument("--compile-restart", action="store_true",
                        help="only: a stage compiled, preempted at its second step and started again; time to the "
                             "first step of both starts (the compile cache of the run folder)")
    parser.add_argument("--regional", action="store_true",
                        help="with --compile-restart: the encoder and info sharing compiled block by block")
    parser.add_argument("--restart-stage", choices=("stage1", "stage3"), default="stage1",
                        help="with --compile-restart: the stage started twice (stage3: its variable view counts)")
    parser.add_argument("--parts", default=None,
                        help="with --compile-restart: train_params.compile as a list, e.g. '[encoder,info_sharing]' "
                             "(instead of the whole or --regional parts)")
    parser.add_argument("--compile-cache", type=Path, default=None,
                        help="with --compile-restart: train_params.compile_cache=DIR, a cache folder shared beyond "
                             "the run (a profile's machine.compile_cache), e.g. one a benchmark filled: both starts "
                             "find it warm (default: the run's own, cold at the first start)")
    args = parser.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    results: dict = {}
    data = make_data(args.work, args.data)
    pretrained, results["pretrained"] = make_pretrained(args.work, args)
    if args.compile_restart:
        results["compile_restart"] = compile_restart(data, args.work, pretrained, args)
        (args.work / "gpu_stages.json").write_text(json.dumps(results, indent=1) + "\n")
        print(json.dumps(results, indent=1))
        return 0
    if not args.skip_preemption:
        results["preemption"] = preemption(data, args.work, pretrained, args)
    results["stages"] = pipeline(data, args.work, pretrained, args)
    if not args.skip_preemption:
        straight = args.work / "experiments" / STAGE_DIRS["stage1"]
        results["preemption"]["losses"] = compare_losses(straight, results["preemption"].pop("step_losses"))
    if args.export:
        results["export"] = export_round_trip(args.work, data, args.work / "experiments" / STAGE_DIRS["stage3"] /
                                              "checkpoint-best.pth", args)
    (args.work / "gpu_stages.json").write_text(json.dumps(results, indent=1) + "\n")
    print(table(results["stages"]))
    print(json.dumps({k: v for k, v in results.items() if k != "stages"}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
