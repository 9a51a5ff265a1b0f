"""Atomic checkpoint save and verification against plain torch.save and the disk itself.

python bench/bench_checkpoint.py [--gb 2] [--dir DIR] [--repeats 2]

One synthetic checkpoint of --gb gigabytes of float32 tensors (model + AdamW-like state),
saved on the same disk: plain torch.save (page cache), plain torch.save + fsync (what a
durable write costs), our save_on_master (temp file, fsync, rename, directory fsync),
verify_checkpoint (zip CRC-32 streamed, mmap load, finiteness), and `dd` sequential
write speed with conv=fsync. Prints a table.

Plain torch.save overwrites its file in place, reusing the blocks it frees; an atomic save
must write a second file while the old one still exists. On disks where fresh blocks cost
more (thin-provisioned virtual disks), that alone dominates, so the table also shows
torch.save + fsync to a new file: the like-for-like baseline.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import time
from pathlib import Path

import torch

from mapanything_ext.checkpoint import save_on_master, verify_checkpoint


def synthetic_checkpoint(gigabytes: float) -> dict:
    n = int(gigabytes * 2**30 / 4 / 3)  # weights + two AdamW moments
    chunks = max(1, n // (64 * 2**20))
    size = n // chunks
    model = {f"layer{i}.weight": torch.randn(size) for i in range(chunks)}
    moments = {i: {"exp_avg": torch.randn(size), "exp_avg_sq": torch.rand(size)} for i in range(chunks)}
    return {"model": model, "optimizer": {"state": moments, "param_groups": []}, "epoch": 1,
            "args": {"train_params": {"epochs": 10}}, "best_so_far": 1.0}


def timed(fn) -> float:
    """Seconds for fn, starting from a clean page cache (no earlier write still being flushed)."""
    os.sync()
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def plain(obj, path: Path, fsync: bool) -> None:
    with open(path, "wb") as handle:
        torch.save(obj, handle)
        if fsync:
            handle.flush()
            os.fsync(handle.fileno())


def dd_speed(path: Path, gigabytes: float) -> float:
    """GiB/s of a sequential write with fsync (the file is deleted afterwards)."""
    count = max(1, int(gigabytes * 1024))
    out = subprocess.run(["dd", "if=/dev/zero", f"of={path}", "bs=1M", f"count={count}", "conv=fsync"],
                         capture_output=True, text=True).stderr
    path.unlink(missing_ok=True)
    match = re.search(r"([\d.]+) s,", out)
    return count / 1024 / float(match.group(1)) if match else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gb", type=float, default=2.0)
    parser.add_argument("--dir", type=Path, default=Path("/tmp/mapanything_ext_bench_ckpt"))
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    args.dir.mkdir(parents=True, exist_ok=True)
    obj = synthetic_checkpoint(args.gb)
    target = args.dir / "checkpoint-last.pth"
    # Thin-provisioned virtual disks write never-used blocks several times slower than blocks
    # freed earlier; write (and free) 4x the checkpoint first so every variant meets warm blocks.
    disk_cold = dd_speed(args.dir / "warm.bin", 4 * args.gb)
    rows = {"torch.save (page cache)": [], "torch.save + fsync": [], "torch.save + fsync, new file": [],
            "save_on_master (atomic)": [], "verify_checkpoint": []}
    for repeat in range(args.repeats):
        rows["torch.save (page cache)"].append(timed(lambda: plain(obj, args.dir / "plain.pth", False)))
        rows["torch.save + fsync"].append(timed(lambda: plain(obj, args.dir / "plain.pth", True)))
        # Like the atomic save, a new file while the old one still exists (no reuse of its blocks).
        rows["torch.save + fsync, new file"].append(timed(lambda: plain(obj, args.dir / "plain_new.pth", True)))
        (args.dir / "plain_new.pth").unlink()
        rows["save_on_master (atomic)"].append(timed(lambda: save_on_master(obj, target)))
        rows["verify_checkpoint"].append(timed(lambda: verify_checkpoint(target)))
    size_gb = target.stat().st_size / 2**30
    disk = dd_speed(args.dir / "dd.bin", min(args.gb, 2.0))
    print(f"\ncheckpoint {size_gb:.2f} GiB, best of {args.repeats}, each op after a sync; dd sequential write "
          f"(conv=fsync): {disk:.2f} GiB/s (first {4 * args.gb:.0f} GiB onto fresh blocks: {disk_cold:.2f} GiB/s)")
    print(f"{'operation':<30} {'seconds':>8} {'GiB/s':>7} {'vs torch.save+fsync':>20} {'vs same, new file':>18}")
    base, base_new = min(rows["torch.save + fsync"]), min(rows["torch.save + fsync, new file"])
    for name, values in rows.items():
        best = min(values)
        print(f"{name:<30} {best:>8.2f} {size_gb / best:>7.2f} {best / base:>19.2f}x {best / base_new:>17.2f}x")
    for path in args.dir.glob("*"):
        path.unlink()


if __name__ == "__main__":
    main()
