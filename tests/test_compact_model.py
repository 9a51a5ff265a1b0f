"""Compact model: output contract, metric outputs consistent, gradient checkpointing exact."""

import torch

from mapanything_ext.geometry.rotations import matrix_to_quaternion, quaternion_to_matrix
from mapanything_ext.models.compact import CompactMapAnything


def views_of(batch=2, num_views=3, h=28, w=42, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [{"img": torch.randn(batch, 3, h, w, generator=g)} for _ in range(num_views)]


def test_outputs_follow_the_mapanything_contract():
    model = CompactMapAnything(dim=32, depth=1, num_heads=2)
    preds = model(views_of())
    assert len(preds) == 3
    p = preds[1]
    assert p["pts3d"].shape == (2, 28, 42, 3) and p["depth_along_ray"].shape == (2, 28, 42, 1)
    assert p["cam_quats"].shape == (2, 4) and p["cam_trans"].shape == (2, 3)
    assert p["metric_scaling_factor"].shape == (2, 1) and p["conf"].shape == (2, 28, 42)
    assert torch.allclose(p["ray_directions"].norm(dim=-1), torch.ones(2, 28, 42), atol=1e-5)
    assert torch.allclose(p["cam_quats"].norm(dim=-1), torch.ones(2), atol=1e-6)
    assert (p["conf"] >= 1).all()
    # points in the reference frame = R * (ray * depth) + t, the contract's definition
    rot = quaternion_to_matrix(p["cam_quats"])
    expected = torch.einsum("bij,bhwj->bhwi", rot, p["ray_directions"] * p["depth_along_ray"])
    assert torch.allclose(p["pts3d"], expected + p["cam_trans"][:, None, None], atol=1e-4)


def test_gradient_checkpointing_changes_memory_not_numbers():
    torch.manual_seed(0)
    plain = CompactMapAnything(dim=32, depth=2, num_heads=2)
    ckpt = CompactMapAnything(dim=32, depth=2, num_heads=2, gradient_checkpointing=True)
    ckpt.load_state_dict(plain.state_dict())
    grads = []
    for model in (plain, ckpt):
        loss = sum(p["pts3d"].square().mean() + p["cam_trans"].sum() for p in model(views_of()))
        loss.backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert torch.allclose(grads[0], grads[1], rtol=1e-5, atol=1e-6)


def test_image_size_must_be_a_multiple_of_the_patch():
    model = CompactMapAnything(dim=32, depth=1, num_heads=2)
    try:
        model(views_of(h=30))
    except ValueError as err:
        assert "multiple of the patch size" in str(err)
    else:
        raise AssertionError("expected a ValueError")


def test_quaternion_round_trip_including_half_turns():
    angles = torch.tensor([0.0, 0.3, 3.14159, -2.0])
    mats = []
    for a in angles:
        c, s = torch.cos(a), torch.sin(a)
        mats.append(torch.tensor([[c, -s, 0], [s, c, 0], [0, 0, 1.0]]))
        mats.append(torch.tensor([[1.0, 0, 0], [0, c, -s], [0, s, c]]))
    r = torch.stack(mats)
    q = matrix_to_quaternion(r)
    assert torch.allclose(quaternion_to_matrix(q), r, atol=1e-5)
    assert (q[:, 3] >= 0).all()
