"""torch.compile's caches kept with the run (train_params.compile_cache), so a requeued job does not
compile again.

    with CompileCache.for_run(cfg, info, output_dir) as cache:   # every rank, before anything compiles
        ...                                                       # cache.report_first_step() after a step

Where: `<train_params.compile_cache>/<torch version>-<device>/rank<N>/`; a relative compile_cache
(the default, `compile_cache`) lies in output_dir, an absolute one anywhere (a machine profile may
name a shared one: `machine.compile_cache`). Inside the `with`, TORCHINDUCTOR_CACHE_DIR (Inductor's
FX graph and AOTAutograd caches, the generated Python and C++ kernels, autotuning results) and
TRITON_CACHE_DIR (the GPU kernels) point at this rank's folder; leaving it restores them (the next job
of an in-process sweep gets its own). Not cached: Dynamo traces the compiled parts' Python again at
every start. The keys of these caches are torch's own: they hash the graph, the torch/Triton versions
and the device, so an entry that does not fit is never used, and the version/device level of the path
keeps other torch builds' files apart. Clearing: delete the folder; the next start compiles from
scratch and fills it again.

Concurrency: one folder per global rank, so the ranks of one job never share one, even on several
nodes over a network file system (Inductor names its temporary files by pid only, which two nodes may
share); inside a folder Inductor writes each entry atomically (temporary file, rename) and serialises
the C++ builds with file locks, which its compile workers share. The run folder's lock (run_lock.py)
keeps a second job out. A shared folder named by a profile may be used by several jobs of one node
at once, as Inductor's default folder in /tmp is on any multi-GPU node.

At start, per rank (logged in console.log by rank 0), compile_cache_repair.py checks the folder: a
folder that cannot be used leaves torch's default folder (/tmp) in place and the job goes on; files a
killed job left broken are removed and listed. At the first training step rank 0 logs how many
compiled graphs came from the cache. Inductor loads kernels one by one in the training process until
its compile workers are up, so the engine starts them right after the caches are set
(start_compile_workers); what that saves is in docs/mapanything.md (Compile cache). A graph torch's
caches will not hold is compiled at every start; the first-step line counts such graphs and names
torch's reasons (cache_bypass.py).

Not used: torch.compiler.save_cache_artifacts/load_cache_artifacts (the "mega cache"). It bundles
the same entries into one blob that load_cache_artifacts writes back into the cache folder; with
that folder itself kept, the bundle is a second copy (and it holds no C++ kernel libraries, so a
CPU job would build them again).
"""

from __future__ import annotations

import os
import platform
import re
import sys
import time
from pathlib import Path

import torch

from mapanything_ext.cluster import distributed as dist
from mapanything_ext.console import say, warn
from mapanything_ext.train.cache_bypass import BypassReasons
from mapanything_ext.train.compile_cache_repair import check_folder, prepare

_ENV = ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR")


class CompileCache:
    """This rank's cache folder for one job, in use between entering and leaving it as a context;
    `folder` None: torch's default folder (off, nothing compiles, or the folder cannot be used)."""

    def __init__(self, root: Path | None = None, folder: Path | None = None):
        self.root, self.folder = root, folder
        self._previous_env: dict = {}
        self._counters_at_start: dict = {}
        self._bypasses = BypassReasons()

    @classmethod
    def for_run(cls, cfg, info: dist.DistInfo, output_dir: Path) -> "CompileCache":
        """The job's cache: checked and repaired (every rank, a collective), reported by rank 0; never
        raises for a bad cache."""
        root = cache_root(cfg, output_dir)
        if root is None:
            return cls()
        folder = root / device_tag(info.device) / f"rank{info.rank}"
        report = _check(root, folder, info.rank)
        reports = dist.all_gather_object(report)
        if info.rank == 0:
            try:
                _print_start(root, folder, reports)
            except OSError as err:
                say("compile_cache", f"{folder}: {err}")
        return cls(root, folder if report["problem"] is None else None)

    def __enter__(self) -> "CompileCache":
        if self.folder is not None:
            self._previous_env = {name: os.environ.get(name) for name in _ENV}
            if self._previous_env["TORCHINDUCTOR_CACHE_DIR"] != str(self.folder):
                _restart_compile_workers()
            os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(self.folder)
            os.environ["TRITON_CACHE_DIR"] = str(self.folder / "triton")
            self._counters_at_start = cache_counters()
            self._bypasses.attach()
        return self

    def __exit__(self, *exc) -> bool:
        for name, value in self._previous_env.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        self._previous_env = {}
        self._bypasses.detach()
        return False

    def report_first_step(self) -> None:
        """Say what the cache gave this process so far (rank 0's line, after the first training step)."""
        if self.folder is None:
            return
        now, start = cache_counters(), self._counters_at_start
        d = {k: now[k] - start.get(k, 0) for k in now}
        hits, misses, bypasses = d["fxgraph_cache_hit"], d["fxgraph_cache_miss"], d["fxgraph_cache_bypass"]
        # A bypassed graph is compiled now and at every later start: the cache cannot hold it.
        compiled = misses + bypasses
        if hits + compiled == 0:
            verdict = "nothing compiled yet"
        elif compiled == 0:
            verdict = f"all {hits} compiled graphs from the cache"
        else:
            verdict = f"{hits} of {hits + compiled} compiled graphs from the cache, {compiled} compiled now" + (
                f" ({bypasses} of them at every start: the cache cannot hold them)" if bypasses else "")
        say("compile_cache", f"first step: {verdict} (FX graph cache {hits} hits, {misses} misses, "
            f"{bypasses} bypasses; AOTAutograd cache {d['autograd_cache_hit']} hits, "
            f"{d['autograd_cache_miss']} misses; rank 0){self._bypasses.summary()}{_compile_seconds()}")
        self._bypasses.detach()


