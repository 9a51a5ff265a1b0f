"""train_params.compile_cache: torch.compile's caches kept in the run folder, so a requeued job takes
its compiled graphs from there; files a killed job left broken are removed, not loaded; a folder that
cannot be used is not used; nothing else that walks a run folder trips over it."""

import errno
import fcntl
import os
import re
import shutil
import time
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from mapanything_ext.checkpoint.cli import collect
from mapanything_ext.cluster import distributed as dist
from mapanything_ext.train import compile_cache, compile_cache_repair
from mapanything_ext.train.compile_cache import CompileCache
from mapanything_ext.train.compile_cache_repair import TAG_NAME, check_folder, is_cache_dir
from tests.training_runs import start_ranks, tiny_overrides, wait_all

CPU = dist.DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), distributed=False, timeout_s=60)


def cfg_of(compile_cache_value="compile_cache", compile=True):
    return OmegaConf.create({"train_params": {"compile": compile, "compile_cache": compile_cache_value},
                             "loss": {"compile": False}})


def a_shared_library() -> Path:
    """A real ELF shared library (torch's extension module)."""
    return Path(torch._C.__file__)


def test_broken_files_are_removed_whole_ones_kept_and_graphs_counted(tmp_path):
    folder = tmp_path / "rank0"
    library = a_shared_library().read_bytes()
    files = {
        "ab/cab.py": b"def call(args):\n    return args\n",
        "cd/ccd.py": b"def call(args):\n    return (args,\n",  # cut short
        "ef/cef.py": b"",
        "gh/cgh.so": library,
        "ij/cij.main.so": library[: len(library) // 2],  # a build killed while it wrote
        "kl/ckl.so": b"",
        "triton/x/kernel.cubin": library[:40],
        "triton/x/kernel.json": b'{"name": "kernel"',
        "triton/x/__grp__kernel.json": b'{"child_paths": {}}',
        "fxgraph/ab/fkey/entry": b"pickled graph",  # pickled entries: Inductor checks them itself
        "aotautograd/akey/entry": b"pickled",
        "locks/cab.lock": b"",
    }
    for name, content in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(content)
    old, fresh = folder / "ab" / ".123.456.tmp", folder / "ab" / ".123.457.tmp"
    old.write_bytes(b"x")
    fresh.write_bytes(b"x")
    os.utime(old, (time.time() - 7200, time.time() - 7200))
    count, size, graphs, removed = check_folder(folder)
    removed_names = sorted(r.split(" ")[0] for r in removed)
    assert removed_names == sorted(["cd/ccd.py", "ef/cef.py", "ij/cij.main.so", "kl/ckl.so", "triton/x/kernel.cubin",
                                    "triton/x/kernel.json"]), removed
    assert any("truncated" in r for r in removed if r.startswith("ij/")), removed
    kept = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
    assert kept == sorted(["ab/cab.py", "gh/cgh.so", "triton/x/__grp__kernel.json", "fxgraph/ab/fkey/entry",
                           "aotautograd/akey/entry", "locks/cab.lock", "ab/.123.457.tmp", "locks/cij.lock",
                           "locks/ckl.lock"])
    assert (count, graphs) == (5, 1) and size == sum(len(files[n]) for n in (
        "ab/cab.py", "gh/cgh.so", "triton/x/__grp__kernel.json", "fxgraph/ab/fkey/entry", "aotautograd/akey/entry"))


def test_a_library_another_process_is_building_is_left_alone(tmp_path):
    folder = tmp_path / "rank0"
    (folder / "locks").mkdir(parents=True)
    half = folder / "ab" / "cab.so"
    half.parent.mkdir()
    half.write_bytes(a_shared_library().read_bytes()[:100])
    with open(folder / "locks" / "cab.lock", "a") as held:  # what Inductor holds while it builds cab
        fcntl.flock(held, fcntl.LOCK_EX)
        assert check_folder(folder)[3] == [] and half.exists()
    assert check_folder(folder)[3] and not half.exists()


def test_the_folder_lies_in_the_run_per_torch_build_and_rank_and_the_environment_is_restored(tmp_path, capsys,
                                                                                            monkeypatch):
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", "/somewhere/else")
    monkeypatch.delenv("TRITON_CACHE_DIR", raising=False)
    for off in (cfg_of(compile=False), cfg_of(None), cfg_of(False)):  # nothing compiles, or switched off
        with CompileCache.for_run(off, CPU, tmp_path) as cache:
            assert cache.folder is None and os.environ["TORCHINDUCTOR_CACHE_DIR"] == "/somewhere/else"
    assert not (tmp_path / "compile_cache").exists()
    with CompileCache.for_run(cfg_of(), CPU, tmp_path) as cache:
        expected = tmp_path / "compile_cache" / compile_cache.device_tag(CPU.device) / "rank0"
        assert cache.folder == expected and expected.is_dir()
        assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(expected)
        assert os.environ["TRITON_CACHE_DIR"] == str(expected / "triton")
        assert is_cache_dir(tmp_path / "compile_cache")
        assert torch.__version__ in expected.parent.name
        assert "(cold: no compiled graph yet" in capsys.readouterr().out
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == "/somewhere/else" and "TRITON_CACHE_DIR" not in os.environ
    shared = tmp_path / "shared"
    with CompileCache.for_run(cfg_of(str(shared)), CPU, tmp_path / "run") as cache:  # an absolute path: as it is
        assert cache.root == shared


def test_every_rank_has_its_own_folder_and_rank_0_reports_them_all(tmp_path, capsys):
    rank1 = dist.DistInfo(rank=1, world_size=2, local_rank=1, device=torch.device("cpu"), distributed=False,
                          timeout_s=60)
    with CompileCache.for_run(cfg_of(), rank1, tmp_path) as cache:
        assert cache.folder.name == "rank1" and capsys.readouterr().out == ""  # only rank 0 prints
    root = tmp_path / "compile_cache"
    folder = root / compile_cache.device_tag(CPU.device) / "rank0"
    (root / "torch2.12.0+cu126-NVIDIA_H100_80GB_HBM3").mkdir()
    reports = [{"rank": 0, "problem": None, "files": 50, "bytes": 2_000_000, "graphs": 8, "removed": [],
                "seconds": 0.1},
               {"rank": 1, "problem": None, "files": 3, "bytes": 10, "graphs": 0, "removed": ["ab/c.so (empty)"],
                "seconds": 0.1}]
    compile_cache._print_start(root, folder, reports)
    out = capsys.readouterr().out
    assert "(warm: 8 compiled graphs, 50 files, 2.0 MB" in out and "ranks with a warm cache: 1 of 2" in out
    assert "rank 1: removed 1 broken file(s) a killed job left behind: ab/c.so (empty)" in out
    assert "torch2.12.0+cu126-NVIDIA_H100_80GB_HBM3 (delete them to free their space)" in out


def test_a_folder_without_file_locks_is_not_used(tmp_path, capsys, monkeypatch):
    def no_flock(*_args):
        raise OSError(errno.ENOSYS, "Function not implemented")

    monkeypatch.setattr(compile_cache_repair.fcntl, "flock", no_flock)
    before = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    with CompileCache.for_run(cfg_of(), CPU, tmp_path) as cache:
        assert cache.folder is None and os.environ.get("TORCHINDUCTOR_CACHE_DIR") == before
    out = capsys.readouterr().out
    assert "WARNING: not using" in out and "refuses file locks" in out and "default cache folder" in out


def test_compile_workers_start_early_only_for_compiling_on_a_gpu_and_never_stop_a_job(monkeypatch, capsys):
    import torch._inductor.async_compile as async_compile

    calls = []
    monkeypatch.setattr(async_compile, "maybe_warm_pool", lambda: calls.append("warm"))
    compiling = OmegaConf.create({"train_params": {"compile": ["encoder.model.blocks.*"]}, "loss": {"compile": False}})
    loss_only = OmegaConf.create({"train_params": {"compile": False}, "loss": {"compile": True}})
    nothing = OmegaConf.create({"train_params": {"compile": False}, "loss": {"compile": False}})
    compile_cache.start_compile_workers(compiling, torch.device("cpu"))  # Inductor's workers build GPU kernels only
    compile_cache.start_compile_workers(nothing, torch.device("cuda", 0))
    assert calls == []
    compile_cache.start_compile_workers(compiling, torch.device("cuda", 0))
    compile_cache.start_compile_workers(loss_only, torch.device("cuda", 0))
    assert calls == ["warm", "warm"]

    def refuse():
        raise RuntimeError("no processes here")

    monkeypatch.setattr(async_compile, "maybe_warm_pool", refuse)
    compile_cache.start_compile_workers(compiling, torch.device("cuda", 0))
    assert "compile workers not started early (RuntimeError: no processes here)" in capsys.readouterr().out


def test_the_bypass_listener_passes_a_child_loggers_warning_on_once(caplog):
    """A warning of a logger below a listened one reaches the handlers above exactly once (the
    listened logger does not propagate; its listener hands warnings on), and its INFO reasons count."""
    import logging

    from mapanything_ext.train.cache_bypass import LOGGERS, BypassReasons

    child = logging.getLogger(LOGGERS[0] + ".child")
    with caplog.at_level(logging.WARNING):
        listener = BypassReasons().attach()
        try:
            child.warning("disk cache full")
            child.info("Bypassing FX Graph Cache because 'a reason'")
        finally:
            listener.detach()
    assert [r.getMessage() for r in caplog.records if r.name == child.name] == ["disk cache full"]
    assert listener.reasons == {"Bypassing FX Graph Cache because 'a reason'": 1}


def test_the_first_step_counts_graphs_the_cache_cannot_hold_and_names_torchs_reason(tmp_path, caplog):
    """A post-grad custom pass (as a user's config may set) makes Inductor bypass its FX graph cache:
    the graph is compiled at every start. The first-step line must not call that "from the cache",
    and says torch's reason; warnings of the loggers it listens to still reach torch's handlers."""
    import logging

    cache = CompileCache(tmp_path, tmp_path / "rank0")
    with cache, torch._inductor.config.patch(post_grad_custom_post_pass=lambda graph: None):
        torch._dynamo.reset()
        compiled = torch.compile(lambda x: (x * 2).sin().sum())
        compiled(torch.randn(8, requires_grad=True)).backward()
        logging.getLogger("torch._inductor.codecache").warning("a warning passes through")
        cache.report_first_step()
    line = next(line for line in caplog.text.splitlines() if "first step:" in line)
    assert "first step: all " not in line and "compiled now" in line and "at every start: the cache cannot hold them" in line, line
    assert re.search(r"FX graph cache 0 hits, 0 misses, [1-9]\d* bypasses", line), line
    assert "not cached: Bypassing FX Graph Cache because 'Unsupported post grad custom pass'" in line, line
    assert "a warning passes through" in caplog.text
    logger = logging.getLogger("torch._inductor.codecache")
    assert logger.propagate and logger.level != logging.INFO and cache._bypasses not in logger.handlers


def test_check_ckpt_does_not_search_the_cache(tmp_path):
    (tmp_path / "checkpoint-last.pth").write_bytes(b"")
    cache = tmp_path / "compile_cache" / "torch-x" / "rank0" / "ab"
    cache.mkdir(parents=True)
    (cache / ".123.456.tmp").write_bytes(b"half an entry of a killed write")
    (tmp_path / "compile_cache" / TAG_NAME).write_text("Signature: 8a477f597d28d172789f06886806bc55\n")
    (tmp_path / "quarantine").mkdir()
    (tmp_path / "quarantine" / "checkpoint-1.pth").write_bytes(b"")
    assert collect([str(tmp_path)]) == [tmp_path / "checkpoint-last.pth"]


# --- real runs: a job preempted after its third step and requeued, then a job on a damaged cache ----------

# Six steps: the signal at the second step stops the job after the third (the stop poll answers a
# step late), and the requeued start gets its own second step, where the signal comes again.
COMPILED = ("train_params.compile=[head_norm]", "train_params.epochs=1", "train_params.max_steps_per_epoch=6",
            "train_params.max_eval_steps=1", "train_params.max_num_of_imgs_per_gpu=4")
FIRST_STEP = re.compile(r"\[compile_cache\] first step: (.*) \(FX graph cache (\d+) hits, (\d+) misses")


def first_step_lines(out: Path) -> list[tuple[str, int, int]]:
    text = (out / "console.log").read_text()
    return [(m.group(1), int(m.group(2)), int(m.group(3))) for m in FIRST_STEP.finditer(text)]


@pytest.fixture(scope="module")
def requeued_run(synthetic_root, tmp_path_factory):
    """A job stopped by SIGUSR2 at its second step (a preemption), started again (the requeue), which
    is stopped the same way (no evaluation: nothing new to compile)."""
    logs = tmp_path_factory.mktemp("compile_cache_logs")
    out = tmp_path_factory.mktemp("compile_cache") / "run"
    overrides = tiny_overrides(synthetic_root, out, *COMPILED)
    for _ in range(2):
        codes = wait_all(start_ranks(overrides, 1, logs, env={"MAPANYTHING_EXT_FAULT": "SIGUSR2@train_step"}))
        assert codes == [3], (logs / "rank0.log").read_text()[-3000:]
    return out


@pytest.mark.slow
def test_a_requeued_job_takes_its_compiled_graphs_from_the_cache(requeued_run):
    console = (requeued_run / "console.log").read_text()
    tag = compile_cache.device_tag(torch.device("cpu"))
    starts = re.findall(r"\[compile_cache\] torch\.compile cache: (\S+) \((cold|warm)", console)
    folder = str(requeued_run / "compile_cache" / tag / "rank0")
    assert starts == [(folder, "cold"), (folder, "warm")], console[-3000:]
    (cold, cold_hits, cold_misses), (warm, warm_hits, warm_misses) = first_step_lines(requeued_run)
    assert cold_hits == 0 and cold_misses > 0, cold
    # The restart compiles nothing: every graph Inductor would build comes from the cache.
    assert warm_hits > 0 and warm_misses == 0, warm
    # torch's account of where the start's compile time went, with the cache line
    assert len(re.findall(r"first step: .*; compile time \(s\): in all [\d.]+, Dynamo tracing [\d.]+", console)) == 2
    assert "resumed from" in console and console.count("leaving for requeue") == 2
    assert collect([str(requeued_run)]) == sorted(requeued_run.glob("checkpoint-*.pth"))


@pytest.mark.slow
def test_a_damaged_cache_is_repaired_not_loaded(requeued_run, synthetic_root, tmp_path):
    shared = tmp_path / "shared_cache"
    shutil.copytree(requeued_run / "compile_cache", shared)
    rank0 = shared / compile_cache.device_tag(torch.device("cpu")) / "rank0"
    broken = [sorted(rank0.glob("*/*.so"))[0], sorted(rank0.glob("*/*.py"))[0],
              sorted(p for p in (rank0 / "fxgraph").rglob("*") if p.is_file())[0]]
    for path in broken:  # cut short, as by a job killed while it wrote (or a crashed node)
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    out = tmp_path / "run"
    overrides = tiny_overrides(synthetic_root, out, *COMPILED, f"train_params.compile_cache={shared}")
    # Stopped after its second step like the runs above: what the cache holds is all it compiles.
    codes = wait_all(start_ranks(overrides, 1, tmp_path, env={"MAPANYTHING_EXT_FAULT": "SIGUSR2@train_step"}))
    console = (out / "console.log").read_text()
    assert codes == [3], console[-3000:]
    assert f"torch.compile cache: {rank0} (warm" in console
    removed = re.search(r"rank 0: removed (\d) broken file\(s\)", console)
    assert removed and int(removed.group(1)) == 2, console[-3000:]  # the pickled entry: Inductor skips it itself
    assert not (out / "compile_cache").exists()
    (_, hits, misses), = first_step_lines(out)
    assert hits + misses > 0 and "checkpoint-last.pth written at stop point train_step" in console


@pytest.mark.parametrize("how", ["group_writable", "another_user", "symlink"])
def test_a_cache_folder_others_could_write_code_into_is_not_used(tmp_path, how, capsys):
    if os.geteuid() != 0 and how == "another_user":
        pytest.skip("giving a folder to another user needs root")
    root = tmp_path / "compile_cache"
    if how == "symlink":
        (tmp_path / "elsewhere").mkdir(mode=0o700)
        root.symlink_to(tmp_path / "elsewhere")
    else:
        root.mkdir()
        if how == "group_writable":
            root.chmod(0o775)
        else:
            os.chown(root, 4242, 4242)
    before = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    with CompileCache.for_run(cfg_of(), CPU, tmp_path) as cache:
        assert cache.folder is None and os.environ.get("TORCHINDUCTOR_CACHE_DIR") == before
    out = capsys.readouterr().out
    reason = {"group_writable": "writable by group or others (mode 0o775)", "another_user": "belongs to uid 4242",
              "symlink": "is a symbolic link"}[how]
    assert f"[compile_cache] WARNING: not using {root}" in out and reason in out, out


def test_a_cache_folder_the_job_makes_is_its_users_alone(tmp_path):
    old = os.umask(0o002)  # a umask that would leave new folders group-writable
    try:
        with CompileCache.for_run(cfg_of(), CPU, tmp_path) as cache:
            assert cache.folder is not None
    finally:
        os.umask(old)
    for path in (tmp_path / "compile_cache", cache.folder.parent, cache.folder):
        assert path.stat().st_mode & 0o777 == 0o700, path
