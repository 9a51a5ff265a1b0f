"""Synthetic OPV2V generator: real layout and fields, deterministic, depth encodings."""

import filecmp

import numpy as np
import pytest
import yaml
from PIL import Image

from mapanything_ext.datasets.depth_codec import decode_depth, encode_depth_carla, encode_depth_heal8
from mapanything_ext.datasets.synthetic import generate, main


def test_layout_and_yaml_fields_follow_opv2v(synthetic_root):
    for split in ("train", "validate"):
        scenarios = list((synthetic_root / "opv2v" / split).iterdir())
        assert len(scenarios) == 1
        scenario = scenarios[0]
        assert len(scenario.name.split("_")) == 6 and scenario.name.startswith("20")
        assert (scenario / "data_protocol.yaml").is_file()
        cavs = sorted(p.name for p in scenario.iterdir() if p.is_dir())
        assert "641" in cavs and len(cavs) == 3
        frames = sorted(p.stem for p in (scenario / "641").glob("*.yaml"))
        assert frames == ["000069", "000071", "000073"]  # CARLA ids: 6 digits, step 2, not from 0
        for k in range(4):
            assert (scenario / "641" / f"000069_camera{k}.png").is_file()
            assert (synthetic_root / "opv2v_depth" / split / scenario.name / "641" / f"000069_depth{k}.png").is_file()
        meta = yaml.safe_load((scenario / "641" / "000069.yaml").read_text())
        for key in ("lidar_pose", "true_ego_pos", "predicted_ego_pos", "ego_speed", "vehicles", "plan_trajectory"):
            assert key in meta
        assert set(meta["camera0"]) == {"cords", "extrinsic", "intrinsic"}
        assert 650 + 9 in meta["vehicles"] and 641 not in meta["vehicles"]  # other CAVs listed, never itself
        vehicle = meta["vehicles"][659]
        assert set(vehicle) == {"angle", "center", "extent", "location", "speed"}
        image = Image.open(scenario / "641" / "000069_camera0.png")
        assert image.mode == "RGB" and image.size == (160, 120)
        assert np.asarray(image).std() > 20  # textured, carries signal


def test_same_seed_gives_identical_bytes(tmp_path):
    a = generate(tmp_path / "a", scenarios=1, frames=1, agents=2, seed=3, width=80, height=60, splits=("train",),
                 verbose=False)
    b = generate(tmp_path / "b", scenarios=1, frames=1, agents=2, seed=3, width=80, height=60, splits=("train",),
                 verbose=False)
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert len(files) == 1 + 2 * (1 + 4 + 1) + 2 * 4  # protocol; per vehicle yaml, 4 cameras, LiDAR; 4 depths
    for rel in files:
        assert filecmp.cmp(a / rel, b / rel, shallow=False), rel
    c = generate(tmp_path / "c", scenarios=1, frames=1, agents=2, seed=4, width=80, height=60, splits=("train",),
                 verbose=False)
    assert not filecmp.cmp(a / files[-1], next(c.rglob(files[-1].name)), shallow=False)


def test_cli_writes_heal8_depth(tmp_path, capsys):
    assert main([str(tmp_path), "--scenarios", "1", "--frames", "1", "--agents", "1", "--width", "80",
                 "--height", "60", "--splits", "test", "--depth-encoding", "heal8"]) == 0
    depth = next((tmp_path / "opv2v_depth" / "test").rglob("*_depth0.png"))
    assert Image.open(depth).mode == "L"
    assert "wrote" in capsys.readouterr().out


def test_depth_codecs_round_trip(tmp_path):
    depth = np.array([[0.0, 1.234567], [87.65, 999.0]])
    encode_depth_carla(depth).save(tmp_path / "c.png")
    assert np.allclose(decode_depth(tmp_path / "c.png"), depth, atol=1e-4)  # 24 bits over 1000 m
    encode_depth_heal8(depth).save(tmp_path / "h.png")
    assert decode_depth(tmp_path / "h.png").tolist() == [[0.0, 1.0], [88.0, 0.0]]  # 1 m steps, > 255 m invalid
    with pytest.raises(ValueError, match="expected 3x3"):
        decode_depth(tmp_path / "c.png", expected_size=(3, 3))
