"""`loss.impl`: which implementation computes MapAnything's criterion, and the proof that they agree.

  reference  MapAnything's own loss classes, built from its loss strings.
  batched    ours (losses/batched_loss.py): the same objective for all views at once, no host
             synchronisation. A job stops if it disagrees with the reference at start.
  auto       batched once it agreed with the reference at job start (and in the preflight);
             otherwise the reference, with the mismatch logged (default).

Agreement means, on the same batch and predictions: the loss and every `details` entry within a
relative TOLERANCE, the same `details` keys, and the gradient with respect to every prediction
tensor of every view within TOLERANCE of the reference's norm (a gradient is compared as a vector:
its elements are sums whose order differs). The job-start check computes both in float64, where
the two differ by ~1e-10 when their mathematics agree, so rounding cannot fail a job while a
changed term (a fork's loss) still shows; tests/test_batched_loss.py also holds them to TOLERANCE
in float32 (measured worst 1.7e-6, up to 24 views). This keeps a user whose MapAnything fork
changed its loss from silently training another objective.
"""

from __future__ import annotations

import torch
from torch import nn

TOLERANCE = 1e-5
IMPLS = ("auto", "batched", "reference")


class LossMismatch(RuntimeError):
    """loss.impl=batched, and the batched criterion disagrees with MapAnything's."""


class ChosenCriterion(nn.Module):
    """criterion(views, preds) -> (loss, details) through the implementation `loss.impl` chose."""

    def __init__(self, role: str, impl: str, reference: nn.Module, batched: nn.Module | None, why_not: str = ""):
        super().__init__()
        if impl not in IMPLS:
            raise ValueError(f"loss.impl={impl!r}: choose one of {', '.join(IMPLS)}")
        if impl == "batched" and batched is None:
            raise ValueError(f"loss.impl=batched: the batched criterion cannot compute this {role} criterion: {why_not}. "
                             f"Use loss.impl=reference (or auto).")
        self.role, self.impl, self.why_not = role, impl, why_not
        self.reference, self.batched = reference, batched
        self.use_batched = impl == "batched"  # auto waits for the check

    def forward(self, views, preds):
        return (self.batched if self.use_batched else self.reference)(views, preds)

    def describe(self) -> str:
        which = "batched (all views at once)" if self.use_batched else "reference (MapAnything's own classes)"
        return f"{self.role} criterion: {which}, loss.impl={self.impl}"

    def self_check(self, views, preds, everyone_agrees=lambda ok: ok) -> str:
        """Run both on (views, preds) and settle which one runs; returns the line for console.log.
        `everyone_agrees(ok)` makes the choice collective (every rank must agree to use batched)."""
        if self.impl == "reference" or self.batched is None:
            reason = f" ({self.why_not})" if self.batched is None else ""
            return self.describe() + reason
        # Eagerly: a compiled criterion would compile again for float64 inputs.
        mismatches = compare(self.reference, self.batched.compute, views, preds)
        agreed = everyone_agrees(not mismatches)
        if agreed:
            self.use_batched = True
            return self.describe() + f"; agreed with the reference on the first batch (tolerance {TOLERANCE:g})"
        report = "; ".join(mismatches[:8]) or "another rank saw a mismatch"
        if self.impl == "batched":
            raise LossMismatch(f"loss.impl=batched: the batched {self.role} criterion disagrees with MapAnything's: "
                               f"{report}. Your MapAnything's loss may differ from v1.1's; use loss.impl=reference.")
        self.use_batched = False
        return self.describe() + f"; the batched criterion DISAGREED with the reference ({report}): using the reference"


