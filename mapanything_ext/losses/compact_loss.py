"""Loss of the compact model, over MapAnything's prediction quantities.

Everything is compared in the first view's camera frame (the frame the model predicts
in), in metres, so the metric scale is supervised through every term:

  depth     |log d_pred - log d_gt| along the ray, valid pixels
  rays      L1 between predicted and true unit ray directions, all pixels
  points    |p_pred - p_gt| / |p_gt| in the first view's frame, valid pixels
  pose      translation L1 (metres, scaled by `trans_weight`) + quaternion L1 (sign-invariant)
  scale     |log s_pred - log s_gt| of the mean point distance (keeps the scale head honest)

With `use_confidence` the per-pixel terms are confidence-weighted, c * err - alpha * log c
(the train criterion); the test criterion uses the plain mean.
"""

from __future__ import annotations

import torch

from mapanything_ext.geometry.rotations import matrix_to_quaternion


def relative_ground_truth(views: list[dict]) -> list[dict]:
    """Ground truth of every view expressed in the first view's camera frame."""
    world_to_ref = torch.linalg.inv(views[0]["camera_pose"].double())
    out = []
    for view in views:
        rel = (world_to_ref @ view["camera_pose"].double()).float()
        pts = view["pts3d"].float()
        pts_ref = torch.einsum("bij,bhwj->bhwi", world_to_ref[:, :3, :3].float(), pts) + world_to_ref[:, None, None, :3, 3].float()
        out.append(
            {
                "pts3d": pts_ref,
                "trans": rel[:, :3, 3],
                "quats": matrix_to_quaternion(rel[:, :3, :3]),
                "depth_along_ray": view["depth_along_ray"].float(),
                "rays": view["ray_directions_cam"].float(),
                "valid": view["valid_mask"].bool(),
            }
        )
    return out


def _masked_mean(err: torch.Tensor, mask: torch.Tensor, conf: torch.Tensor | None, alpha: float) -> torch.Tensor:
    if conf is not None:
        err = conf * err - alpha * torch.log(conf)
    count = mask.sum().clamp(min=1)
    return (err * mask).sum() / count


class CompactLoss:
    def __init__(self, use_confidence: bool = True, conf_alpha: float = 0.2, trans_weight: float = 0.1,
                 scale_weight: float = 0.5):
        self.use_confidence = use_confidence
        self.conf_alpha = conf_alpha
        self.trans_weight = trans_weight
        self.scale_weight = scale_weight

    def __call__(self, views: list[dict], preds: list[dict]) -> tuple[torch.Tensor, dict]:
        gts = relative_ground_truth(views)
        terms = {"depth": 0.0, "rays": 0.0, "points": 0.0, "trans": 0.0, "quats": 0.0}
        for gt, pred in zip(gts, preds):
            valid = gt["valid"]
            conf = pred["conf"].float() if self.use_confidence else None
            d_pred = pred["depth_along_ray"].float()[..., 0].clamp(min=1e-6)
            d_gt = gt["depth_along_ray"][..., 0].clamp(min=1e-6)
            terms["depth"] = terms["depth"] + _masked_mean((d_pred.log() - d_gt.log()).abs(), valid, conf, self.conf_alpha)
            terms["rays"] = terms["rays"] + (pred["ray_directions"].float() - gt["rays"]).abs().sum(-1).mean()
            rel_err = (pred["pts3d"].float() - gt["pts3d"]).norm(dim=-1) / gt["pts3d"].norm(dim=-1).clamp(min=1e-3)
            terms["points"] = terms["points"] + _masked_mean(rel_err, valid, conf, self.conf_alpha)
            terms["trans"] = terms["trans"] + (pred["cam_trans"].float() - gt["trans"]).abs().sum(-1).mean()
            q_pred = pred["cam_quats"].float()
            q_err = torch.minimum((q_pred - gt["quats"]).abs().sum(-1), (q_pred + gt["quats"]).abs().sum(-1))
            terms["quats"] = terms["quats"] + q_err.mean()
        terms = {k: v / len(views) for k, v in terms.items()}
        terms["scale"] = self._scale_error(gts, preds)
        loss = (terms["depth"] + terms["rays"] + terms["points"] + self.trans_weight * terms["trans"]
                + terms["quats"] + self.scale_weight * terms["scale"])
        details = {f"{k}_loss": float(v.detach()) for k, v in terms.items()}
        return loss, details

    @staticmethod
    def _scale_error(gts: list[dict], preds: list[dict]) -> torch.Tensor:
        """Log ratio of predicted to true mean valid point distance, per sample."""
        def mean_dist(points: list[torch.Tensor]) -> torch.Tensor:
            num = sum((p.norm(dim=-1) * g["valid"]).flatten(1).sum(1) for p, g in zip(points, gts))
            den = sum(g["valid"].flatten(1).sum(1) for g in gts).clamp(min=1)
            return (num / den).clamp(min=1e-6)

        pred_d = mean_dist([p["pts3d"].float() for p in preds])
        gt_d = mean_dist([g["pts3d"] for g in gts])
        return (pred_d.log() - gt_d.log()).abs().mean()
