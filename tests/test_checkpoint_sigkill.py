"""Fault injection: SIGKILL a process at random moments while it saves checkpoints in a loop.

Real processes (forked, so each trial starts in milliseconds), real signals, real files.
After every kill: the target path holds a complete valid checkpoint, and prepare_resume
quarantines any leftover and returns a valid resume point.
"""

import multiprocessing
import os
import signal
import time

import numpy as np
import torch

from mapanything_ext.checkpoint import prepare_resume, save_on_master, verify_checkpoint
from mapanything_ext.checkpoint.quarantine import KEPT_TEMPORARY_BATCHES

TRIALS = 30


def save_forever(run_dir: str, first_step: int) -> None:
    # A forked child must not enter the OpenMP pool the parent (pytest, earlier tests) may have
    # started: GNU OpenMP is not fork-safe, and the child would hang in its first parallel op.
    torch.set_num_threads(1)
    epoch = first_step  # every trial continues the step count, as a resumed run does
    while True:
        epoch += 1
        ckpt = {"model": {"w": torch.full((2_000_000,), float(epoch))}, "optimizer": {}, "epoch": epoch % 5,
                "args": {}, "best_so_far": 1.0, "resume": {"epoch": epoch % 5, "iteration": 0, "global_step": epoch}}
        save_on_master(ckpt, os.path.join(run_dir, "checkpoint-last.pth"))
        if epoch % 3 == 0:
            save_on_master(ckpt, os.path.join(run_dir, f"checkpoint-{epoch}.pth"))


def test_sigkill_during_saves_never_leaves_a_partial_checkpoint(tmp_path):
    ctx = multiprocessing.get_context("fork")
    rng = np.random.default_rng(1)
    leftovers_per_trial = []
    for trial in range(TRIALS):
        started_ns = time.time_ns()
        proc = ctx.Process(target=save_forever, args=(str(tmp_path), trial * 10_000))
        proc.start()
        # wait for this trial's first complete save, then kill at a random moment of a later one
        deadline = time.time() + 30
        while not _saved_since(tmp_path / "checkpoint-last.pth", started_ns) and time.time() < deadline:
            time.sleep(0.005)
        assert _saved_since(tmp_path / "checkpoint-last.pth", started_ns), f"trial {trial}: the saver never saved"
        time.sleep(float(rng.uniform(0.0, 0.25)))
        os.kill(proc.pid, signal.SIGKILL)
        proc.join()
        assert proc.exitcode == -signal.SIGKILL
        assert verify_checkpoint(tmp_path / "checkpoint-last.pth").valid, f"trial {trial}: partial target"
        leftovers = list(tmp_path.glob("*.tmp"))
        choice = prepare_resume(tmp_path)
        assert choice == tmp_path / "checkpoint-last.pth"
        assert not list(tmp_path.glob("*.tmp"))
        leftovers_per_trial.append(len(leftovers))
    # the kills did land mid-save: some trials left a temporary file behind; the quarantine keeps the
    # torn temporaries of its newest KEPT_TEMPORARY_BATCHES quarantines (one per trial that left any)
    quarantined = [count for count in leftovers_per_trial if count]
    assert quarantined
    kept = sum(quarantined[-KEPT_TEMPORARY_BATCHES:])
    assert len(list((tmp_path / "quarantine").rglob("*.tmp"))) == kept


def _saved_since(path, started_ns: int) -> bool:
    try:
        return path.stat().st_mtime_ns >= started_ns
    except FileNotFoundError:
        return False
