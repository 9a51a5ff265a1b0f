"""`pip install -e .` beside a cluster's own torch keeps that torch."""

import json
import subprocess
import sys
import tomllib
from pathlib import Path

from packaging.requirements import Requirement

REPO = Path(__file__).resolve().parents[1]


def torch_requirement() -> Requirement:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    return next(Requirement(r) for r in project["dependencies"] if Requirement(r).name == "torch")


def test_the_package_asks_for_a_torch_range_not_a_pin():
    specifier = torch_requirement().specifier
    for version in ("2.11.0", "2.13.0", "2.14.1", "2.20.0+cu130"):
        assert specifier.contains(version, prereleases=True), version
    assert not specifier.contains("2.10.0")  # older than anything tested
    assert "torch==2.13.0" in (REPO / "scripts" / "constraints-cpu.txt").read_text()


def test_installing_the_package_into_an_environment_with_torch_installs_no_torch():
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--no-index", "--no-build-isolation",
                           "--quiet", "--report", "-", "-e", str(REPO)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(proc.stdout)
    names = sorted(item["metadata"]["name"] for item in report["install"])
    assert names == ["mapanything-ext"], names  # the torch already here satisfies the range and stays
