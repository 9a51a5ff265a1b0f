"""The README's first command: synthetic OPV2V -> Stage 1 (compact model, CPU) -> evaluation.

python -m mapanything_ext.demo [--out DIR] [--epochs N] [--fresh]

Every step is the ordinary user command, run as a subprocess and printed first, so
the demo doubles as a worked example. Outputs land in the checkout by default:
data/synthetic (the dataset), experiments/demo_stage1 (checkpoints, log.txt,
console.log, TensorBoard) and experiments/demo_stage1/eval (metrics and plots).
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

from mapanything_ext.config import REPO_ROOT
from mapanything_ext.run_log import read_epoch_records, test_statistic

# Small images and a short, brisk schedule so the demo finishes in minutes on 2 CPU cores.
DEMO_TRAIN_OVERRIDES = [
    "dataset.resolution_train=[112,84]",
    "dataset.resolution_test=[112,84]",
    "train_params.max_num_of_imgs_per_gpu=8",
    "train_params.lr=1e-3",
    "train_params.min_lr=1e-5",
    "train_params.warmup_epochs=1",
    "train_params.print_freq=5",
    "train_params.eval_before_training=true",
]
DEMO_DATA_ARGS = ["--scenarios", "3", "--frames", "8", "--agents", "3", "--width", "200", "--height", "150"]


def _run(cmd: list[str]) -> None:
    print("\n$ " + " ".join(shlex.quote(c) for c in cmd), flush=True)
    subprocess.run(cmd, check=True, cwd=REPO_ROOT)


def before_and_after(output_dir: Path, key: str) -> tuple[float, float]:
    """A held-out statistic (`loss_med`, `depth_abs_rel_avg`, ...) of the initial model and after the last
    epoch (log.txt names it `<test set>_<key>`)."""
    initial = json.loads((output_dir / "initial_eval.json").read_text())[key]
    values = [test_statistic(record, key) for record in read_epoch_records(output_dir)]
    return initial, [value for value in values if value is not None][-1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=REPO_ROOT / "data" / "synthetic",
                        help="where the synthetic OPV2V dataset is written (default: data/synthetic)")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "experiments" / "demo_stage1",
                        help="training output directory (default: experiments/demo_stage1)")
    parser.add_argument("--epochs", type=int, default=6, help="Stage-1 epochs (default 6)")
    parser.add_argument("--fresh", action="store_true", help="delete earlier demo outputs first")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    if args.fresh:
        shutil.rmtree(args.out, ignore_errors=True)
    py = sys.executable
    if not (args.data / "opv2v").is_dir():
        _run([py, "-m", "mapanything_ext.datasets.synthetic", str(args.data), *DEMO_DATA_ARGS])
    _run([py, "-m", "mapanything_ext.train.training", "machine=local", "stage=stage1", "model=compact",
          "loss=compact_loss", "distributed.world_size=1", f"machine.opv2v_root={args.data / 'opv2v'}",
          f"machine.opv2v_depth_root={args.data / 'opv2v_depth'}", f"train_params.epochs={args.epochs}",
          f"output_dir={args.out}", *DEMO_TRAIN_OVERRIDES])
    evaluation = args.out / "eval"
    _run([py, "-m", "mapanything_ext.evaluate", f"checkpoint={args.out / 'checkpoint-best.pth'}", "machine=local",
          "dataset=opv2v_coop_ft", f"machine.opv2v_root={args.data / 'opv2v'}",
          f"machine.opv2v_depth_root={args.data / 'opv2v_depth'}", "dataset.resolution_test=[112,84]",
          f"output_dir={evaluation}"])
    log = args.out / "log.txt"
    loss0, loss1 = before_and_after(args.out, "loss_med")
    rel0, rel1 = before_and_after(args.out, "depth_abs_rel_avg")
    print(f"\n[demo] done in {time.perf_counter() - started:.0f}s")
    print(f"[demo] held-out loss (median) before training {loss0:.4f} -> after {loss1:.4f}")
    print(f"[demo] held-out depth AbsRel  before training {rel0:.4f} -> after {rel1:.4f}")
    print(f"[demo] data:        {args.data}")
    print(f"[demo] checkpoints: {args.out}/checkpoint-{{best,last,final}}.pth")
    print(f"[demo] logs:        {log}, {args.out / 'console.log'}, {args.out / 'tensorboard'}")
    print(f"[demo] evaluation:  {evaluation / 'table.md'} (single vehicle vs cooperative), {evaluation / 'metrics.json'}")
    print(f"[demo] plots:       {evaluation}/loss_curves.png, metric_vs_views.png, depth_errors_*.png")
    print(f"[demo] 3-D:         {evaluation}/*_side_by_side.ply (truth | prediction; MeshLab, Open3D, CloudCompare)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
