"""torch.compile's caches kept with the run (train_params.compile_cache), so a requeued job does not
compile again.

Where: `<train_params.compile_cache>/<torch version>-<device>/rank<N>/`; a relative compile_cache
(the default, `compile_cache`) lies in output_dir, an absolute one anywhere (a machine profile may
name a shared one: `machine.compile_cache`). Before anything compiles, every rank points
TORCHINDUCTOR_CACHE_DIR (Inductor's FX graph and AOTAutograd caches, the generated Python and C++
kernels, autotuning results) and TRITON_CACHE_DIR (the GPU kernels) at its own folder there. Not
cached: Dynamo traces the compiled parts' Python again at every start. The keys of these caches are torch's
own: they hash the graph, the torch/Triton versions and the device, so an entry that does not fit
is never used, and the version/device level of the path keeps other torch builds' files apart
(delete those folders to free their space). Clearing: delete the folder; the next start compiles
from scratch and fills it again.

Concurrency: one folder per global rank, so the ranks of one job never share one, even on several
nodes over a network file system (Inductor names its temporary files by pid only, which two nodes may
share); inside a folder Inductor writes each entry atomically (temporary file, rename) and serialises
the C++ builds with file locks, which its compile workers share. The run folder's lock (run_lock.py)
keeps a second job out. A shared folder named by a profile may be used by several jobs of one node
at once, as Inductor's default folder in /tmp is on any multi-GPU node.

Guards, at start, per rank (logged in console.log by rank 0):
- a folder that cannot be created, or whose file system refuses flock (Lustre without `flock`,
  which Inductor's locks need; a soft-lock fallback would leave stale locks behind a killed job),
  is not used: torch's default folder (/tmp) is, and the job goes on;
- files a killed or crashed job left broken, which Inductor would load and fail on (a C++ kernel
  library cut short by a SIGKILL during its build, a truncated Python or JSON file), are removed and
  listed; damaged pickled entries (FX graph, AOTAutograd, Dynamo's profile) Inductor skips itself;
- a C++ library that another process is building (its Inductor lock is held) is left alone.
At the first training step rank 0 logs how many compiled graphs came from the cache.

Inductor loads kernels one by one in the training process until its compile workers are up, so the
engine starts them right after pointing the caches here, before the model is built
(start_compile_workers). On an H200 a requeued MapAnything job loaded its warm cache in under 1 s
with them; what the early start saves on its own was not isolated (docs/mapanything.md).

Not used: torch.compiler.save_cache_artifacts/load_cache_artifacts (the "mega cache"). It bundles
the same entries into one blob that load_cache_artifacts writes back into the cache folder; with
that folder itself kept, the bundle is a second copy (and it holds no C++ kernel libraries, so a
CPU job would build them again).
"""

from __future__ import annotations

import fcntl
import json
import os
import platform
import re
import shutil
import struct
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from mapanything_ext.cluster import distributed as dist

_ENV = ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR")
# A directory holding this file is a cache (https://bford.info/cachedir/): backup tools skip it, and
# so do check_ckpt and everything else here that walks a run folder.
TAG_NAME = "CACHEDIR.TAG"
_TAG = ("Signature: 8a477f597d28d172789f06886806bc55\n"
        "# torch.compile caches of mapanything_ext (train_params.compile_cache); delete to clear.\n")
_ELF_SUFFIXES = (".so", ".cubin", ".hsaco", ".o")
_JSON_SUFFIXES = (".json", ".best_config")
# Temporary files of an atomic write (Inductor: .<pid>.<thread>.tmp; Triton: tmp.pid_*): never read;
# removed once old enough that no live writer can still rename them.
_TEMPORARY = re.compile(r"^\.\d+\.\d+\.tmp$|^tmp\.pid_")
_TEMPORARY_AGE_S = 3600


@dataclass
class CompileCache:
    root: Path  # train_params.compile_cache, resolved
    folder: Path  # this rank's folder
    previous_env: dict
    counters_at_start: dict = field(default_factory=dict)


_active: CompileCache | None = None


def is_cache_dir(path: Path) -> bool:
    """True for a folder this module made (marked with CACHEDIR.TAG)."""
    return (Path(path) / TAG_NAME).is_file()


