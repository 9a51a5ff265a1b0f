"""Before a resume: move what cannot be trusted aside, then choose where to continue.

Only our own files are touched: leftover temporaries of our saves (a save killed halfway) and
our checkpoints (`checkpoint-last|final|best|previous|<N>.pth`) that fail verification for a
fault of their content go to `<output_dir>/quarantine/<UTC timestamp>/`, each with a
`<name>.reason.json`; a file the machine cannot read (an OS or memory error) stops the resume
instead, moving nothing. The quarantine is bounded: torn temporaries are kept from its newest
KEPT_TEMPORARY_BATCHES batches only; quarantined checkpoints are kept. A file with several names
(hard links: last, best, final, numbered) is verified once; moving one name aside never touches
the others.

The resume point is the valid checkpoint with the newest recorded position (global step,
then a finished epoch over one still running), whichever its name: last, final, numbered,
best or previous. A run never restarts from scratch while a valid checkpoint exists; what was passed
over, and why, is printed.
"""

from __future__ import annotations

import json
import re
import shutil
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path

from mapanything_ext.checkpoint.verify import CheckpointReadError, CheckResult, verify_checkpoint
from mapanything_ext.cluster import distributed as dist
from mapanything_ext.console import say

# Our checkpoint names, and the temporary files of their interrupted saves: the only files a resume
# sweeps (an official weights file or a user's .pth in the run folder is never touched).
_NAMES = re.compile(r"^checkpoint-(last|final|best|previous|\d+)\.pth$")
_OUR_TEMPORARY = re.compile(r"^checkpoint-(last|final|best|previous|\d+)\.pth\..+\.tmp$")
# Among files of the same position, the one we name first (they hold the same state).
_PREFERENCE = ("last", "final", "numbered", "best", "previous")


def quarantine(path: Path, reason: str, output_dir: Path, stamp: str | None = None) -> Path:
    """Move path into output_dir/quarantine/<stamp>/ beside a JSON reason file; returns the new path."""
    stamp = stamp or datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S.%fZ")
    folder = Path(output_dir) / "quarantine" / stamp
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / path.name
    shutil.move(str(path), target)  # a rename of this one name: other hard links keep the file
    record = {"file": str(path), "moved_to": str(target), "reason": reason, "utc": stamp}
    (folder / f"{path.name}.reason.json").write_text(json.dumps(record, indent=1) + "\n")
    say("checkpoint", f"quarantined {path.name}: {reason} -> {target}", stderr=True)
    _bound(Path(output_dir) / "quarantine")
    return target


# Torn temporary files (a killed save leaves one as large as a checkpoint, 15 GB for MapAnything) are
# kept from the newest KEPT_TEMPORARY_BATCHES quarantines only; older ones are deleted (said so), so a
# run killed in many saves cannot fill its disk. Invalid checkpoints (.pth) are always kept.
KEPT_TEMPORARY_BATCHES = 2


def _bound(folder: Path) -> None:
    batches = sorted(p for p in folder.iterdir() if p.is_dir())
    old = [p for batch in batches[:-KEPT_TEMPORARY_BATCHES] for p in batch.iterdir() if p.name.endswith(".tmp")]
    if not old:
        return
    freed = 0
    for path in old:
        freed += path.stat().st_size
        path.unlink()
        path.with_name(f"{path.name}.reason.json").unlink(missing_ok=True)
    say("checkpoint", f"quarantine: deleted {len(old)} torn temporary file(s) of older quarantines ({freed / 1e9:.2f} "
        f"GB; the newest {KEPT_TEMPORARY_BATCHES} quarantines keep theirs)", stderr=True)


def verify_all(paths: list[Path]) -> dict[Path, CheckResult]:
    """verify_checkpoint of every path, reading each file (inode) once however many names it has."""
    by_inode: dict[tuple, CheckResult] = {}
    results = {}
    for path in paths:
        stat = path.stat()
        key = (stat.st_dev, stat.st_ino)
        if key not in by_inode:
            by_inode[key] = verify_checkpoint(path)
        result = by_inode[key]
        results[path] = CheckResult(**{**result.to_dict(), "path": str(path)})
    return results


