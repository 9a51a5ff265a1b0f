"""Checkpoint verification at a job's start: alone, and beside a main thread busy in Python.

    python bench/bench_verify.py [--work DIR] [--gb 1.6] [--files 2] [--tensors 1500]

A requeued job verifies every checkpoint of its run in a thread (quarantine.choose_in_background)
while its main thread traces the compiled parts, which holds the interpreter's lock most of the
time. This writes `--files` checkpoints of ours (about `--gb` GB each, `--tensors` float32 tensors:
weights and two AdamW moments, as a model's state is), then times `verify_all` on them alone and
beside a thread that runs Python without pause, and prints a table. The files are read from the page
cache (each is read once before timing): the figures are the checks' own cost, not the disk's.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from mapanything_ext.checkpoint.atomic import save_on_master  # noqa: E402
from mapanything_ext.checkpoint.format import stamp  # noqa: E402
from mapanything_ext.checkpoint.quarantine import verify_all  # noqa: E402


def write_checkpoints(folder: Path, gigabytes: float, files: int, tensors: int) -> list[Path]:
    count = max(tensors // 3, 1)  # weights, and as many of each AdamW moment
    elements = max(int(gigabytes * 1e9 / 4 / (3 * count)), 1)  # float32
    weights = {f"w{i}": torch.randn(elements + i % 7) for i in range(count)}
    moments = {i: {"exp_avg": torch.randn_like(w), "exp_avg_sq": torch.rand_like(w), "step": torch.tensor(3.0)}
               for i, w in enumerate(weights.values())}
    paths = []
    for n in range(files):
        path = folder / ("checkpoint-last.pth" if n == 0 else f"checkpoint-{n}.pth")
        save_on_master(stamp({"model": weights, "optimizer": {"state": moments}, "epoch": 1, "args": {},
                              "resume": {"global_step": 10 - n, "epoch_complete": False, "consumed": 1}}), path)
        path.read_bytes()  # into the page cache
        paths.append(path)
    return paths


def timed(paths: list[Path]) -> tuple[float, bool]:
    started = time.perf_counter()
    results = verify_all(paths)
    return time.perf_counter() - started, all(r.valid for r in results.values())


def beside_busy_thread(paths: list[Path]) -> tuple[float, bool]:
    stop = threading.Event()

    def busy() -> None:  # pure Python, as Dynamo's tracing is
        x = 0
        while not stop.is_set():
            for i in range(10_000):
                x += i * i

    thread = threading.Thread(target=busy)
    thread.start()
    try:
        return timed(paths)
    finally:
        stop.set()
        thread.join()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=None, help="where to write the files (default: a temporary folder)")
    parser.add_argument("--gb", type=float, default=1.6, help="size of each checkpoint")
    parser.add_argument("--files", type=int, default=2, help="checkpoints in the run folder (last and previous: 2)")
    parser.add_argument("--tensors", type=int, default=1500)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.work) as folder:
        paths = write_checkpoints(Path(folder), args.gb, args.files, args.tensors)
        size = sum(p.stat().st_size for p in paths) / 1e9
        print(f"# {args.files} checkpoints, {size:.2f} GB in all, {args.tensors} tensors each", flush=True)
        print("| verification | seconds | GB/s | all valid |\n|---|---|---|---|")
        for name, measure in (("alone", timed), ("beside a busy Python thread", beside_busy_thread)):
            seconds, valid = measure(paths)
            print(f"| {name} | {seconds:.2f} | {size / seconds:.2f} | {valid} |", flush=True)


if __name__ == "__main__":
    main()