def cache_root(cfg, output_dir: Path) -> Path | None:
    """The folder train_params.compile_cache names, or None when it is off (null/false) or nothing compiles."""
    value = cfg.train_params.get("compile_cache", "compile_cache")
    if value is None or value is False or str(value).strip().lower() in ("", "none", "null", "false"):
        return None
    if not compiles(cfg):
        return None
    name = "compile_cache" if value is True else os.path.expandvars(os.path.expanduser(str(value)))
    return (Path(output_dir) / name).absolute()


def compiles(cfg) -> bool:
    """Whether the job compiles anything: model parts (train_params.compile) or the loss (loss.compile)."""
    return bool(cfg.train_params.get("compile") or (cfg.get("loss") or {}).get("compile"))


def device_tag(device: torch.device) -> str:
    """The torch build and device a cache folder is for, e.g. torch2.13.0+cu128-NVIDIA_H200."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"{device.type}-{platform.machine()}"
    return re.sub(r"[^A-Za-z0-9.+_-]+", "_", f"torch{torch.__version__}-{name}")


def use_for_run(cfg, info: dist.DistInfo, output_dir: Path) -> CompileCache | None:
    """Point torch.compile's caches at this rank's folder; call on every rank before anything
    compiles. Returns None (torch's default folder) when the option is off, nothing compiles, or the
    folder cannot be used; never raises for a bad cache."""
    global _active
    release()
    root = cache_root(cfg, output_dir)
    if root is None:
        return None
    folder = root / device_tag(info.device) / f"rank{info.rank}"
    problem = _prepare(root, folder)
    started = time.perf_counter()
    files = size = graphs = 0
    removed: list[str] = []
    if problem is None:
        try:
            files, size, graphs, removed = check_folder(folder)
        except Exception as err:  # noqa: BLE001 -- a cache that cannot be checked is not used, the job goes on
            problem = f"cannot check it: {type(err).__name__}: {err}"
    report = {"rank": info.rank, "problem": problem, "files": files, "bytes": size, "graphs": graphs,
              "removed": removed, "seconds": time.perf_counter() - started}
    reports = dist.all_gather_object(report)
    if info.rank == 0:
        try:
            _print_start(root, folder, reports)
        except OSError as err:
            print(f"[compile_cache] {folder}: {err}")
    if problem is not None:
        return None
    previous_env = {name: os.environ.get(name) for name in _ENV}
    if previous_env["TORCHINDUCTOR_CACHE_DIR"] != str(folder):
        _restart_compile_workers()
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(folder)
    os.environ["TRITON_CACHE_DIR"] = str(folder / "triton")
    _active = CompileCache(root, folder, previous_env, _cache_counters())
    return _active


def release() -> None:
    """Undo use_for_run (the environment), for the next job run in this process."""
    global _active
    if _active is None:
        return
    for name, value in _active.previous_env.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
    _active = None


def first_step_line() -> str | None:
    """What the cache gave this process so far (printed by rank 0 after the first training step)."""
    if _active is None:
        return None
    now, start = _cache_counters(), _active.counters_at_start
    d = {k: now[k] - start.get(k, 0) for k in now}
    hits, misses = d["fxgraph_cache_hit"], d["fxgraph_cache_miss"]
    if hits + misses == 0:
        verdict = "nothing compiled yet"
    elif misses == 0:
        verdict = f"all {hits} compiled graphs from the cache"
    else:
        verdict = f"{hits} of {hits + misses} compiled graphs from the cache, {misses} compiled now"
    return (f"[compile_cache] first step: {verdict} (FX graph cache {hits} hits, {misses} misses, "
            f"{d['fxgraph_cache_bypass']} bypasses; AOTAutograd cache {d['autograd_cache_hit']} hits, "
            f"{d['autograd_cache_miss']} misses; rank 0){_compile_seconds()}")


# torch's own accounting of where compile time went (torch._dynamo.utils.compile_times), by the
# names of the phases it times; a name a torch version does not time is left out.
_PHASES = (("_compile.compile_inner", "in all"), ("bytecode_tracing", "Dynamo tracing"),
           ("create_aot_dispatcher_function", "AOTAutograd"), ("compile_fx_inner", "Inductor forward"),
           ("compile_fx.<locals>.bw_compiler", "Inductor backward"),
           ("PyCodeCache.load_by_key_path", "loading compiled code"))


def _compile_seconds() -> str:
    """'; compile time (s): in all 61.2, Dynamo tracing 20.1, ...' or '' where torch keeps no account."""
    try:
        from torch._dynamo.utils import compile_times

        names, seconds = compile_times(repr="csv", aggregate=True)
    except Exception:  # noqa: BLE001 -- a private API: its absence must not stop a job
        return ""
    totals = dict(zip(names, (float(value) for value in seconds)))
    parts = [f"{label} {totals[name]:.1f}" for name, label in _PHASES if name in totals]
    return f"; compile time (s): {', '.join(parts)}" if parts else ""


def check_folder(folder: Path) -> tuple[int, int, int, list[str]]:
    """Walk one rank's folder: (files, bytes, cached graphs, removed) after removing files that would
    fail when loaded (see the module docstring) and stale temporary files."""
    files = size = graphs = 0
    removed = []
    stale = time.time() - _TEMPORARY_AGE_S
    for dirpath, dirnames, filenames in os.walk(folder):
        here = Path(dirpath)
        for name in [d for d in dirnames if d == "locks" or _TEMPORARY.search(d)]:
            dirnames.remove(name)
            if name != "locks" and _mtime(here / name) < stale:
                shutil.rmtree(here / name, ignore_errors=True)
        for name in filenames:
            path = here / name
            if name.endswith(".lock") or name == TAG_NAME:
                continue
            try:
                stat = path.stat()
            except FileNotFoundError:  # removed meanwhile (another job sharing the folder)
                continue
            if _TEMPORARY.search(name):
                if stat.st_mtime < stale:
                    _remove(path)
                continue
            problem = _problem(path, stat.st_size)
            if problem:
                if name.endswith(".so"):
                    if not _remove_if_still_broken(folder, path):
                        continue  # built meanwhile, or being built now, by another process
                else:
                    _remove(path)
                removed.append(f"{path.relative_to(folder)} ({problem})")
                continue
            files += 1
            size += stat.st_size
            graphs += path.relative_to(folder).parts[0] == "fxgraph"
    return files, size, graphs, removed


def _prepare(root: Path, folder: Path) -> str | None:
    """Create the folders; None if usable, else why not."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        tag = root / TAG_NAME
        if not tag.is_file():
            tag.write_text(_TAG)
    except OSError as err:
        return f"cannot create it: {err}"
    probe = folder / f".flock-probe-{os.getpid()}"
    try:
        with open(probe, "w") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            fcntl.flock(handle, fcntl.LOCK_UN)
    except OSError as err:
        return f"its file system refuses file locks (flock: {err.strerror or err}), which Inductor's cache needs"
    finally:
        probe.unlink(missing_ok=True)
    return None


def _problem(path: Path, size: int) -> str | None:
    """Why loading this cache file would fail, or None."""
    name = path.name
    try:
        if name.endswith(_ELF_SUFFIXES):
            return _elf_problem(path, size)
        if name.endswith(".py"):
            source = path.read_bytes()
            if not source:
                return "empty"
            compile(source, str(path), "exec", dont_inherit=True)
        elif name.endswith(_JSON_SUFFIXES):
            json.loads(path.read_bytes())
    except (SyntaxError, ValueError) as err:  # json.JSONDecodeError and UnicodeDecodeError are ValueErrors
        return f"{type(err).__name__}: {str(err).splitlines()[0][:80]}"
    return None


def _elf_problem(path: Path, size: int) -> str | None:
    """A shared library or kernel binary cut short: its section table (at the end) lies beyond the file."""
    with open(path, "rb") as handle:
        head = handle.read(64)
    if len(head) < 52 or head[:4] != b"\x7fELF":
        return "empty" if not head else "not a complete ELF file"
    order = "<" if head[5] == 1 else ">"
    if head[4] == 2:
        (offset,) = struct.unpack_from(order + "Q", head, 0x28)
        entry, count = struct.unpack_from(order + "HH", head, 0x3A)
    else:
        (offset,) = struct.unpack_from(order + "I", head, 0x20)
        entry, count = struct.unpack_from(order + "HH", head, 0x2E)
    if offset + entry * count > size:
        return f"truncated: {size} bytes, its section table ends at byte {offset + entry * count}"
    return None


def _remove_if_still_broken(folder: Path, library: Path) -> bool:
    """Remove a broken C++ kernel library under Inductor's own lock for it (the one its build holds);
    False while another process holds that lock, or when the library is whole by now."""
    lock = folder / "locks" / (library.name.split(".")[0] + ".lock")
    try:
        lock.parent.mkdir(exist_ok=True)
        with open(lock, "a") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return False
            try:
                if not _problem(library, library.stat().st_size):
                    return False
                _remove(library)
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)
    except OSError:
        return False
    return True


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return time.time()


