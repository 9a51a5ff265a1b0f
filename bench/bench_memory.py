"""Peak GPU memory per stage and strategy: ddp, fsdp (with CPU offload at one GPU), the encoder frozen;
and a 24 GB card emulated (machine.gpu_memory_gib=24), where ddp runs out of memory and fsdp does not.

    python bench/bench_memory.py --work DIR [--data DIR] [--steps 4] [--nproc-per-node 1]
        [--stages stage1,stage2,stage3] [--settings ddp,fsdp_offload,frozen_encoder] [--rows stage:setting,...]
        [--cap-gib 24] [--cap-settings ddp,fsdp_offload] [--cap-stages stage1] [--tiny]

Each row is a short run of our training command (`torchrun`, the stage's own image budget and views,
Stage 3 with gradient checkpointing as its config sets it, bf16, AdamW, the full v1.1 model with
random weights from bench/gpu_stages.py) with `train_params.max_steps_per_epoch=--steps`; its figures
are the epoch's log.txt record (peak allocated and reserved GiB since the start, images/s). Checkpoints
go to /dev/shm when it has room (the figures are about the GPU, not the disk). Prints a table and
writes DIR/bench_memory.json. Needs a CUDA GPU with MapAnything installed (docs/mapanything.md).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_stages import common_overrides, log, make_data, make_pretrained, torchrun  # noqa: E402

SETTINGS = {
    "ddp": ["distributed.strategy=ddp"],
    "fsdp": ["distributed.strategy=fsdp"],
    "fsdp_offload": ["distributed.strategy=fsdp", "distributed.fsdp_offload=true"],
    "frozen_encoder": ["distributed.strategy=ddp", "train_params=freeze_encoder"],
    # the 24 GB profile as users run it: fsdp, offload when the estimate says so, checkpointing
    "gpu24g": ["machine=gpu24g"],
    # the same with Stage 3's recommended regional compile and the compiled criterion (docs/mapanything.md)
    "gpu24g_compiled": ["machine=gpu24g", "loss.compile=true",
                        "train_params.compile=[encoder.model.prepare_tokens_with_masks,encoder.model.blocks.*,"
                        "info_sharing.self_attention_blocks.*,dpt_feature_head,downstream_head]"],
}


def one_run(stage: str, setting: str, extra: list[str], work: Path, data: Path, pretrained: Path, args) -> dict:
    scratch = Path("/dev/shm") if shutil.disk_usage("/dev/shm").free > 40e9 else work
    out = scratch / f"mem_{stage}_{setting}"
    shutil.rmtree(out, ignore_errors=True)
    common = common_overrides(data, work / "unused", args)
    if any(o.startswith("machine=") for o in SETTINGS[setting]):  # the setting's profile, not common's
        common = [o for o in common if not o.startswith("machine=")]
    overrides = [*common, f"stage={stage}", f"output_dir={out}",
                 f"model.pretrained={pretrained}", "train_params.save_every_minutes=null",
                 # MapAnything's sampler makes N // (largest batch) batches: a few bench samples need repeating
                 "dataset.train_epoch_size=64", *SETTINGS[setting], *extra]
    log(f"{stage} {setting} {' '.join(extra)}")
    code = torchrun(args.nproc_per_node, overrides, log_file=work / f"mem_{stage}_{setting}.log")
    row = {"stage": stage, "setting": setting, "extra": extra, "exit": code}
    text = (out / "console.log").read_text(errors="replace") if (out / "console.log").exists() else ""
    row["out_of_memory"] = "OutOfMemoryError" in text or "CUDA out of memory" in text
    row["offloaded"] = "sharded state offloaded to host memory" in text
    if code == 0:
        record = json.loads((out / "log.txt").read_text().splitlines()[-1])
        row.update(allocated_gib=record.get("peak_mem_allocated_gib"), reserved_gib=record.get("peak_mem_reserved_gib"),
                   images_per_s=record.get("train_images_per_s"))
    shutil.rmtree(out, ignore_errors=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--data", type=Path, default=None)
    parser.add_argument("--steps", type=int, default=4, help="train_params.max_steps_per_epoch")
    parser.add_argument("--eval-steps", type=int, default=1)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--nproc-per-node", type=int, default=1)
    parser.add_argument("--stages", default="stage1,stage2,stage3")
    parser.add_argument("--settings", default="ddp,fsdp_offload,frozen_encoder")
    parser.add_argument("--rows", default=None, help="stage:setting,... instead of every stage x setting")
    parser.add_argument("--cap-gib", type=float, default=24.0, help="the emulated card (0: no emulation rows)")
    parser.add_argument("--cap-settings", default="ddp,fsdp_offload", help="the settings run on the emulated card")
    parser.add_argument("--cap-stages", default="stage1", help="the stages run on the emulated card")
    parser.add_argument("--tiny", action="store_true", help="a tiny MapAnything: checks the script anywhere")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    data = make_data(args.work, args.data)
    pretrained, _ = make_pretrained(args.work, args)
    pairs = ([tuple(row.split(":")) for row in args.rows.split(",")] if args.rows else
             [(stage, setting) for stage in args.stages.split(",") for setting in args.settings.split(",")])
    rows = [one_run(stage, setting, [], args.work, data, pretrained, args) for stage, setting in pairs]
    if args.cap_gib:
        cap = [f"machine.gpu_memory_gib={args.cap_gib:g}"]
        rows += [one_run(stage, setting, cap, args.work, data, pretrained, args)
                 for stage in args.cap_stages.split(",") for setting in args.cap_settings.split(",")]
    print("\n| stage | setting | GPUs | GPU memory | peak allocated GiB | peak reserved GiB | images/s | result |")
    print("|---|---|---|---|---|---|---|---|")
    for row in rows:
        cap = next((e.split("=")[1] + " GiB" for e in row["extra"] if "gpu_memory_gib" in e), "whole card")
        result = "ok" if row["exit"] == 0 else ("out of memory" if row["out_of_memory"] else f"exit {row['exit']}")
        figures = (f"{row['allocated_gib']:.1f} | {row['reserved_gib']:.1f} | {row['images_per_s']:.2f}"
                   if row["exit"] == 0 else "- | - | -")
        setting = f"{row['setting']}{' (offloaded)' if row.get('offloaded') else ''}"
        print(f"| {row['stage']} | {setting} | {args.nproc_per_node} | {cap} | {figures} | {result} |")
    (args.work / "bench_memory.json").write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
