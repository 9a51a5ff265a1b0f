"""Cooperative-dataset throughput per data-loader worker, and how many workers one GPU needs.

python bench/bench_coop_dataset.py [--data DIR] [--samples 40] [--views 10] [--workers 0,1,2]
                                   [--geometry device,workers] [--gpu-images-per-s 30]
                                   [--opv2v-root R --depth-root D [--split S]]

Without --opv2v-root it renders (once, cached in --data) a synthetic OPV2V set at the real
800x600 size, 2 scenarios x 4 frames x 3 vehicles, and times OPV2VCoopDataset at 518x392 on
it: per sample, read 3 frame YAMLs, decode 10 camera PNGs and 10 depth PNGs (only the cameras
the sample uses), resize (LANCZOS image, nearest depth), centre-crop, derive points/rays/masks,
and default_collate the sample (batch_size=1, as a training batch of one sample). With
--opv2v-root/--depth-root it times a real OPV2V copy instead (the first --samples samples of
--split). Files are read from the page cache after the first pass (disk speed is not measured).

Each row is one DataLoader with `workers` worker processes (0: the loading runs in this
process), with the per-pixel geometry derived on the training device (`device`: lean views, the
training default, train_params.geometry_on_device; that derivation is not timed here, it runs on
the GPU) or in the workers (`workers`: full views, as dataset[i] returns them). Every worker runs
with one torch thread (DataLoader's default); this process is set to one thread too (--threads),
so the 0-worker row is one worker's speed without the inter-process transfer. The first batch
(worker start-up) is not timed. Columns:
  samples/s, views/s      batches and views delivered per second
  views/s/worker          views/s divided by max(workers, 1)
  views/CPU-s             views per CPU second the workers (0 workers: this process) used:
                          a worker's speed with a core to itself, still meaningful on a busy
                          machine where the wall-clock columns are not (Linux /proc; else nan)
  workers/GPU             --gpu-images-per-s divided by views/s/worker: how many workers keep
                          one GPU's training step fed (MapAnything on an H200: ~17 images/s
                          today, 30 is 1.8x that)
  num_workers             workers/GPU rounded up, plus one spare: what a machine profile's
                          num_workers (configs/machine/*.yaml) should be, per GPU
The rows with several workers only mean something on a machine with that many free cores
(each worker is one busy core; the training process needs its own).
"""

from __future__ import annotations

import argparse
import math
import os
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader, default_collate

from mapanything_ext.datasets.opv2v import OPV2VCoopDataset
from mapanything_ext.datasets.synthetic import generate

try:
    from mapanything_ext.datasets.png_io import PNG_DECODER
except ImportError:  # a checkout from before png_io (for before/after comparisons)
    PNG_DECODER = "pillow"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path("/tmp/mapanything_ext_bench_coop"),
                        help="where the synthetic set is rendered and cached")
    parser.add_argument("--opv2v-root", type=Path, help="time a real OPV2V copy (with --depth-root) instead")
    parser.add_argument("--depth-root", type=Path)
    parser.add_argument("--split", default="train")
    parser.add_argument("--samples", type=int, default=40, help="samples per row (cycled if the set is smaller)")
    parser.add_argument("--views", type=int, default=10, help="num_views cap of the dataset")
    parser.add_argument("--workers", default="0,1,2", help="comma-separated worker counts, one row each")
    parser.add_argument("--gpu-images-per-s", type=float, default=30.0,
                        help="images/s one GPU's training step consumes (default 30: 1.8x MapAnything's ~17 on an H200)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of this process (workers always use 1)")
    parser.add_argument("--geometry", default="device,workers",
                        help="where the per-pixel geometry is derived, one block of rows each: device (lean views, "
                             "train_params.geometry_on_device=true, the training default) and/or workers")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.opv2v_root is None:
        if not (args.data / "opv2v").is_dir():
            generate(args.data, scenarios=2, frames=4, agents=3, seed=0, width=800, height=600, splits=("train",))
        root, depth_root = args.data / "opv2v", args.data / "opv2v_depth"
    else:
        if args.depth_root is None:
            parser.error("--opv2v-root needs --depth-root")
        root, depth_root = args.opv2v_root, args.depth_root
    ds = OPV2VCoopDataset(root, depth_root, args.split, (518, 392), seed=0, num_views=args.views, min_num_views=4)
    order = [i % len(ds) for i in range(args.samples + 1)]
    rows = []
    for geometry, workers in [(g, int(w)) for g in args.geometry.split(",") for w in args.workers.split(",")]:
        if geometry not in ("device", "workers"):
            parser.error(f"--geometry {geometry!r}: device or workers")
        ds.geometry_on_device = geometry == "device"
        loader = DataLoader(ds, batch_size=1, shuffle=False, num_workers=workers, collate_fn=default_collate,
                            sampler=order)
        it = iter(loader)
        next(it)  # worker start-up excluded
        pids = [w.pid for w in getattr(it, "_workers", [])]
        cpu_started = _cpu_seconds(pids)
        started = time.perf_counter()
        views = sum(len(next(it)) for _ in range(args.samples))  # not to the end: workers exit there
        elapsed = time.perf_counter() - started
        cpu = _cpu_seconds(pids) - cpu_started
        del it, loader
        per_worker = views / elapsed / max(workers, 1)
        per_cpu = views / cpu if cpu > 0 else math.nan
        rows.append((geometry, workers, args.samples / elapsed, views / elapsed, per_worker, per_cpu,
                     args.gpu_images_per_s / per_worker))
    mean_views = sum(ds.num_views_of(i) for i in order[1:]) / args.samples
    print(f"\nOPV2VCoopDataset {root}, 518x392, {mean_views:.1f} views/sample, PNG decoder: {PNG_DECODER}, "
          f"torch threads: {torch.get_num_threads()} here, 1 per worker")
    print(f"{'geometry':>9} {'workers':>8} {'samples/s':>10} {'views/s':>9} {'views/s/worker':>15} {'views/CPU-s':>12} "
          f"{f'workers/GPU ({args.gpu_images_per_s:g} img/s)':>28} {'num_workers':>12}")
    for geometry, workers, rate, views, per_worker, per_cpu, needed in rows:
        print(f"{geometry:>9} {workers:>8} {rate:>10.2f} {views:>9.1f} {per_worker:>15.1f} {per_cpu:>12.1f} "
              f"{needed:>28.2f} {math.ceil(needed) + 1:>12}")


def _cpu_seconds(pids: list[int]) -> float:
    """CPU time (user + system) of the worker processes, or of this process when there are none."""
    if not pids:
        return time.process_time()
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            return math.nan  # not Linux: the column stays empty
        total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15 of stat)
    return total / os.sysconf("SC_CLK_TCK")


if __name__ == "__main__":
    main()