def _remove(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass


def _cache_counters() -> dict:
    from torch._dynamo.utils import counters

    return {**{k: counters["inductor"][k] for k in ("fxgraph_cache_hit", "fxgraph_cache_miss", "fxgraph_cache_bypass")},
            **{k: counters["aot_autograd"][k] for k in ("autograd_cache_hit", "autograd_cache_miss")}}


def start_compile_workers(cfg, device: torch.device) -> None:
    """With anything to compile on a GPU, start Inductor's compile worker processes now, so that
    they are up when the first compiled part runs. Inductor starts them only when it gets its first
    graph, and until they are up (each imports torch) it loads every kernel, cached or not, one by
    one in the training process."""
    if device.type != "cuda" or not compiles(cfg):
        return
    try:
        from torch._inductor.async_compile import (
            maybe_warm_pool,  # private: torch's own early start
        )

        maybe_warm_pool()
    except Exception as err:  # noqa: BLE001 -- only start-up time is at stake
        print(f"[compile_cache] compile workers not started early ({type(err).__name__}: {err})")


def _restart_compile_workers() -> None:
    """Inductor's compile workers keep the environment they started with; a job that changes the
    folder in a process whose workers already run (an earlier job of a sweep) starts them afresh."""
    async_compile = sys.modules.get("torch._inductor.async_compile")  # not imported: no workers yet
    try:
        if async_compile is not None and async_compile._pool_set:
            async_compile.shutdown_compile_workers()
    except Exception:  # noqa: BLE001 -- only a cache location is at stake
        pass


def _print_start(root: Path, folder: Path, reports: list[dict]) -> None:
    mine = reports[0]
    if mine["problem"]:
        print(f"[compile_cache] WARNING: not using {folder}: {mine['problem']}; torch.compile uses its default "
              f"cache folder (in /tmp) instead")
    else:
        state = (f"warm: {mine['graphs']} compiled graphs, {mine['files']} files, {mine['bytes'] / 1e6:.1f} MB"
                 if mine["graphs"] else f"cold: no compiled graph yet ({mine['files']} files)")
        ranks = (f"; ranks with a warm cache: {sum(1 for r in reports if r['graphs'] and not r['problem'])} of "
                 f"{len(reports)}" if len(reports) > 1 else "")
        print(f"[compile_cache] torch.compile cache: {folder} ({state}, checked in {mine['seconds']:.1f}s{ranks}); "
              f"one folder per rank; delete {root} to clear it")
    for report in reports[1:]:
        if report["problem"]:
            print(f"[compile_cache] WARNING: rank {report['rank']} does not use its folder: {report['problem']}")
    for report in reports:
        if report["removed"]:
            shown = ", ".join(report["removed"][:5]) + (" ..." if len(report["removed"]) > 5 else "")
            print(f"[compile_cache] rank {report['rank']}: removed {len(report['removed'])} broken file(s) "
                  f"a killed job left behind: {shown}")
    others = sorted(p.name for p in root.iterdir() if p.is_dir() and p.name != folder.parent.name) \
        if root.is_dir() else []
    if others:
        print(f"[compile_cache] {root} also holds caches of other torch builds or devices, not used by this job: "
              f"{', '.join(others)} (delete them to free their space)")