def compare(reference, batched, views, preds, tolerance: float = TOLERANCE, dtype=torch.float64) -> list[str]:
    """The mismatches (term: reference value vs ours) of the two criteria on these predictions,
    both computed in `dtype`."""
    views, preds = as_dtype(views, dtype), as_dtype(preds, dtype)
    ref_loss, ref_details, ref_grads = loss_details_gradients(reference, views, preds)
    loss, details, grads = loss_details_gradients(batched, views, preds)
    found = []
    if not _close(loss, ref_loss, tolerance):
        found.append(f"loss: {ref_loss!r} vs {loss!r}")
    for key in sorted(set(ref_details) ^ set(details)):
        found.append(f"{key}: {'only in the reference' if key in ref_details else 'only in ours'}")
    for key in ref_details.keys() & details.keys():
        if not _close(details[key], ref_details[key], tolerance):
            found.append(f"{key}: {ref_details[key]!r} vs {details[key]!r}")
    for key, ref_grad in ref_grads.items():
        difference, norm = float((grads[key] - ref_grad).norm()), float(ref_grad.norm())
        if difference > tolerance * norm + 1e-12:
            found.append(f"gradient of view {key[0] + 1} {key[1]}: |difference| {difference:.3g} vs |gradient| {norm:.3g}")
    return found


def loss_details_gradients(criterion, views, preds) -> tuple[float, dict, dict]:
    """(loss, details, {(view, key): gradient of the loss}) with the predictions as fresh leaves."""
    with torch.enable_grad(), torch.autocast(_device_type(preds), enabled=False):
        leaves = [{key: value.detach().clone().requires_grad_(True) if _differentiable(value) else value
                   for key, value in pred.items()} for pred in preds]
        loss, details = criterion(views, leaves)
        keys = [(i, key) for i, pred in enumerate(leaves) for key, value in pred.items()
                if torch.is_tensor(value) and value.requires_grad]
        grads = torch.autograd.grad(loss, [leaves[i][key] for i, key in keys], allow_unused=True)
    grads = {key: torch.zeros_like(leaves[key[0]][key[1]]) if grad is None else grad for key, grad in zip(keys, grads)}
    return float(loss.detach()), dict(details), grads


def as_dtype(items: list[dict], dtype) -> list[dict]:
    return [{key: value.to(dtype) if _differentiable(value) else value for key, value in item.items()} for item in items]


def _differentiable(value) -> bool:
    return torch.is_tensor(value) and value.is_floating_point()


def _device_type(preds) -> str:
    first = next(v for v in preds[0].values() if torch.is_tensor(v))
    return first.device.type


def _close(value: float, reference: float, tolerance: float) -> bool:
    return abs(value - reference) <= tolerance * max(abs(value), abs(reference), 1e-6)


def predictions_for_check(views: list[dict], seed: int = 0) -> list[dict]:
    """Stand-in predictions for the preflight, which has no model: the ground truth disturbed,
    with every key MapAnything's heads predict (confidence >= 1, random mask logits)."""
    g = torch.Generator().manual_seed(seed)

    def noisy(t: torch.Tensor, scale: float) -> torch.Tensor:
        return t + scale * torch.randn(t.shape, generator=g).to(t)

    preds = []
    for view in views:
        batch = view["valid_mask"].shape[0]
        depth = view["depth_along_ray"].clamp_min(0.5) * torch.exp(noisy(torch.zeros_like(view["depth_along_ray"]), 0.1))
        preds.append({
            "pts3d": noisy(view["pts3d"], 0.1), "pts3d_cam": noisy(view["pts3d_cam"], 0.1),
            "ray_directions": noisy(view["ray_directions_cam"], 0.01), "depth_along_ray": depth,
            "cam_trans": noisy(view["camera_pose_trans"], 0.1), "cam_quats": noisy(view["camera_pose_quats"], 0.05),
            "metric_scaling_factor": torch.exp(noisy(torch.zeros(batch, 1), 0.3)),
            "conf": 1 + torch.rand(view["valid_mask"].shape, generator=g),
            "non_ambiguous_mask_logits": noisy(torch.zeros(view["valid_mask"].shape), 2.0),
        })
    return preds
