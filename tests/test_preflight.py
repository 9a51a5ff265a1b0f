"""`python -m mapanything_ext.preflight` as a user runs it before a long job: real files, real processes.

Each broken set-up the issue names must give a non-zero exit with every problem listed; a good one exits 0.
The LiDAR check is independent geometry: the synthetic generator casts its LiDAR rays on its own, the
check moves them into each camera with the YAML's lidar_pose and cords only.
"""

import json
import os
import shutil
import socket
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from mapanything_ext.datasets.depth_codec import decode_depth, encode_depth_carla
from tests.training_runs import REPO

COMPACT = ["machine=local", "model=compact", "loss=compact_loss", "model.dim=32", "model.depth=1", "model.num_heads=2"]


def preflight(data, out, *extra, flags=()):
    cmd = [sys.executable, "-m", "mapanything_ext.preflight", *flags, *COMPACT,
           f"machine.opv2v_root={data / 'opv2v'}", f"machine.opv2v_depth_root={data / 'opv2v_depth'}",
           f"output_dir={out}", *extra]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)


def problems(proc):
    return [line for line in proc.stdout.splitlines() if line.startswith("[preflight] PROBLEM: ")]


@pytest.fixture
def data(synthetic_root, tmp_path):
    copy = tmp_path / "data"
    shutil.copytree(synthetic_root, copy)
    return copy


def test_help_exits_0_and_describes_every_check():
    proc = subprocess.run([sys.executable, "-m", "mapanything_ext.preflight", "--help"], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert all(word in proc.stdout for word in ("--scan-all", "LiDAR", "output_dir", "model.pretrained"))


def test_a_good_setup_passes_and_the_depth_agrees_with_the_lidar_in_every_camera(data, tmp_path):
    proc = preflight(data, tmp_path / "run")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    ratios = [line for line in proc.stdout.splitlines() if "decoded depth / LiDAR depth" in line]
    assert len(ratios) == 8  # 2 splits x 4 cameras
    for line in ratios:
        median = float(line.split("median ")[1].split()[0])
        assert abs(median - 1.0) < 0.02, line
    assert "[preflight] OK: the job can start" in proc.stdout


def test_missing_roots_and_a_depth_root_on_the_image_tree_fail(data, tmp_path):
    gone = preflight(tmp_path / "nowhere", tmp_path / "run")
    assert gone.returncode == 1
    assert len(problems(gone)) == 2 and all("is not a folder" in p for p in problems(gone))
    same = preflight(data, tmp_path / "run", f"machine.opv2v_depth_root={data / 'opv2v'}")
    assert same.returncode == 1 and any("is the image tree itself" in p for p in problems(same))


def test_a_wrong_depth_encoding_is_caught_against_the_lidar(data, tmp_path):
    # The raw-buffer mistake: CARLA's depth stored with red and blue swapped (BGRA read as RGBA).
    for png in (data / "opv2v_depth").rglob("*_depth*.png"):
        rgb = np.asarray(Image.open(png))
        Image.fromarray(np.ascontiguousarray(rgb[..., ::-1])).save(png)
    proc = preflight(data, tmp_path / "run")
    assert proc.returncode == 1
    found = problems(proc)
    assert any("decoded depth is" in p and "the LiDAR's depth" in p for p in found), proc.stdout[-3000:]


def test_depth_off_by_a_scale_names_every_camera(data, tmp_path):
    for png in (data / "opv2v_depth").rglob("*_depth*.png"):
        encode_depth_carla(decode_depth(png) * 1.5).save(png)
    proc = preflight(data, tmp_path / "run")
    found = [p for p in problems(proc) if "decoded depth is 1.5" in p]
    assert proc.returncode == 1 and len(found) == 8, proc.stdout[-3000:]


def test_every_problem_is_listed_at_once(data, tmp_path):
    """An image of the wrong size, a model that cannot be built, a pretrained file that does not load and
    an output folder held by a live job: one run names all four."""
    image = next((data / "opv2v" / "train").rglob("*_camera2.png"))
    Image.open(image).resize((100, 80)).save(image)
    bad_weights = tmp_path / "weights.pth"
    bad_weights.write_bytes(b"not a checkpoint")
    out = tmp_path / "run"
    out.mkdir()
    (out / ".run.lock").write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": "now"}))
    proc = preflight(data, out, "model.num_heads=3", f"model.pretrained={bad_weights}", flags=["--scan-all"])
    assert proc.returncode == 1
    found = problems(proc)
    assert any(image.name in p and "100x80" in p for p in found), found
    assert any("cannot be built" in p for p in found), found
    assert any("in use by a running job" in p for p in found), found
    assert "reading train" in proc.stderr  # --scan-all's progress bar
    assert "read (all)" in proc.stdout


def test_a_pretrained_file_that_does_not_fit_the_model_is_named(data, tmp_path):
    import torch

    weights = tmp_path / "other.pth"
    torch.save({"model": {"something.else": torch.zeros(3)}}, weights)
    proc = preflight(data, tmp_path / "run", f"model.pretrained={weights}")
    assert proc.returncode == 1
    assert any("does not load into compact" in p for p in problems(proc)), proc.stdout[-2000:]
