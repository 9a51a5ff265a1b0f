"""Camera-pose metrics as published tables define them (VGGT's relative-pose protocol, and ATE), with
the pairs inside one vehicle's rig kept apart from the pairs across vehicles.

Per view pair (i < j), from the relative poses j -> i:
  rotation error         the angle of R_pred^T R_gt (atan2 form, metrics.rotation_angle_deg)
  translation direction  the angle between the predicted and true relative translations, in the
                         atan2 form, folded to <= 90 deg (a direction is known up to its sign)
Over pairs pooled across samples (never a mean of per-sample values):
  RRA@t / RTA@t          the fraction of pairs whose rotation / translation-direction error is < t deg
  AUC@t                  the mean over thresholds 1..t deg of the fraction of pairs whose larger error
                         (max of the two) is below the threshold (VGGT's AUC@30, MapAnything's AUC@5)
Per sample:
  ATE                    the RMSE of the camera centres after the similarity transform (rotation,
                         translation, scale: Umeyama) that best aligns the predicted to the true ones

In `single` and `coop_main` every pair lies inside one vehicle's fixed rig, so those errors measure
the rig layout; the cross-vehicle pairs of `coop_all` measure registration between vehicles.
"""

from __future__ import annotations

import math

import torch

from mapanything_ext.geometry.rotations import rotation_angle_deg

THRESHOLDS_DEG = (5, 15, 30)
AUC_DEG = (5, 30)


def translation_direction_deg(a: torch.Tensor, b: torch.Tensor) -> float:
    """The angle between two directions up to sign, in [0, 90] deg; nan when either is ~zero."""
    a, b = a.double(), b.double()
    if a.norm() < 1e-12 or b.norm() < 1e-12:
        return math.nan
    # The cross product by its formula, one product at a time: a fused multiply-add would leave
    # ~1e-15 for two equal vectors, which must score exactly 0.
    cross = torch.stack([a[1] * b[2] - a[2] * b[1], a[2] * b[0] - a[0] * b[2], a[0] * b[1] - a[1] * b[0]])
    angle = math.degrees(float(torch.atan2(cross.norm(), torch.dot(a, b))))
    return min(angle, 180.0 - angle)


def pair_errors(poses_pred: list[torch.Tensor], poses_gt: list[torch.Tensor], vehicles: list[str]) -> list[dict]:
    """{rotation_deg, translation_deg, cross} of every view pair (4x4 camera-to-frame poses)."""
    pairs = []
    for i in range(len(poses_gt)):
        for j in range(i + 1, len(poses_gt)):
            rel_pred = torch.linalg.inv(poses_pred[i].double()) @ poses_pred[j].double()
            rel_gt = torch.linalg.inv(poses_gt[i].double()) @ poses_gt[j].double()
            pairs.append({"rotation_deg": rotation_angle_deg(rel_pred[:3, :3].T @ rel_gt[:3, :3]),
                          "translation_deg": translation_direction_deg(rel_pred[:3, 3], rel_gt[:3, 3]),
                          "cross": vehicles[i] != vehicles[j]})
    return pairs


def pooled(pairs: list[dict]) -> dict:
    """RRA/RTA at 5, 15, 30 deg and AUC at 5 and 30 deg over the pairs, for all, intra- and cross-vehicle
    pairs (keys suffixed _intra / _cross), with the pair counts."""
    out = {}
    for suffix, chosen in (("", pairs), ("_intra", [p for p in pairs if not p["cross"]]),
                           ("_cross", [p for p in pairs if p["cross"]])):
        out[f"pose_pairs{suffix}"] = len(chosen)
        rot = [p["rotation_deg"] for p in chosen]
        trans = [p["translation_deg"] for p in chosen]
        for t in THRESHOLDS_DEG:
            out[f"rra_{t}{suffix}"] = _fraction_below(rot, t)
            out[f"rta_{t}{suffix}"] = _fraction_below(trans, t)
        worst = [max(r, tr) if not (math.isnan(r) or math.isnan(tr)) else math.inf for r, tr in zip(rot, trans)]
        for t in AUC_DEG:
            out[f"auc_{t}{suffix}"] = (sum(_fraction_below(worst, k) for k in range(1, t + 1)) / t if worst
                                       else math.nan)
    return out


def _fraction_below(errors: list[float], threshold: float) -> float:
    if not errors:
        return math.nan
    return sum(1 for e in errors if e < threshold) / len(errors)  # nan compares False: counted as a miss


def ate_m(centres_pred: torch.Tensor, centres_gt: torch.Tensor) -> float:
    """RMSE (m) of the camera centres (N, 3) after the best similarity alignment of the predicted to the
    true ones (Umeyama); nan for fewer than 2 cameras."""
    x, y = centres_pred.double(), centres_gt.double()
    if len(x) < 2:
        return math.nan
    mx, my = x.mean(0), y.mean(0)
    xc, yc = x - mx, y - my
    var_x = (xc ** 2).sum() / len(x)
    if var_x < 1e-18:
        return float(((yc) ** 2).sum(1).mean().sqrt())
    u, d, vt = torch.linalg.svd(yc.T @ xc / len(x))
    s = torch.eye(3, dtype=torch.float64)
    if torch.det(u) * torch.det(vt) < 0:
        s[2, 2] = -1.0
    rotation = u @ s @ vt
    scale = (d * s.diagonal()).sum() / var_x
    aligned = scale * xc @ rotation.T + my
    return float(((aligned - y) ** 2).sum(1).mean().sqrt())
