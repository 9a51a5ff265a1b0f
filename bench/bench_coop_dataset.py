"""Cooperative-dataset throughput per data-loader worker, against what one H100 consumes.

python bench/bench_coop_dataset.py [--data DIR] [--samples N] [--views 10] [--workers 0,2]

Renders (once, cached in --data) a synthetic OPV2V set at the real 800x600 size with 3
vehicles per frame, then times OPV2VCoopDataset at 518x392: decoding 2x12 PNGs, resizing,
deriving points/rays/masks. Prints a table.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader, default_collate

from mapanything_ext.datasets.opv2v import OPV2VCoopDataset
from mapanything_ext.datasets.synthetic import generate

H100_IMAGES_PER_S = 14.0  # full MapAnything training step, shared/specs/mapanything.md


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path("/tmp/mapanything_ext_bench_coop"))
    parser.add_argument("--samples", type=int, default=12)
    parser.add_argument("--views", type=int, default=10)
    parser.add_argument("--workers", default="0,2")
    args = parser.parse_args()
    if not (args.data / "opv2v").is_dir():
        generate(args.data, scenarios=2, frames=4, agents=3, seed=0, width=800, height=600, splits=("train",))
    ds = OPV2VCoopDataset(args.data / "opv2v", args.data / "opv2v_depth", "train", (518, 392), seed=0,
                          num_views=args.views, min_num_views=4)
    views_per_sample = ds.num_views_of(0)
    rows = []
    for workers in (int(w) for w in args.workers.split(",")):
        loader = DataLoader(ds, batch_size=1, shuffle=False, num_workers=workers, collate_fn=default_collate,
                            sampler=[i % len(ds) for i in range(args.samples)])
        it = iter(loader)
        next(it)  # worker start-up excluded
        started = time.perf_counter()
        count = sum(1 for _ in it)
        elapsed = time.perf_counter() - started
        rate = count / elapsed
        per_worker = rate / max(workers, 1)
        rows.append((workers, rate, rate * views_per_sample, per_worker * views_per_sample))
    print(f"\nOPV2VCoopDataset, 518x392, {views_per_sample} views/sample, {torch.get_num_threads()} torch threads")
    print(f"{'workers':>8} {'samples/s':>10} {'views/s':>9} {'views/s/worker':>15} {'workers per H100 (14 img/s)':>28}")
    for workers, rate, views, per_worker in rows:
        print(f"{workers:>8} {rate:>10.2f} {views:>9.1f} {per_worker:>15.1f} {H100_IMAGES_PER_S / per_worker:>28.2f}")


if __name__ == "__main__":
    main()
