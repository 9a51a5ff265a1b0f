"""Every command shown in README.md and docs/*.md still works as written.

Each command found in a code block is run here in the cheapest form that still checks it: Hydra
commands compose their config (`--cfg job`, or `--cfg hydra --resolve` for a launcher), the pipeline
plans its jobs (`--dry-run`), everything else runs with `--help` or for real on tiny data. Commands
that cannot run on this machine are listed in NOT_HERE with the reason. A documented command that is
in neither list fails the test: a new command must say how it is checked.
"""

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCUMENTS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]

# Commands that cannot run here, and why (matched on their first words).
NOT_HERE = {
    "bash scripts/demo.sh": "the demo itself (minutes of training); `bash scripts/test.sh` is what CI runs",
    "bash scripts/test.sh": "the test suite itself: CI runs exactly this",
    "bash slurm/cluster.sh": "needs root, Slurm and network namespaces: tests/test_slurm.py starts and stops it",
    "source .venv/bin/activate": "a shell built-in for the reader's own shell",
    "git clone": "needs the internet (GitHub)",
    "pip install -e map-anything": "installs MapAnything from a clone the reader makes (internet)",
    "rsync": "copies to the reader's cluster",
    "python -c": "downloads the DINOv2 hub code (internet)",
    "python bench/bench_mapanything_step.py": "needs MapAnything and a GPU; --help is checked below",
    "python bench/bench_mapanything_loss.py": "needs MapAnything and a GPU; --help is checked below",
    "python bench/gpu_stages.py": "needs MapAnything, a GPU and 50 GB of disk; --help is checked below",
    "python bench/bench_scaling.py": "needs MapAnything and several GPUs; --help is checked below",
    "python bench/recipe_gpu.py": "needs MapAnything and a GPU; --help is checked below",
    "python bench/bench_kernels.py": "needs MapAnything and a GPU; --help is checked below",
    "python -m mapanything_ext.export": "needs MapAnything and a trained MapAnything checkpoint; --help is checked below",
}
HELP_ONLY = ["python bench/bench_mapanything_step.py", "python bench/bench_mapanything_loss.py",
             "python bench/gpu_stages.py", "python bench/bench_scaling.py", "python bench/recipe_gpu.py",
             "python bench/bench_kernels.py", "python bench/bench_stage3_mix.py", "python bench/bench_flops.py",
             "python -m mapanything_ext.export"]


def documented_commands() -> list[tuple[str, str]]:
    commands = []
    for doc in DOCUMENTS:
        for block in re.findall(r"```(?:bash)?\n(.*?)```", doc.read_text(), re.S):
            block = re.sub(r"\\\n\s*", " ", block)
            for line in block.splitlines():
                line = line.split("  #")[0].strip()
                if re.match(r"(python|torchrun|bash|source|git|pip|rsync)\b", line):
                    commands.append((doc.name, line))
    return commands


COMMANDS = documented_commands()


def placeholders(command: str, tmp: Path) -> str:
    """Fill the <...> placeholders and [...] option lists the way a reader would."""
    command = re.sub(r"\s\[[^\]]*\]", "", command)  # optional parts: the plain form is checked
    for name, value in {"<profile>": "slurm-test", "<checkpoints>": str(tmp), "<experiments>": str(tmp),
                        "<file>": str(tmp / "weights.pth"), "<folder>": str(tmp / "out"),
                        "<dir>": str(tmp / "sweep"), "<their run>": str(tmp / "their_run"),
                        "<old run>": str(tmp / "old_run"), "<ours>": str(tmp / "ours"),
                        "<a new folder>": str(tmp / "continued")}.items():
        command = command.replace(name, value)
    return command


