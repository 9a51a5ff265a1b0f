"""Before a resume: move what cannot be trusted aside, then choose where to continue.

Nothing is ever deleted. Leftover `*.tmp` files (a save killed halfway) and checkpoints
that fail verification go to `<output_dir>/quarantine/<UTC timestamp>/`, each with a
`<name>.reason.json`. The resume point is checkpoint-last.pth if valid, else the newest
valid numbered checkpoint-<epoch>.pth, else none (a fresh start, announced loudly).
checkpoint-best.pth is never used as a resume point: it may be older than the last
state, and resuming from it would silently repeat or skip work.
"""

from __future__ import annotations

import json
import re
import shutil
import sys
from datetime import datetime, timezone
from pathlib import Path

from mapanything_ext import distributed as dist
from mapanything_ext.checkpoint.verify import CheckResult, verify_checkpoint

_NUMBERED = re.compile(r"^checkpoint-(\d+)\.pth$")


def quarantine(path: Path, reason: str, output_dir: Path, stamp: str | None = None) -> Path:
    """Move path into output_dir/quarantine/<stamp>/ beside a JSON reason file; returns the new path."""
    stamp = stamp or datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S.%fZ")
    folder = Path(output_dir) / "quarantine" / stamp
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / path.name
    shutil.move(str(path), target)
    record = {"file": str(path), "moved_to": str(target), "reason": reason, "utc": stamp}
    (folder / f"{path.name}.reason.json").write_text(json.dumps(record, indent=1) + "\n")
    print(f"[checkpoint] quarantined {path.name}: {reason} -> {target}", file=sys.stderr, flush=True)
    return target


def sweep(output_dir: Path, stamp: str | None = None) -> dict[str, CheckResult]:
    """Quarantine leftovers and invalid checkpoints in output_dir; returns results of the valid ones."""
    stamp = stamp or datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S.%fZ")
    for leftover in sorted(output_dir.glob("*.tmp")):
        quarantine(leftover, "leftover temporary file of an interrupted save", output_dir, stamp)
    valid = {}
    for candidate in sorted(output_dir.glob("*.pth")):
        result = verify_checkpoint(candidate)
        if result.valid:
            valid[candidate.name] = result
        else:
            quarantine(candidate, result.reason, output_dir, stamp)
    return valid


def choose_resume_point(output_dir: Path, valid: dict[str, CheckResult]) -> Path | None:
    if "checkpoint-last.pth" in valid:
        return output_dir / "checkpoint-last.pth"
    numbered = sorted((int(m.group(1)), name) for name in valid if (m := _NUMBERED.match(name)))
    if numbered:
        name = numbered[-1][1]
        print(f"[checkpoint] checkpoint-last.pth is missing or was quarantined: resuming from {name}", flush=True)
        return output_dir / name
    return None


def prepare_resume(output_dir) -> Path | None:
    """Rank 0 sweeps and chooses; the other ranks wait, then all get the same answer."""
    output_dir = Path(output_dir)
    choice = None
    if dist.get_rank() == 0 and output_dir.is_dir():
        choice = choose_resume_point(output_dir, sweep(output_dir))
        if choice is None:
            print(f"[checkpoint] *** no valid checkpoint in {output_dir}: starting from scratch ***", flush=True)
    elif dist.get_rank() == 0:
        print(f"[checkpoint] *** {output_dir} does not exist yet: starting from scratch ***", flush=True)
    dist.barrier()
    choice = dist.broadcast_object(str(choice) if choice else None)
    return Path(choice) if choice else None
