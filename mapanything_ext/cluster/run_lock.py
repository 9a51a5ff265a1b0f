"""One writer per run folder: `<output_dir>/.run.lock`.

A job takes the lock before it writes anything in its run folder and gives it back when it
leaves (normally, for a requeue, or with an error). The lock is a file created with
O_CREAT | O_EXCL, which is atomic on local disks and on the shared file systems clusters use
(NFSv3 and later, Lustre, GPFS), unlike `fcntl` locks, which NFS serves only with a lock daemon
and which die with the process that held them without a trace of who it was. The file says who
holds it: host, pid, Slurm job id, start time.

When the file exists, its holder is judged:

  our Slurm job, an earlier restart   the job requeued: it takes its own lock back
  our Slurm job, this same restart    another step of this job: alive while its pid exists (this host)
  another Slurm job                   alive until Slurm says it ended (slurm_jobs.py); else dead
  no Slurm job, this host             alive while its pid exists; else dead
  no Slurm job, another host          cannot be checked: treated as alive

A live holder stops the new job at once with a message naming it; a dead one's lock is taken
over (the old file is kept beside it as `.run.lock.stale-<time>`) and the takeover is logged. A
takeover happens under a second O_EXCL file (`.run.lock.takeover`), and only if the lock is still
the very file that was judged (same inode): two jobs judging one dead lock at once cannot both take
it (the second would otherwise rename the first's fresh lock away). A takeover file older than
TAKEOVER_STALE_S (its job died mid-takeover) is removed.
"""

from __future__ import annotations

import json
import os
import socket
import time
from datetime import datetime, timezone
from pathlib import Path

from mapanything_ext.cluster.slurm_jobs import job_state

LOCK_NAME = ".run.lock"
TAKEOVER_STALE_S = 60.0


class RunFolderBusy(RuntimeError):
    """Another live job holds the run folder."""


def me() -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid(), "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
            "slurm_restart": _restart_count(), "started": datetime.now(timezone.utc).isoformat(timespec="seconds")}


def _restart_count() -> int:
    return int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0)


def acquire(folder) -> tuple[Path, str | None]:
    """Take the lock of folder; returns (lock path, a note when a dead holder's lock was taken over)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_NAME
    note = None
    for _ in range(20):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            judged = _inode(path)
            holder = read_holder(path)
            verdict = judge(holder)
            if verdict == "alive":
                raise RunFolderBusy(
                    f"run folder {folder} is in use by {describe(holder)}: one job writes a run folder at a time. "
                    f"Stop that job, or give this one another output_dir. If it is certainly dead, delete {path}."
                ) from None
            stale = _take_over(path, judged)
            if stale is not None:
                note = (f"took over the lock of {folder} from {describe(holder)} ({verdict}); "
                        f"its lock file is kept as {stale.name}")
            continue
        with os.fdopen(fd, "w") as handle:
            json.dump(me(), handle)
            handle.flush()
            os.fsync(handle.fileno())
        return path, note
    raise RunFolderBusy(f"could not take the lock of {folder}: other jobs keep taking it ({path})")


def _inode(path: Path) -> tuple | None:
    try:
        status = path.stat()
    except FileNotFoundError:
        return None
    return status.st_dev, status.st_ino


def _take_over(path: Path, judged: tuple | None) -> Path | None:
    """Move the dead holder's lock aside, if it is still the file judged; under the takeover file, so
    one job at a time does it. Returns the stale file's new path, or None (someone else was first)."""
    mutex = path.with_name(f"{LOCK_NAME}.takeover")
    try:
        os.close(os.open(mutex, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
    except FileExistsError:
        try:
            if time.time() - mutex.stat().st_mtime > TAKEOVER_STALE_S:
                mutex.unlink()  # its job died mid-takeover
        except FileNotFoundError:
            pass
        time.sleep(0.05)
        return None
    try:
        if judged is None or _inode(path) != judged:
            return None  # taken over (or released) since it was judged: judge again
        stale = path.with_name(f"{LOCK_NAME}.stale-{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}")
        os.rename(path, stale)
        return stale
    finally:
        mutex.unlink(missing_ok=True)


def release(path: Path) -> None:
    """Give the lock back, if it is still ours."""
    holder = read_holder(path)
    if holder.get("host") == socket.gethostname() and holder.get("pid") == os.getpid():
        try:
            path.unlink()
        except FileNotFoundError:
            pass


def judge(holder: dict) -> str:
    """'alive', or why the holder is no longer there ('dead: ...', 'our own job, requeued')."""
    ours = os.environ.get("SLURM_JOB_ID")
    job = holder.get("slurm_job_id")
    if job and ours and job == ours:
        if int(holder.get("slurm_restart", -1)) < _restart_count():
            return "our own job, requeued"
        return _by_pid(holder)  # another step of this same job start: alive while its pid is
    if job:
        found = job_state(job)
        if found is None:  # Slurm unreachable from here: fall back to what this host can see
            return _by_pid(holder)
        return "alive" if found.active else f"dead: Slurm job {job} is {found.state or 'gone'}"
    return _by_pid(holder)


def _by_pid(holder: dict) -> str:
    if holder.get("host") != socket.gethostname():
        return "alive"
    try:
        os.kill(int(holder.get("pid", -1)), 0)
    except ProcessLookupError:
        return f"dead: pid {holder.get('pid')} is gone"
    except (PermissionError, ValueError, TypeError):
        return "alive"
    return "alive"


def read_holder(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def describe(holder: dict) -> str:
    if not holder:
        return "a job whose lock file is empty (it may be starting right now)"
    slurm = f", Slurm job {holder['slurm_job_id']}" if holder.get("slurm_job_id") else ""
    return f"pid {holder.get('pid')} on {holder.get('host')}{slurm}, started {holder.get('started')}"