def checked_form(command: str) -> list[str] | None:
    """The argv that checks this command here, or None when it is run for real."""
    argv = shlex.split(command)
    if argv[0] == "torchrun":  # the overrides compose the same config in one process
        argv = ["python", *argv[argv.index("-m"):]]
    if argv[:3] in (["python", "-m", "mapanything_ext.train.training"], ["python", "-m", "mapanything_ext.evaluate"]):
        if "-m" in argv[3:]:  # a sweep's first job, with its launcher config composed too
            return [*argv[:3], *[_first_value(a) for a in argv[3:] if a != "-m"], "--cfg", "job"]
        return [*argv, "--cfg", "job"]
    if argv[:3] == ["python", "-m", "mapanything_ext.pipeline"]:
        return [*argv, "--dry-run"]
    if argv[:2] == ["python", "tools/check_ckpt.py"]:
        return [*argv[:2], "--help"]
    if argv[:3] == ["python", "-m", "mapanything_ext.status"]:  # for real: no stage has started here
        return [*argv, f"machine.root_experiments_dir={REPO / 'tests' / 'no-such-experiments'}"]
    return None


def _first_value(override: str) -> str:
    """`key=a,b` (a sweep) -> `key=a`; anything else unchanged."""
    key, _, value = override.partition("=")
    return f"{key}={value.split(',')[0]}" if "," in value and "[" not in value else override


def test_every_documented_command_is_known():
    known = [c for _, c in COMMANDS if checked_form(c) is not None or any(c.startswith(p) for p in NOT_HERE)
             or c.startswith("python -m mapanything_ext.preflight") or c.startswith("python -m mapanything_ext.datasets")]
    unknown = [f"{doc}: {c}" for doc, c in COMMANDS if c not in known]
    assert COMMANDS and not unknown, "documented commands nobody checks (add them here):\n" + "\n".join(unknown)


@pytest.mark.parametrize("doc,command", [c for c in COMMANDS if checked_form(c[1]) is not None],
                         ids=lambda value: value[:70] if isinstance(value, str) else None)
def test_documented_command_composes(doc, command, tmp_path):
    argv = checked_form(placeholders(command, tmp_path))
    proc = subprocess.run([sys.executable, *argv[1:]], cwd=REPO, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, f"{doc}: {command}\n{proc.stdout[-1500:]}\n{proc.stderr[-2500:]}"


def test_documented_preflight_runs_and_names_what_is_missing(tmp_path):
    for _, command in [c for c in COMMANDS if c[1].startswith("python -m mapanything_ext.preflight")]:
        argv = shlex.split(placeholders(command, tmp_path))
        proc = subprocess.run([sys.executable, *argv[1:]], cwd=REPO, capture_output=True, text=True, timeout=180)
        # Here MapAnything is not installed and the weights file does not exist: both are named.
        assert proc.returncode in (0, 1) and "Traceback" not in proc.stderr, proc.stderr[-2000:]
        assert "[preflight]" in proc.stdout and "weights.pth does not exist" in proc.stdout


def test_documented_synthetic_data_command_runs(tmp_path):
    for _, command in [c for c in COMMANDS if c[1].startswith("python -m mapanything_ext.datasets.synthetic")]:
        argv = shlex.split(command.replace("/tmp/benchdata", str(tmp_path / "data")))
        argv += ["--width", "64", "--height", "48", "--splits", "train"]  # the documented command, smaller
        proc = subprocess.run([sys.executable, *argv[1:]], cwd=REPO, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert list((tmp_path / "data" / "opv2v" / "train").rglob("*_camera0.png"))


@pytest.mark.parametrize("prefix", HELP_ONLY)
def test_commands_that_need_a_gpu_or_mapanything_still_parse(prefix):
    argv = shlex.split(prefix)
    proc = subprocess.run([sys.executable, *argv[1:], "--help"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "usage" in (proc.stdout + proc.stderr).lower(), proc.stderr[-2000:]


def test_installed_console_script_runs():
    script = Path(sys.executable).parent / "check_ckpt"
    proc = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "usage: check_ckpt" in proc.stdout
