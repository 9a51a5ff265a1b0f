"""What a mid-epoch background save costs training: the stall of the steps around it and the throughput.

    python bench/bench_background_save.py --work DIR [--data DIR] [--steps 300] [--every-minutes 0.4] [--tiny]

Runs Stage 1 of the full MapAnything v1.1 (random weights, bench/gpu_stages.py's model and data) twice
under `torchrun --nproc_per_node=1`, the same batches each time: once without mid-epoch saves, once
with `train_params.save_every_minutes=--every-minutes`. Each step's wall time comes from the
`[train]` lines (print_freq=1; the view count fixed at Stage 1's 4, so every step has the same work); the table gives, for each background save, its queueing time, its
write time, and the excess of the three steps after it over the median step of the run without saves
(the stall), then the images/s of both runs over the same steps and the cost of one save in seconds,
and so the throughput cost of one save every 10 minutes (that cost / 600 s). Needs a CUDA GPU with
MapAnything installed (docs/mapanything.md) and ~45 GB of free disk under --work.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_stages import common_overrides, log, make_data, make_pretrained, torchrun  # noqa: E402

STEP = re.compile(r"^\[train\] epoch 1 step (\d+)/\d+: .* step ([\d.]+)s,")
STARTED = re.compile(r"background save of global step (\d+) started \(([\d.]+) GiB .* queued in ([\d.]+)s\)")
WRITTEN = re.compile(r"background save of global step (\d+) written to \S+ in ([\d.]+)s")
EPOCH_SAVE = re.compile(r"saved checkpoint-last\.pth.*\(epoch \d+, \d+ batches done, ([\d.]+) GB\) in ([\d.]+)s")
SKIP_FIRST = 5  # compilation of kernels, cuDNN autotuning, loader warm-up


def run(name: str, work: Path, data: Path, pretrained: Path, args, extra: list[str]) -> dict:
    out = work / name
    shutil.rmtree(out, ignore_errors=True)
    overrides = [*common_overrides(data, work / "unused", args), "stage=stage1", f"output_dir={out}",
                 f"model.pretrained={pretrained}", f"dataset.train_epoch_size={args.steps}",
                 "dataset.train.variable_num_views=false", "train_params.save_every_minutes=null", *extra]
    log(f"{name}: {' '.join(extra) or 'no mid-epoch saves'}")
    if torchrun(1, overrides, log_file=work / f"{name}.log") != 0:
        raise RuntimeError(f"{name} failed (see {work / f'{name}.log'})")
    text = (out / "console.log").read_text(errors="replace")
    walls = {int(m[1]): float(m[2]) for m in map(STEP.match, text.splitlines()) if m}
    started = [(int(g), float(gib), float(q)) for g, gib, q in STARTED.findall(text)]
    written = {int(g): float(s) for g, s in WRITTEN.findall(text)}
    epoch_save = EPOCH_SAVE.findall(text)
    for checkpoint in out.glob("*.pth"):  # disk for the next run
        checkpoint.unlink()
    return {"walls": walls, "started": started, "written": written,
            "epoch_save": [(float(gb), float(s)) for gb, s in epoch_save]}


def table(plain: dict, saving: dict, images_per_step: int) -> tuple[str, dict]:
    last = max(plain["walls"])
    steps = [s for s in plain["walls"] if SKIP_FIRST < s < last and s in saving["walls"]]
    median = statistics.median(plain["walls"][s] for s in steps)
    rows = ["| save at step | to host (GiB) | queued in (s) | written in (s) | 3 steps after it (s) | stall (s) |",
            "|---|---|---|---|---|---|"]
    stalls = []
    for step, gib, queued in saving["started"]:
        after = [saving["walls"].get(step + k, median) for k in (1, 2, 3)]
        stall = sum(after) - 3 * median
        stalls.append(stall)
        rows.append(f"| {step} | {gib:.2f} | {queued:.2f} | {saving['written'].get(step, float('nan')):.1f} | "
                    f"{' / '.join(f'{w:.2f}' for w in after)} | {stall:.2f} |")
    plain_s = sum(plain["walls"][s] for s in steps)
    saving_s = sum(saving["walls"][s] for s in steps)
    saves = max(len(saving["started"]), 1)
    per_save = (saving_s - plain_s) / saves
    figures = {"median_step_s": median, "steps": len(steps), "stalls_s": stalls,
               "images_per_s_without": images_per_step * len(steps) / plain_s,
               "images_per_s_with": images_per_step * len(steps) / saving_s,
               "seconds_per_save": per_save, "cost_every_10_min_percent": 100 * per_save / 600,
               "epoch_end_save": plain["epoch_save"]}
    rows += ["", "| run | steps timed | images/s | background saves |", "|---|---|---|---|",
             f"| without mid-epoch saves | {len(steps)} | {figures['images_per_s_without']:.2f} | 0 |",
             f"| with them | {len(steps)} | {figures['images_per_s_with']:.2f} | {len(saving['started'])} |",
             "", f"median step {median:.3f}s; one save costs {per_save:.2f}s of training over the steps timed, "
             f"so one save every 10 minutes costs {figures['cost_every_10_min_percent']:.2f}% of throughput; "
             f"the blocking epoch-end save of the same state: {plain['epoch_save']}"]
    return "\n".join(rows), figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--data", type=Path, default=None)
    parser.add_argument("--steps", type=int, default=300, help="training steps of each run (one epoch)")
    parser.add_argument("--every-minutes", type=float, default=0.4, help="train_params.save_every_minutes")
    parser.add_argument("--workers", type=int, default=4, help="machine.num_workers")
    parser.add_argument("--eval-steps", type=int, default=1)
    parser.add_argument("--tiny", action="store_true", help="a tiny MapAnything: checks the script anywhere")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    data = make_data(args.work, args.data)
    pretrained, _ = make_pretrained(args.work, args)
    plain = run("without", args.work, data, pretrained, args, [])
    saving = run("with", args.work, data, pretrained, args, [f"train_params.save_every_minutes={args.every_minutes}"])
    text, figures = table(plain, saving, images_per_step=4)  # Stage 1: 4 images per step and GPU
    print(text)
    (args.work / "bench_background_save.json").write_text(json.dumps(
        {"steps": args.steps, "every_minutes": args.every_minutes, **figures}, indent=1) + "\n")


if __name__ == "__main__":
    main()
