"""Single-vehicle OPV2V dataset on synthetic data: contract, geometry, clear errors."""

import shutil

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from mapanything_ext.datasets.depth_codec import decode_depth
from mapanything_ext.datasets.opv2v import (OPV2VDataset, _convert_pose_to_opencv, body_frame, cords_to_pose,
                                            load_frame_metadata)
from mapanything_ext.geometry.projection import M4_CV_TO_UE, S4, inverse_rigid, pose6_from_matrix, x_to_world
from tests.reprojection import reprojection_stats

RES = (112, 84)


def make(root, split="train", resolution=RES):
    return OPV2VDataset(root=root / "opv2v", depth_root=root / "opv2v_depth", split=split, resolution=resolution,
                        seed=0)


def frame_files(root, cav="641"):
    scenario = next((root / "opv2v" / "train").iterdir())
    frames = sorted(p.stem for p in (scenario / cav).glob("*.yaml"))
    return scenario, frames


def world_view(root, scenario, cav, frame, k):
    """(depth, intrinsics, cam2world in the mirrored world) straight from the files."""
    meta = load_frame_metadata(scenario / cav / f"{frame}.yaml")
    depth = decode_depth(root / "opv2v_depth" / "train" / scenario.name / cav / f"{frame}_depth{k}.png")
    cam = meta[f"camera{k}"]
    return depth, cam["intrinsic"], _convert_pose_to_opencv(cords_to_pose(cam["cords"]))


def test_views_follow_the_ground_truth_contract(synthetic_root):
    ds = make(synthetic_root)
    assert len(ds) == 3 * 3  # 3 vehicles x 3 frames
    views = ds[0]
    assert len(views) == 4
    v = views[0]
    assert v["img"].shape == (3, 84, 112) and v["img"].dtype == torch.float32
    assert abs(float(v["img"].mean())) < 3  # normalised, not 0..255
    assert v["depthmap"].shape == (84, 112, 1) and v["pts3d"].shape == (84, 112, 3)
    assert v["valid_mask"].dtype == np.bool_ and v["valid_mask"].mean() > 0.3
    assert v["camera_intrinsics"].shape == (3, 3) and v["camera_pose"].shape == (4, 4)
    assert tuple(v["true_shape"]) == (84, 112)
    assert np.allclose(np.linalg.norm(v["ray_directions_cam"], axis=-1), 1, atol=1e-5)
    # derived quantities agree with each other
    valid = v["valid_mask"]
    assert np.allclose(v["pts3d_cam"][..., 2][valid], v["depthmap"][..., 0][valid], rtol=1e-5)
    world = v["pts3d_cam"] @ v["camera_pose"][:3, :3].T + v["camera_pose"][:3, 3]
    assert np.allclose(world[valid], v["pts3d"][valid], atol=1e-3)
    assert v["instance"].endswith("/641/000069/camera0") and v["label"].startswith("train/")
    assert v["is_metric_scale"] and v["is_synthetic"]
    assert np.all(np.isfinite(v["camera_pose"]))
    batch = torch.utils.data.default_collate([ds[0], ds[1]])
    assert batch[0]["img"].shape == (2, 3, 84, 112) and len(batch[0]["instance"]) == 2


def test_depth_reprojects_across_timestamps_within_one_percent(synthetic_root):
    scenario, frames = frame_files(synthetic_root)
    a = world_view(synthetic_root, scenario, "641", frames[0], 0)
    b = world_view(synthetic_root, scenario, "641", frames[1], 0)
    stats = reprojection_stats(*a, *b)
    assert stats["covisible_fraction"] > 0.5
    assert stats["median_rel_error"] < 0.01