def sweep(output_dir: Path, stamp: str | None = None) -> dict[str, CheckResult]:
    """Quarantine leftovers and invalid checkpoints in output_dir; returns results of the valid ones."""
    stamp = stamp or datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S.%fZ")
    for leftover in sorted(p for p in output_dir.glob("*.tmp") if _OUR_TEMPORARY.match(p.name)):
        quarantine(leftover, "leftover temporary file of an interrupted save", output_dir, stamp)
    valid = {}
    results = verify_all(sorted(p for p in output_dir.glob("*.pth") if _NAMES.match(p.name)))
    unread = [result for result in results.values() if result.read_error]
    if unread:  # nothing is moved: the machine failed, not the files
        raise CheckpointReadError("cannot read the run's checkpoints, so the job stops without moving any: " +
                                  "; ".join(f"{r.path}: {r.reason}" for r in unread) +
                                  ". Check the file system or the job's memory limit (ulimit -v, Slurm's "
                                  "VSizeFactor), then resubmit.")
    for candidate, result in results.items():
        if result.valid:
            valid[candidate.name] = result
        else:
            quarantine(candidate, result.reason, output_dir, stamp)
    return valid


def _kind(name: str) -> str:
    match = _NAMES.match(name)
    if not match:
        return ""
    return "numbered" if match.group(1).isdigit() else match.group(1)


def resume_order(name: str, position_key: tuple) -> tuple | None:
    """Sort key of a checkpoint name by the position it holds (largest = where a resume starts); among
    names of one position, last before final before numbered before best. None: not a resume point."""
    if not _kind(name) or position_key[0] is None or position_key[0] < 0:
        return None
    return position_key, -_PREFERENCE.index(_kind(name)), name


def choose_resume_point(output_dir: Path, valid: dict[str, CheckResult]) -> Path | None:
    candidates = [key for name, result in valid.items() if (key := resume_order(name, result.position_key()))]
    if not candidates:
        return None
    (step, complete), _, name = max(candidates)
    passed = [f"{other} (step {key[0]}{', epoch finished' if key[1] else ''})"
              for key, _, other in sorted(candidates, reverse=True) if other != name and key != (step, complete)]
    say("checkpoint", f"resuming from {name}: newest valid position, global step {step}"
          f"{', epoch finished' if complete else ''}" + (f"; older: {', '.join(passed)}" if passed else ""))
    return output_dir / name


def prepare_resume(output_dir, chosen: Future | None = None) -> Path | None:
    """Rank 0 sweeps and chooses (or takes what choose_in_background started); the other ranks
    wait, then all get the same answer."""
    output_dir = Path(output_dir)
    choice = None
    if dist.get_rank() == 0:
        choice = chosen.result() if chosen is not None else _sweep_and_choose(output_dir)
    dist.barrier()
    choice = dist.broadcast_object(str(choice) if choice else None)
    return Path(choice) if choice else None


def choose_in_background(output_dir) -> Future | None:
    """On rank 0, start the sweep and the choice now in a thread: verifying means reading every
    checkpoint in full (about 10 s for MapAnything's 15 GB), which then overlaps the job's model
    build and first compiled steps; prepare_resume(output_dir, <this>) collects the answer. It does
    files only, no collectives, so it may run beside the main thread's. None on other ranks."""
    if dist.get_rank() != 0:
        return None
    executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint-choice")
    future = executor.submit(_sweep_and_choose, Path(output_dir))
    executor.shutdown(wait=False)
    return future


def _sweep_and_choose(output_dir: Path) -> Path | None:
    if not output_dir.is_dir():
        say("checkpoint", f"*** {output_dir} does not exist yet: starting from scratch ***")
        return None
    choice = choose_resume_point(output_dir, sweep(output_dir))
    if choice is None:
        say("checkpoint", f"*** no valid checkpoint in {output_dir}: starting from scratch ***")
    return choice
