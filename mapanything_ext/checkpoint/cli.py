"""Verify checkpoints; optionally quarantine the bad ones.

usage: check_ckpt PATH [PATH ...] [--quarantine] [--json]
       (or python tools/check_ckpt.py ..., or python -m mapanything_ext.checkpoint.cli ...)

PATH is a checkpoint file or an experiment directory (searched recursively for *.pth
and *.tmp, skipping quarantine/ folders and caches such as compile_cache/). Names of one
file (hard links: last, best, final) are read once. One line per file: status, epoch, size,
reason (status OK, BAD, or ERR: the machine could not read it, an OS or memory error that
proves nothing about the file); or one JSON document with --json. --quarantine moves every
BAD file and *.tmp leftover into <its directory>/quarantine/<UTC timestamp>/ with a reason
file, exactly as a resuming job does (never an ERR file), and nothing at all while a live job
holds one of the run folders (its lock: the .tmp may be its save in progress). Exit status: 0 all
valid, 1 something invalid, 2 usage error or a live run folder with --quarantine. Needs no GPU;
tensors are memory-mapped, never loaded twice.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from datetime import datetime, timezone
from pathlib import Path

from mapanything_ext.checkpoint.quarantine import quarantine, verify_all
from mapanything_ext.checkpoint.verify import CheckResult


class UsageError(Exception):
    pass


def collect(paths: list[str]) -> list[Path]:
    files = []
    for raw in paths:
        path = Path(raw)
        if path.is_file():
            files.append(path)
        elif path.is_dir():
            files.extend(_checkpoint_files(path))
        else:
            raise UsageError(f"no such file or directory: {path}")
    return files


def _checkpoint_files(folder: Path) -> list[Path]:
    """*.pth and *.tmp under folder, not in quarantine/ folders nor in caches (a folder holding a
    CACHEDIR.TAG, such as train_params.compile_cache, whose own temporary files are no checkpoints)."""
    found = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = [d for d in dirnames if d != "quarantine" and not (Path(dirpath, d) / "CACHEDIR.TAG").is_file()]
        found += [Path(dirpath, name) for name in filenames if name.endswith((".pth", ".tmp"))]
    return sorted(p for p in found if p.is_file())


def check_all(files: list[Path]) -> dict[Path, CheckResult]:
    results = verify_all([p for p in files if p.suffix == ".pth"])
    for path in files:
        if path.suffix == ".tmp":
            results[path] = CheckResult(str(path), False, "leftover temporary file of an interrupted save", None,
                                        path.stat().st_size)
    return results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="check_ckpt", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("paths", nargs="+", metavar="PATH")
    parser.add_argument("--quarantine", action="store_true", help="move invalid files into quarantine/")
    parser.add_argument("--json", action="store_true", help="print one JSON document")
    try:
        args = parser.parse_args(argv)
        files = collect(args.paths)
    except SystemExit as exit_:
        return 2 if exit_.code else 0
    except UsageError as err:
        print(f"check_ckpt: {err}", file=sys.stderr)
        return 2
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S.%fZ")
    if args.quarantine and (busy := live_writers(files)):
        print(f"check_ckpt: not quarantining anything: {'; '.join(busy)}. A running job writes its checkpoints "
              f"(and their .tmp files) there; run --quarantine once it has stopped (a resume quarantines by itself).",
              file=sys.stderr)
        return 2
    results = []
    checked = check_all(files)
    for path in files:
        result = checked[path]
        entry = result.to_dict()
        if args.quarantine and not result.valid and not result.read_error:  # a read error proves no fault
            entry["moved_to"] = str(quarantine(path, result.reason, path.parent, stamp))
        results.append(entry)
        if not args.json:
            status = "OK " if result.valid else "ERR" if result.read_error else "BAD"
            epoch = "-" if result.epoch is None else result.epoch
            print(f"{status} epoch={epoch:<4} size={result.size:>12,d}  {path}  ({result.reason})")
    if args.json:
        print(json.dumps({"files": results, "all_valid": all(r["valid"] for r in results)}, indent=1))
    elif not files:
        print("no checkpoint found")
    return 0 if all(r["valid"] for r in results) else 1


def live_writers(files: list[Path]) -> list[str]:
    """The run folders among files' folders whose lock a live job holds (cluster/run_lock.py)."""
    from mapanything_ext.cluster import run_lock

    busy = []
    for folder in sorted({path.parent for path in files}):
        lock = folder / run_lock.LOCK_NAME
        if lock.exists() and run_lock.judge(holder := run_lock.read_holder(lock)) == "alive":
            busy.append(f"{folder} is in use by {run_lock.describe(holder)}")
    return busy


if __name__ == "__main__":
    sys.exit(main())