def test_depth_reprojects_after_resize_and_crop(synthetic_root):
    """Same check on the dataset's resized views, brought into one frame via the body poses."""
    ds = make(synthetic_root, resolution=(154, 112))
    scenario, frames = frame_files(synthetic_root)
    idx = [ds.samples.index((scenario.name, "641", f)) for f in frames[:2]]
    views = [ds[i][0] for i in idx]
    bodies = [body_frame(load_frame_metadata(scenario / "641" / f"{f}.yaml")) for f in frames[:2]]
    poses = [body @ v["camera_pose"].astype(np.float64) for body, v in zip(bodies, views)]
    stats = reprojection_stats(views[0]["depthmap"][..., 0], views[0]["camera_intrinsics"], poses[0],
                               views[1]["depthmap"][..., 0], views[1]["camera_intrinsics"], poses[1])
    assert stats["covisible_fraction"] > 0.4
    assert stats["median_rel_error"] < 0.01


def test_a_naive_pose_convention_fails_the_reprojection_check(synthetic_root):
    """The check has teeth: dropping the pitch/roll sign flips (a known public bug) breaks agreement."""
    scenario, frames = frame_files(synthetic_root)

    def naive(cav, frame):
        depth, k, _ = world_view(synthetic_root, scenario, cav, frame, 0)
        x, y, z, roll, yaw, pitch = load_frame_metadata(scenario / cav / f"{frame}.yaml")["camera0"]["cords"]
        wrong = x_to_world([x, y, z, -roll, yaw, -pitch])  # = Rz(yaw) Ry(pitch) Rx(roll)
        return depth, k, S4 @ wrong @ M4_CV_TO_UE

    # vehicle 659 across two timestamps: its pitch and roll differ between them
    good = reprojection_stats(*world_view(synthetic_root, scenario, "659", frames[0], 0),
                              *world_view(synthetic_root, scenario, "659", frames[1], 0))
    bad = reprojection_stats(*naive("659", frames[0]), *naive("659", frames[1]))
    assert good["median_rel_error"] < 0.01
    assert bad["median_rel_error"] > 2 * good["median_rel_error"]
    assert bad["covisible_fraction"] < 0.8 * good["covisible_fraction"]


def test_front_camera_looks_along_heading_back_camera_against_it(synthetic_root):
    scenario, frames = frame_files(synthetic_root)
    for frame in frames:
        meta = load_frame_metadata(scenario / "641" / f"{frame}.yaml")
        yaw = meta["true_ego_pos"][4]
        heading = S4[:3, :3] @ np.array([np.cos(np.radians(yaw)), np.sin(np.radians(yaw)), 0.0])
        axes = [_convert_pose_to_opencv(cords_to_pose(meta[f"camera{k}"]["cords"]))[:3, 2] for k in range(4)]
        assert axes[0] @ heading > 0.99
        assert axes[3] @ heading < -0.99
        # camera1 sits on the right (CARLA y > 0) and looks right: in our right-handed frame right is -y
        left = np.cross([0, 0, 1.0], heading)
        assert axes[1] @ left < -0.9 and axes[2] @ left > 0.9
    # some frame has non-zero pitch or roll, so the check above covers the sign conventions
    assert any(abs(load_frame_metadata(p)["true_ego_pos"][5]) > 0.2 for p in (scenario / "641").glob("*.yaml"))


def test_every_pose_is_a_proper_rigid_transform(synthetic_root):
    ds = make(synthetic_root)
    for i in range(len(ds)):
        for v in ds[i]:
            rot = v["camera_pose"][:3, :3].astype(np.float64)
            assert np.allclose(rot @ rot.T, np.eye(3), atol=1e-5)
            assert np.linalg.det(rot) == pytest.approx(1.0, abs=1e-5)


def test_yaml_numbers_round_trip_through_opencv_and_back(synthetic_root):
    scenario, frames = frame_files(synthetic_root)
    meta = load_frame_metadata(scenario / "641" / f"{frames[0]}.yaml")
    for k in range(4):
        cords = meta[f"camera{k}"]["cords"]
        cv = _convert_pose_to_opencv(cords_to_pose(cords))
        back = pose6_from_matrix(S4 @ cv @ inverse_rigid(M4_CV_TO_UE))
        assert np.allclose(back[:3], cords[:3], atol=1e-9)
        assert np.allclose((np.array(back[3:]) - cords[3:] + 180) % 360 - 180, 0, atol=1e-7)
        extrinsic = np.asarray(meta[f"camera{k}"]["extrinsic"])
        expected = inverse_rigid(cords_to_pose(cords)) @ cords_to_pose(meta["lidar_pose"])
        assert np.allclose(extrinsic, expected, atol=1e-9)


