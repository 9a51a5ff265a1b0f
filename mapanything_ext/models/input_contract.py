"""What a model may see of a view: its images, never its ground truth.

Our views carry the ground truth the loss needs (depth, poses, intrinsics, points, rays, masks)
next to the images. A model that read any of it would score far too well, and nothing would
say so (a public OPV2V fork of MapAnything found its early results wrong for this reason).
`check_images_only(model, views)` runs the model on the views and on a copy whose ground
truth is replaced by other finite values of the same shape, and raises GroundTruthLeak naming
the predictions that changed. The tests run it on both model backends; the evaluation runs
it on its first sample and refuses to report when it fails.
"""

from __future__ import annotations

import torch

# Keys a model may read: the images and what describes them (metadata, never measurements).
INPUT_KEYS = frozenset({"img", "data_norm_type", "true_shape", "dataset", "label", "instance", "idx",
                        "is_synthetic"})


class GroundTruthLeak(RuntimeError):
    """The model's predictions depend on ground truth carried in its input views."""


def perturb_ground_truth(views: list[dict], seed: int = 0) -> list[dict]:
    """A copy of views whose every ground-truth tensor holds other values (same shape, dtype, device)."""
    generator = torch.Generator().manual_seed(seed)
    out = []
    for view in views:
        changed = dict(view)
        for key, value in view.items():
            if key in INPUT_KEYS or not torch.is_tensor(value):
                continue
            if value.dtype == torch.bool:
                changed[key] = ~value
            elif value.is_floating_point():
                noise = torch.rand(value.shape, generator=generator).to(value.device, value.dtype)
                changed[key] = value * 0.5 + 1.0 + noise
            else:
                changed[key] = value + 1
        out.append(changed)
    return out


@torch.no_grad()
def check_images_only(model: torch.nn.Module, views: list[dict]) -> None:
    """Raise GroundTruthLeak when changing the views' ground truth changes any prediction."""
    was_training = model.training
    model.eval()
    try:
        clean = model(views)
        perturbed = model(perturb_ground_truth(views))
    finally:
        model.train(was_training)
    changed = sorted({f"{key} (view {i})" for i, (a, b) in enumerate(zip(clean, perturbed)) for key in a
                      if torch.is_tensor(a[key]) and not torch.equal(a[key], b[key])})
    if changed:
        gt_keys = sorted(k for k, v in views[0].items() if torch.is_tensor(v) and k not in INPUT_KEYS)
        raise GroundTruthLeak(
            f"the model's predictions change when only the ground truth in its input views changes: "
            f"{', '.join(changed[:8])}{' ...' if len(changed) > 8 else ''}. It reads ground truth "
            f"(one of {', '.join(gt_keys)}); results would be meaningless."
        )