def cache_root(cfg, output_dir: Path) -> Path | None:
    """The folder train_params.compile_cache names, or None when it is off (null/false) or nothing compiles."""
    value = cfg.train_params.compile_cache  # (the train_params schema gives every key its default)
    if value is None or value is False or str(value).strip().lower() in ("", "none", "null", "false"):
        return None
    if not compiles(cfg):
        return None
    name = "compile_cache" if value is True else os.path.expandvars(os.path.expanduser(str(value)))
    return (Path(output_dir) / name).absolute()


def compiles(cfg) -> bool:
    """Whether the job compiles anything: model parts (train_params.compile) or the loss (loss.compile)."""
    return bool(cfg.train_params.compile or (cfg.get("loss") or {}).get("compile"))


def device_tag(device: torch.device) -> str:
    """The torch build and device a cache folder is for, e.g. torch2.13.0+cu128-NVIDIA_H200."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"{device.type}-{platform.machine()}"
    return re.sub(r"[^A-Za-z0-9.+_-]+", "_", f"torch{torch.__version__}-{name}")


def _check(root: Path, folder: Path, rank: int) -> dict:
    """This rank's folder made, probed and repaired: what rank 0 reports."""
    problem = prepare(root, folder)
    started = time.perf_counter()
    files = size = graphs = 0
    removed: list[str] = []
    if problem is None:
        try:
            files, size, graphs, removed = check_folder(folder)
        except Exception as err:  # noqa: BLE001 -- a cache that cannot be checked is not used, the job goes on
            problem = f"cannot check it: {type(err).__name__}: {err}"
    return {"rank": rank, "problem": problem, "files": files, "bytes": size, "graphs": graphs, "removed": removed,
            "seconds": time.perf_counter() - started}


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


def cache_counters() -> dict:
    """Inductor's FX graph cache and AOTAutograd's cache lookups so far in this process."""
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
        say("compile_cache", f"compile workers not started early ({type(err).__name__}: {err})")


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
        warn("compile_cache", f"not using {folder}: {mine['problem']}; torch.compile uses its default "
              f"cache folder (in /tmp) instead")
    else:
        state = (f"warm: {mine['graphs']} compiled graphs, {mine['files']} files, {mine['bytes'] / 1e6:.1f} MB"
                 if mine["graphs"] else f"cold: no compiled graph yet ({mine['files']} files)")
        ranks = (f"; ranks with a warm cache: {sum(1 for r in reports if r['graphs'] and not r['problem'])} of "
                 f"{len(reports)}" if len(reports) > 1 else "")
        say("compile_cache", f"torch.compile cache: {folder} ({state}, checked in {mine['seconds']:.1f}s{ranks}); "
              f"one folder per rank; delete {root} to clear it")
    for report in reports[1:]:
        if report["problem"]:
            warn("compile_cache", f"rank {report['rank']} does not use its folder: {report['problem']}")
    for report in reports:
        if report["removed"]:
            shown = ", ".join(report["removed"][:5]) + (" ..." if len(report["removed"]) > 5 else "")
            say("compile_cache", f"rank {report['rank']}: removed {len(report['removed'])} broken file(s) "
                  f"a killed job left behind: {shown}")
    others = sorted(p.name for p in root.iterdir() if p.is_dir() and p.name != folder.parent.name) \
        if root.is_dir() else []
    if others:
        say("compile_cache", f"{root} also holds caches of other torch builds or devices, not used by this job: "
              f"{', '.join(others)} (delete them to free their space)")