def test_front_camera_of_a_sample_sits_at_its_mount(synthetic_root):
    v = make(synthetic_root)[0][0]
    # body frame: x forward, y left, z up, origin at true_ego_pos (z = 0.03 above ground)
    assert np.allclose(v["camera_pose"][:3, 3], [2.5, 0.0, 1.0], atol=1e-4)
    assert np.allclose(v["camera_pose"][:3, 2], [1, 0, 0], atol=1e-4)


@pytest.fixture()
def broken_root(synthetic_root, tmp_path):
    shutil.copytree(synthetic_root, tmp_path / "copy")
    return tmp_path / "copy"


def _first_frame(root):
    scenario, frames = frame_files(root)
    return scenario, scenario / "641" / frames[0]


def test_missing_camera_image_names_the_file(broken_root):
    _, stem = _first_frame(broken_root)
    (stem.parent / f"{stem.name}_camera2.png").unlink()
    ds = make(broken_root)
    with pytest.raises(FileNotFoundError, match=f"{stem.name}_camera2.png"):
        ds[ds.samples.index((stem.parent.parent.name, "641", stem.name))]


def test_missing_depth_names_the_file(broken_root):
    scenario, stem = _first_frame(broken_root)
    (broken_root / "opv2v_depth" / "train" / scenario.name / "641" / f"{stem.name}_depth1.png").unlink()
    ds = make(broken_root)
    with pytest.raises(FileNotFoundError, match=f"{stem.name}_depth1.png"):
        ds[ds.samples.index((scenario.name, "641", stem.name))]


def test_unreadable_and_incomplete_yaml_name_the_file(broken_root):
    scenario, stem = _first_frame(broken_root)
    path = stem.parent / f"{stem.name}.yaml"
    data = yaml.safe_load(path.read_text())
    del data["camera3"]
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ValueError, match=f"{stem.name}.yaml.*camera3"):
        load_frame_metadata(path)
    path.write_text("camera0: [unclosed")
    with pytest.raises(ValueError, match=f"unreadable.*{stem.name}.yaml"):
        load_frame_metadata(path)
    with pytest.raises(ValueError, match="missing"):
        load_frame_metadata(stem.parent / "999999.yaml")


def test_non_finite_pose_names_the_file_and_field(broken_root):
    _, stem = _first_frame(broken_root)
    path = stem.parent / f"{stem.name}.yaml"
    data = yaml.safe_load(path.read_text())
    data["camera1"]["cords"][4] = float("nan")
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ValueError, match=f"{stem.name}.yaml: camera1.cords is not finite"):
        load_frame_metadata(path)


def test_wrong_image_size_and_depth_mode_are_clear_errors(broken_root):
    scenario, stem = _first_frame(broken_root)
    image = stem.parent / f"{stem.name}_camera0.png"
    Image.open(image).resize((100, 50)).save(image)
    ds = make(broken_root)
    index = ds.samples.index((scenario.name, "641", stem.name))
    with pytest.raises(ValueError, match="camera0.png is 100x50"):
        ds[index]
    depth = broken_root / "opv2v_depth" / "train" / scenario.name / "641" / f"{stem.name}_depth0.png"
    Image.fromarray(np.zeros((4, 4), dtype=np.uint16)).save(depth)
    with pytest.raises(ValueError, match="depth0.png"):
        decode_depth(depth)


def test_vehicle_folder_without_yaml_is_skipped_with_a_message(broken_root, capsys):
    scenario, _ = _first_frame(broken_root)
    for f in (scenario / "659").glob("*.yaml"):
        f.unlink()
    ds = make(broken_root)
    assert "vehicle folder without frame YAML" in capsys.readouterr().out
    assert all(cav != "659" for _, cav, _ in ds.samples)


def test_missing_data_root_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="opv2v_root"):
        OPV2VDataset(root=tmp_path / "nope", depth_root=tmp_path, split="train", resolution=RES)
