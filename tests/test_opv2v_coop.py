"""Cooperative dataset: every vehicle in the main vehicle's frame, view counts, seeds, odd folders."""

import shutil

import numpy as np
import pytest

from mapanything_ext.datasets.opv2v import OPV2VCoopDataset
from tests.reprojection import reprojection_stats

RES = (154, 112)


def make(root, **kw):
    args = dict(root=root / "opv2v", depth_root=root / "opv2v_depth", split="train", resolution=RES, seed=0,
                num_views=12, min_num_views=4)
    args.update(kw)
    return OPV2VCoopDataset(**args)


def by_instance(views):
    return {v["instance"].split("/", 1)[1]: v for v in views}


def test_depth_of_one_vehicle_reprojects_into_another_within_one_percent(synthetic_root):
    views = by_instance(make(synthetic_root)[0])
    frame = next(iter(views)).split("/")[1]
    # vehicle 668 drives behind 659: its front camera sees what 659's front camera sees, larger
    a, b = views[f"668/{frame}/camera0"], views[f"659/{frame}/camera0"]
    stats = reprojection_stats(a["depthmap"][..., 0], a["camera_intrinsics"], a["camera_pose"],
                               b["depthmap"][..., 0], b["camera_intrinsics"], b["camera_pose"])
    assert stats["covisible_fraction"] > 0.5
    assert stats["median_rel_error"] < 0.01


def test_main_vehicle_front_camera_sits_at_the_main_vehicle_pose(synthetic_root):
    for mode, main in (("fixed", "641"), ("first", "641")):
        views = make(synthetic_root, main_agent_mode=mode)[1]
        front = views[0]
        assert front["instance"].split("/")[1] == main
        assert np.allclose(front["camera_pose"][:3, 3], [2.5, 0.0, 1.0], atol=1e-4)
        assert np.allclose(front["camera_pose"][:3, 2], [1.0, 0.0, 0.0], atol=1e-4)
    # another main vehicle moves the origin: 641's front camera is then elsewhere
    views = make(synthetic_root, main_agent="659")[1]
    assert views[0]["instance"].split("/")[1] == "659"
    front_641 = by_instance(views)[views[0]["instance"].split("/", 1)[1].replace("659", "641", 1)]
    assert np.linalg.norm(front_641["camera_pose"][:3, 3] - [2.5, 0, 1.0]) > 5.0


def test_view_counts_stay_in_the_configured_range(synthetic_root):
    for kw, expected in (({}, 12), ({"max_num_views": 6}, 6), ({"num_views": 8}, 8), ({"num_views": 10}, 10)):
        ds = make(synthetic_root, **kw)
        for i in range(len(ds)):
            views = ds[i]
            assert len(views) == ds.num_views_of(i) == expected
            assert views[0]["instance"].split("/")[1] == "641"
            assert [v["instance"].split("/")[1] for v in views[:4]] == ["641"] * 4  # main cameras always kept


def test_same_seed_same_samples_other_seed_other_choice(synthetic_root):
    def chosen(seed):
        ds = make(synthetic_root, seed=seed, max_num_views=6)
        return [[v["instance"] for v in ds[i]] for i in range(len(ds))]

    assert chosen(1) == chosen(1)
    assert any(chosen(s) != chosen(1) for s in (2, 3, 4))


def test_random_main_agent_is_seeded(synthetic_root):
    def mains(seed):
        ds = make(synthetic_root, seed=seed, main_agent_mode="random")
        return [ds[i][0]["instance"].split("/")[1] for i in range(len(ds))]

    assert mains(5) == mains(5)
    assert len({m for s in range(6) for m in mains(s)}) > 1


def test_frames_with_too_few_agents_are_not_sampled(synthetic_root, tmp_path, capsys):
    root = tmp_path / "copy"
    shutil.copytree(synthetic_root, root)
    scenario = next((root / "opv2v" / "train").iterdir())
    frames = sorted(p.stem for p in (scenario / "641").glob("*.yaml"))
    for cav in ("659", "668"):  # the first frame now has only the main vehicle
        (scenario / cav / f"{frames[0]}.yaml").unlink()
    ds = make(root, coop_min_agents=2)
    assert [s[1] for s in ds.samples] == frames[1:]
    out = capsys.readouterr().out
    assert "timestamps do not match" in out and "left out 1 timestamps" in out
    assert len(make(root, coop_min_agents=1)) == len(frames)
    assert len(make(root, coop_min_agents=1)[0]) == 4


def test_impossible_configuration_is_a_clear_error(synthetic_root):
    with pytest.raises(ValueError, match="max_num_views=3 is below min_num_views=4"):
        make(synthetic_root, max_num_views=3)
    with pytest.raises(ValueError, match="at least 5 vehicles"):
        make(synthetic_root, coop_min_agents=5)
    with pytest.raises(ValueError, match="main_agent_mode"):
        make(synthetic_root, main_agent_mode="biggest")
