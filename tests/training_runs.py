"""Running the real training entry point in subprocesses, for the end-to-end tests."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def tiny_overrides(data_root: Path, output_dir: Path, *extra: str) -> list[str]:
    """Small images, a small compact model and a brisk schedule on the synthetic test data."""
    return [
        "machine=local", "model=compact", "loss=compact_loss",
        f"machine.opv2v_root={data_root / 'opv2v'}", f"machine.opv2v_depth_root={data_root / 'opv2v_depth'}",
        f"machine.root_experiments_dir={output_dir.parent}", f"output_dir={output_dir}",
        "dataset.resolution_train=[56,42]", "dataset.resolution_test=[56,42]",
        "model.dim=32", "model.depth=1", "model.num_heads=2",
        "train_params.lr=2e-3", "train_params.warmup_epochs=0.5",
        # MapAnything's batching: max(1, 8 // num_views) samples per batch (2 of the 9 single-vehicle samples),
        # the view count fixed so tests can count steps (its draw per batch: tests/test_stop_paths.py,
        # test_augmentation.py); the colour transform and crop zoom stay on, as in the stage configs.
        "train_params.max_num_of_imgs_per_gpu=8", "dataset.train.variable_num_views=false",
        "train_params.epochs=2", "train_params.print_freq=1",
        *extra,
    ]


def stage_overrides(data_root: Path, experiments: Path, *extra: str) -> list[str]:
    """Tiny run settings without output_dir and image budget, so each stage writes where its stage config
    says and batches as it says."""
    return [o for o in tiny_overrides(data_root, experiments / "unused", *extra)
            if not o.startswith(("output_dir=", "train_params.max_num_of_imgs_per_gpu="))]


def train_command(overrides: list[str]) -> list[str]:
    return [sys.executable, "-m", "mapanything_ext.train.training", *overrides]


def run_training(overrides: list[str], env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(train_command(overrides), cwd=REPO, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_ranks(overrides: list[str], world_size: int, log_dir: Path, env: dict | None = None) -> list[subprocess.Popen]:
    """world_size real processes rendezvousing like torchrun would (gloo on CPU)."""
    port = free_port()
    procs = []
    extra = env or {}
    for rank in range(world_size):
        env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": str(world_size), "LOCAL_RANK": str(rank),
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "TORCH_DIST_TIMEOUT": "120", **extra}
        log = open(log_dir / f"rank{rank}.log", "a")
        procs.append(subprocess.Popen(train_command(overrides), cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT))
    return procs


def wait_all(procs: list[subprocess.Popen], timeout: float = 300) -> list[int]:
    deadline = time.time() + timeout
    codes = []
    for proc in procs:
        codes.append(proc.wait(timeout=max(1.0, deadline - time.time())))
    return codes


def wait_for_text(path: Path, text: str, timeout: float = 120, count: int = 1) -> None:
    """Wait until text appears at least count times in the file."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if path.exists() and path.read_text(errors="replace").count(text) >= count:
            return
        time.sleep(0.05)
    raise TimeoutError(f"{text!r} did not appear in {path} within {timeout}s")
