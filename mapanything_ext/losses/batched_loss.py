"""MapAnything's factored-geometry training criterion, computed for all views of a batch at once.

MapAnything's own criterion (`loss=overall_loss`, built from its loss strings) loops over views in
Python, selects pixels with boolean indexing and reads values back to the host for its bookkeeping:
hundreds of small kernels and host synchronisations per step that keep the GPU waiting. This
module computes the same objective from its mathematics with the views stacked into one leading
dimension (V, B, H, W, ...), masks applied as weights (`torch.where`), so the forward and backward
hold no host synchronisation; the details are read back once, when the engine first reads them.

What it computes (per view v, sample b, pixel p; `rho` is the robust regression
`|a-2|/a * (((x/c)^2 / |a-2| + 1)^(a/2) - 1)` summed over the vector's components):
- ground truth in view 0's camera frame; predictions divided by their metric scaling factor;
  both divided by their own joint `avg_dis` factor (mean distance of the valid points of all views);
- per-pixel terms: world points, camera points, depth (log-compressed `x/|x| * log1p|x|` when
  `loss_in_log`) and ray directions; per-view pose terms: quaternion (sign-invariant) and
  translation (samples with a valid pixel); one scale term on the factors of metric samples;
- optional normal loss (angles of the four triangle normals of each pixel quad) and 4-scale
  gradient matching of log depth-z, on synthetic samples only when so configured;
- the aggregation MapAnything's wrappers apply: confidence weighting `loss*conf - alpha*log(conf)`
  on chosen sets, the bottom (100 - top_n)% of each real sample's valid pixels on others (all
  valid pixels of synthetic samples), masked means elsewhere; plus the weighted BCE of the
  non-ambiguous-mask logits.

Compiled, sums over pixels run row by row: each image row first (V x B x H values), then the
rows. With Inductor's split reductions off (BatchedCriterion), a reduction runs one thread block per
value it produces, so one sum over a whole view, or over all views of a sample, kept one of the
GPU's 132 processors busy while the others waited: 10 to 32 ms per 12-view step on an H200 for the
gradient of the avg_dis factor alone. Values that divide per-pixel tensors (the factors, the metric
scale) are spread over the rows first (`_over_rows`), so that their gradients sum the same way.
Eagerly, each sum is one reduction in the order MapAnything's own sums take, so the two criteria
agree to rounding (tests/test_batched_loss.py); Inductor orders its sums its own way regardless.

`mapanything_adapter.batched_spec_of` reads a `LossSpec` off a criterion built from MapAnything's loss
strings and refuses what this module does not implement; `losses/loss_selfcheck.py` proves on real
batches that both agree. The `details` names and values are MapAnything's.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from mapanything_ext.console import warn
from mapanything_ext.dynamic_dims import mark_leading_dims_dynamic
from mapanything_ext.geometry.rotations import quaternion_multiply, quaternion_to_matrix
from mapanything_ext.readback import HostCopy

# Whether torch.compile is tracing this code (a name of our own, so tests can run the compiled
# formulation eagerly).
_compiling = torch.compiler.is_compiling

# The loss sets of MapAnything's factored criterion, in its order (world points only when computed).
DENSE_SETS = ("pts3d", "cam_pts3d", "depth", "ray_directions", "pose_quats", "pose_trans")
MASKED_SETS = ("pts3d", "cam_pts3d", "depth")


@dataclass(frozen=True)
class FactoredSpec:
    """The per-pixel factored loss (MapAnything's FactoredGeometryScaleRegr3D[PlusNormalGMLoss])."""

    name: str = "FactoredGeometryScaleRegr3DPlusNormalGMLoss"  # prefix of its details
    robust_alpha: float = 0.5
    robust_c: float = 0.05
    loss_in_log: bool = True
    depth_type: str = "depth_along_ray"  # or "depth_z"
    norm_predictions: bool = True
    world_points: bool = True
    normal_and_gm: bool = True
    normal_and_gm_synthetic_only: bool = True
    weights: dict = field(default_factory=lambda: {
        "pts3d": 1.0, "cam_pts3d": 1.0, "depth": 1.0, "ray_directions": 1.0, "pose_quats": 1.0,
        "pose_trans": 1.0, "scale": 1.0, "normal": 3.0, "gradient_matching": 3.0})

    def sets(self) -> tuple[str, ...]:
        return DENSE_SETS if self.world_points else DENSE_SETS[1:]

    def detail_name(self, term: str) -> str:
        return self.depth_type if term == "depth" else term


@dataclass(frozen=True)
class LossSpec:
    """The whole criterion: aggregation of the factored loss's sets, plus the mask loss."""

    factored: FactoredSpec = field(default_factory=FactoredSpec)
    conf_sets: tuple[int, ...] = (0,)
    exclude_sets: tuple[int, ...] = (1, 2)
    conf_alpha: float = 0.2
    top_n_percent: float = 5
    exclude_real_only: bool = True
    weight: float = 1.0
    mask_weight: float | None = 0.3  # NonAmbiguousMaskLoss(BCELoss()); None: no mask term

    def check(self) -> None:
        sets = self.factored.sets()
        for index in (*self.conf_sets, *self.exclude_sets):
            if not 0 <= index < len(sets) or sets[index] not in MASKED_SETS:
                raise ValueError(f"loss set {index} ({sets[index] if 0 <= index < len(sets) else 'none'}) cannot be "
                                 f"confidence-weighted or cut to its bottom percent here: only {MASKED_SETS}")


class BatchedCriterion(nn.Module):
    """criterion(views, preds) -> (loss, details): MapAnything's factored criterion, all views at once.

    `compile=True` runs it through torch.compile. The views are stacked before the compiled code
    (`stacked`), so it sees tensors of (V, B, ...), not lists whose length it would guard on, and
    V and B are marked dynamic before the first graph (`dynamic_dims`), so one graph with both
    symbolic serves every view count and batch size (and one more with B = 1, a size Dynamo
    specializes): Stage 3's nine view counts and five batch sizes compile 2 graphs, not one per
    shape. At most SHAPE_LIMIT graphs (Dynamo's own recompile limit, 8, would silently send later
    shapes to eager mode); Inductor's split reductions off (with them,
    Inductor's scheduler failed an assertion compiling it for 12 views of 518x392 on an H200, torch
    2.11), and the backward compiled with the forward, so that a compile failure shows in the forward
    call, where it is caught: that shape then runs eagerly, said once on stdout (console.log). A shape
    past SHAPE_LIMIT is caught and said the same way."""

    # Shapes compiled at most (Dynamo's recompile limit for this criterion alone).
    SHAPE_LIMIT = 32

    def __init__(self, spec: LossSpec, compile: bool = False):
        super().__init__()
        spec.check()
        self.spec = spec
        self._compiled = torch.compile(self.compute_stacked, options={"split_reductions": False}) if compile else None
        self._eager_shapes: set[tuple] = set()

    def forward(self, views: list[dict], preds: list[dict]):
        shape = (len(views), tuple(views[0]["valid_mask"].shape))
        if self._compiled is None or shape in self._eager_shapes:
            return self.compute(views, preds)
        try:
            with _backward_compiled_with_forward(), _shape_limit(self.SHAPE_LIMIT):
                stacks = stacked(views, VIEW_KEYS), stacked(preds, PRED_KEYS)
                mark_leading_dims_dynamic(stacks)  # V and B: one graph for all of them
                return self._compiled(*stacks)
        except (torch._dynamo.exc.BackendCompilerFailed, torch._dynamo.exc.FailOnRecompileLimitHit) as err:
            self._eager_shapes.add(shape)
            first_line = str(err).strip().splitlines()[0][:300]
            warn("mapanything_ext", f"compiling the batched criterion for {shape[0]} views of "
                  f"{tuple(shape[1])} failed ({type(err).__name__}: {first_line}); that shape runs eagerly")
            return self.compute(views, preds)

    def compute(self, views: list[dict], preds: list[dict]):
        """The criterion, eagerly."""
        return self.compute_stacked(stacked(views, VIEW_KEYS), stacked(preds, PRED_KEYS))

    def compute_stacked(self, views: dict, preds: dict):
        """The criterion on views and predictions stacked by `stacked` (what torch.compile traces)."""
        spec, fs = self.spec, self.spec.factored
        terms = factored_terms(fs, views, preds)
        details = DeviceDetails()
        total = terms["cam_pts3d"].new_zeros(())
        sets = fs.sets()
        chosen = set(spec.conf_sets) | set(spec.exclude_sets)
        for index in spec.conf_sets:
            total = total + _conf_part(spec, sets[index], terms, preds, details)
        for index in spec.exclude_sets:
            total = total + _exclude_part(spec, sets[index], terms, views, details)
        means = set_means(fs, terms)
        for index, name in enumerate(sets):
            if index not in chosen:  # an empty view's mean is 0, as MapAnything adds for it
                total = total + means[name][0].sum()
        total = total + terms["scale_sum"] / terms["scale_count"].clamp_min(1)
        if fs.normal_and_gm:
            total = total + terms["normal"].sum() + terms["gradient_matching"].sum()
        _factored_details(fs, terms, means, details)
        total = total * spec.weight
        if spec.mask_weight is not None:
            total = total + spec.mask_weight * _mask_part(views, preds, details)
        return total, details


def _shape_limit(limit: int):
    """Dynamo's recompile limit set to `limit` for this call, and reaching it an error (caught by
    the caller) instead of Dynamo's silent fallback to eager mode: the model's compiled parts keep
    Dynamo's own limit and fallback."""
    return torch._dynamo.config.patch(recompile_limit=limit, fail_on_recompile_limit_hit=True)


def _backward_compiled_with_forward():
    """AOTAutograd compiles a backward graph lazily, at the first backward call, where a failure
    could no longer be caught by the forward; this compiles it at the forward call."""
    import torch._functorch.config as functorch_config

    if hasattr(functorch_config, "force_non_lazy_backward_lowering"):
        return functorch_config.patch(force_non_lazy_backward_lowering=True)
    return contextlib.nullcontext()


# ---- the views, stacked --------------------------------------------------------------------------

# What the criterion reads of the views and of the predictions.
VIEW_KEYS = ("valid_mask", "camera_pose", "pts3d", "pts3d_cam", "ray_directions_cam", "depth_along_ray",
             "camera_pose_quats", "camera_pose_trans", "is_synthetic", "is_metric_scale", "non_ambiguous_mask")
PRED_KEYS = ("pts3d", "pts3d_cam", "ray_directions", "depth_along_ray", "cam_quats", "cam_trans",
             "metric_scaling_factor", "conf", "non_ambiguous_mask_logits")


def stacked(items: list[dict], keys: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """{key: (V, ...)}: each key of `keys` the first view has, stacked over the views (one copy;
    its gradient flows back to every view's tensor)."""
    return {key: torch.stack([item[key] for item in items]) for key in keys if key in items[0]}


def _view_count(views: dict) -> int:
    return views["valid_mask"].shape[0]


# ---- the factored loss's terms ------------------------------------------------------------------


def factored_terms(fs: FactoredSpec, views: dict, preds: dict) -> dict[str, torch.Tensor]:
    """Every per-pixel (V, B, H, W), per-view-sample (V, B) and per-view (V,) term, with its validity."""
    gt, pr, valid = _normalized_geometry(fs, views, preds)
    rho = _robust(fs)
    w = fs.weights
    log = _log_norm if fs.loss_in_log else (lambda x: x)
    terms = {"valid": valid, "valid_trans": valid.any(-1).any(-1)}
    for name, key in (("pts3d", "pts3d"), ("cam_pts3d", "pts3d_cam"), ("depth", "depth")):
        if name != "pts3d" or fs.world_points:
            terms[name] = rho(log(pr[key]), log(gt[key])) * w[name]
    terms["ray_directions"] = rho(pr["rays"], gt["rays"]) * w["ray_directions"]
    terms["pose_quats"] = torch.minimum(rho(pr["quats"], gt["quats"]), rho(pr["quats"], -gt["quats"])) * w["pose_quats"]
    terms["pose_trans"] = rho(pr["trans"], gt["trans"]) * w["pose_trans"]
    _scale_term(fs, gt, pr, views, valid, terms)
    if fs.normal_and_gm:
        surface = valid & views["is_synthetic"][:, :, None, None] if fs.normal_and_gm_synthetic_only else valid
        terms["normal"] = normal_loss(pr["pts3d_cam"], gt["pts3d_cam"], surface) * w["normal"]
        terms["gradient_matching"] = gradient_matching_loss(
            _log_norm(pr["pts3d_cam"][..., 2:]), _log_norm(gt["pts3d_cam"][..., 2:]), surface) * w["gradient_matching"]
    return terms


def _normalized_geometry(fs: FactoredSpec, views, preds):
    """Ground truth and predictions as MapAnything's loss compares them: in view 0's camera frame,
    predictions without their metric scale, each set divided by its own avg_dis factor."""
    valid = views["valid_mask"]  # (V, B, H, W)
    pose0 = views["camera_pose"][0]
    rot0, trans0 = pose0[:, :3, :3], pose0[:, :3, 3]
    world = views["pts3d"]
    gt = {"pts3d": torch.einsum("bji,vbhwj->vbhwi", rot0, world) - torch.einsum("bji,bj->bi", rot0, trans0)[None, :, None, None],
          "pts3d_cam": views["pts3d_cam"], "rays": views["ray_directions_cam"]}
    gt["depth"] = views["depth_along_ray"] if fs.depth_type == "depth_along_ray" else gt["pts3d_cam"][..., 2:]
    gt["quats"], gt["trans"] = _poses_in_view0(views)
    pr = {"pts3d": preds["pts3d"], "pts3d_cam": preds["pts3d_cam"], "rays": preds["ray_directions"],
          "quats": preds["cam_quats"], "trans": preds["cam_trans"]}
    pr["depth"] = preds["depth_along_ray"] if fs.depth_type == "depth_along_ray" else pr["pts3d_cam"][..., 2:]
    height = valid.shape[2]
    if "metric_scaling_factor" in preds:
        scale = preds["metric_scaling_factor"]  # (V, B, 1)
        dense = _over_rows(scale[..., None, None], height)
        for key in ("pts3d", "pts3d_cam", "depth"):
            pr[key] = pr[key] / dense
        pr["trans"] = pr["trans"] / scale
        pr["metric_pts3d"] = pr["pts3d"].detach() * dense  # the scale loss reaches the factor only
    else:
        pr["metric_pts3d"] = pr["pts3d"]
    gt["factor"] = avg_dis_factor(gt["pts3d"], valid)
    pr["factor"] = avg_dis_factor(pr["pts3d"], valid) if fs.norm_predictions else None
    for side in (gt, pr):
        if side["factor"] is not None:
            dense = _over_rows(side["factor"][None, :, None, None, None], height)
            for key in ("pts3d", "pts3d_cam", "depth"):
                side[key] = side[key] / dense
            side["trans"] = side["trans"] / side["factor"][None, :, None]
    return gt, pr, valid


def avg_dis_factor(pts: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """(B,): mean distance to the origin of the valid points of all views (MapAnything's avg_dis)."""
    distance = torch.where(valid[..., None], pts, 0).norm(dim=-1)
    count = _image_sum(valid, (0,))
    if _compiling():
        per_sample = distance.sum(-1).sum(dim=(0, 2))  # rows first (module docstring)
    else:  # one row of all views per sample, as MapAnything sums it
        per_sample = distance.transpose(0, 1).reshape(distance.shape[1], -1).sum(dim=1)
    return (per_sample / (count + 1e-8)).clamp_min(1e-8)


def _over_rows(value: torch.Tensor, height: int) -> torch.Tensor:
    """A per-view or per-sample value (V or 1, B, 1, 1, 1), to divide or multiply (V, B, H, W, C)
    tensors by. Compiled, as (V or 1, B, H, 1, 1): the same numbers, but its gradient sums over each
    row first, then over the rows (module docstring), instead of over all pixels in one reduction."""
    return value.expand(-1, -1, height, -1, -1) if _compiling() else value


def _image_sum(x: torch.Tensor, dims: tuple[int, ...] = ()) -> torch.Tensor:
    """x (V, B, H, W) summed over the image and the leading `dims`; compiled, each image row first
    (module docstring)."""
    if _compiling():
        x = x.sum(-1).sum(-1)
        return x.sum(dims) if dims else x
    return x.sum((*dims, -2, -1))


def _poses_in_view0(views) -> tuple[torch.Tensor, torch.Tensor]:
    """(V, B, 4), (V, B, 3): every camera's pose in view 0's frame; view 0 itself exactly identity."""
    quats, trans = views["camera_pose_quats"], views["camera_pose_trans"]
    inverse0 = quats[0] * quats.new_tensor([-1.0, -1.0, -1.0, 1.0]) / (quats[0] * quats[0]).sum(-1, keepdim=True)
    rot_inv0 = _quaternion_matrix(inverse0)
    rel_quats = quaternion_multiply(inverse0.expand_as(quats), quats)
    rel_trans = torch.einsum("bij,vbj->vbi", rot_inv0, trans) - torch.einsum("bij,bj->bi", rot_inv0, trans[0])
    first = torch.arange(_view_count(views), device=quats.device)[:, None, None] == 0
    identity = quats.new_tensor([0.0, 0.0, 0.0, 1.0])
    return torch.where(first, identity, rel_quats), torch.where(first, 0.0, rel_trans)


def _quaternion_matrix(q: torch.Tensor) -> torch.Tensor:
    return quaternion_to_matrix(q / q.norm(dim=-1, keepdim=True))


def _log_norm(x: torch.Tensor) -> torch.Tensor:
    """x / |x| * log1p(|x|): the vector's length compressed, its direction kept."""
    length = x.norm(dim=-1, keepdim=True)
    return x / length.clamp_min(1e-8) * torch.log1p(length)


def _robust(fs: FactoredSpec):
    alpha, c = fs.robust_alpha, fs.robust_c
    shape = abs(alpha - 2)

    def rho(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        squared = (((a - b) / c) ** 2).sum(-1)
        return shape / alpha * (torch.pow(squared / shape + 1, alpha / 2) - 1)

    return rho


def _scale_term(fs: FactoredSpec, gt, pr, views, valid, terms) -> None:
    """Robust loss between predicted and true metric factors, on metric samples whose ground truth
    has a valid point; `scale_count` 0 means MapAnything has no scale term this batch."""
    usable = views["is_metric_scale"][0] & (gt["factor"] > 1e-8)
    log = _log_norm if fs.loss_in_log else (lambda x: x)
    predicted = avg_dis_factor(pr["metric_pts3d"], valid)
    per_sample = _robust(fs)(log(predicted[:, None]), log(gt["factor"][:, None])) * fs.weights["scale"]
    terms["scale_sum"] = torch.where(usable, per_sample, 0).sum()
    terms["scale_count"] = usable.sum()


def normal_loss(points: torch.Tensor, gt_points: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(V,): per view, the mean over valid pixel quads of the smoothed angle (1 to 90 degrees) between
    predicted and true normals of the quad's four corner triangles."""
    corners = lambda t: (t[..., :-1, :-1, :], t[..., :-1, 1:, :], t[..., 1:, :-1, :], t[..., 1:, 1:, :])  # noqa: E731
    lu, ru, ld, rd = corners(points)
    glu, gru, gld, grd = corners(gt_points)
    mlu, mru, mld, mrd = corners(mask[..., None])
    triangles = [
        (torch.cross(ru - rd, ld - rd, dim=-1), torch.cross(gru - grd, gld - grd, dim=-1), mru & mld & mrd),
        (torch.cross(lu - ru, rd - ru, dim=-1), torch.cross(glu - gru, grd - gru, dim=-1), mlu & mrd & mru),
        (torch.cross(ld - lu, ru - lu, dim=-1), torch.cross(gld - glu, gru - glu, dim=-1), mld & mru & mlu),
        (torch.cross(rd - ld, lu - ld, dim=-1), torch.cross(grd - gld, glu - gld, dim=-1), mrd & mlu & mld),
    ]
    low, high, beta = math.radians(1), math.radians(90), math.radians(3)
    total, any_valid = 0, False
    for normal, gt_normal, valid in triangles:
        angle = torch.atan2(torch.cross(normal, gt_normal, dim=-1).norm(dim=-1) + 1e-12,
                            (normal * gt_normal).sum(-1)).clamp(low, high)
        smooth = torch.where(angle < beta, 0.5 * angle.square() / beta, angle - 0.5 * beta)
        total = total + valid[..., 0] * smooth
        any_valid = any_valid | valid[..., 0]
    count = _image_sum(any_valid, (1,))
    summed = _image_sum(total, (1,))
    return torch.where(count > 0, summed / (count.clamp_min(1) * (4 * max(points.shape[-3:-1]))), 0 * summed)


def gradient_matching_loss(prediction: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, scales: int = 4):
    """(V,): per view, the sum over 4 scales of the clamped absolute x/y gradients of the masked
    difference, divided by the valid pixels at that scale."""
    total = 0
    for scale in range(scales):
        step = 2**scale
        pred, true, valid = prediction[..., ::step, ::step, :], target[..., ::step, ::step, :], mask[..., ::step, ::step, None]
        diff = valid * (pred - true)
        grad_x = ((diff[..., 1:, :] - diff[..., :-1, :]).abs() * (valid[..., 1:, :] * valid[..., :-1, :])).clamp(max=100)
        grad_y = ((diff[..., 1:, :, :] - diff[..., :-1, :, :]).abs() * (valid[..., 1:, :, :] * valid[..., :-1, :, :])).clamp(max=100)
        summed = _image_sum(grad_x[..., 0], (1,)) + _image_sum(grad_y[..., 0], (1,))
        count = _image_sum(valid[..., 0], (1,))
        total = total + torch.where(count > 0, summed / count.clamp_min(1), 0 * summed)
    return total


# ---- aggregation (MapAnything's ConfAndExcludeTopNPercentPixelLoss / ExcludeTopNPercentPixelLoss) ---


def _masked_mean_per_view(values: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    count = _image_sum(valid, (1,))
    return _image_sum(torch.where(valid, values, 0), (1,)) / count.clamp_min(1), count


def _conf_part(spec: LossSpec, name: str, terms, preds, details: "DeviceDetails") -> torch.Tensor:
    conf = preds["conf"]
    valid = terms["valid"]
    weighted = terms[name] * conf - spec.conf_alpha * torch.log(torch.where(valid, conf, 1))
    mean, count = _masked_mean_per_view(weighted, valid)
    details.add_views(f"{spec.factored.name}_{spec.factored.detail_name(name)}_conf_loss", mean, count > 0)
    return torch.where(count > 0, mean, 0).sum()


def _exclude_part(spec: LossSpec, name: str, terms, views, details: "DeviceDetails") -> torch.Tensor:
    values, valid = terms[name], terms["valid"]
    bottom = 100 - spec.top_n_percent
    real = ~views["is_synthetic"] if spec.exclude_real_only else torch.ones_like(valid[..., 0, 0])
    num_valid = _image_sum(valid)
    keep = (num_valid * bottom / 100).long()
    ordered = torch.sort(torch.where(valid, values, math.inf).flatten(2), dim=-1).values
    kept = torch.arange(ordered.shape[-1], device=values.device) < keep[..., None]
    real_sum = _image_sum(torch.where(kept, ordered, 0).view_as(values))
    synthetic_sum = _image_sum(torch.where(valid, values, 0))
    view_sum = torch.where(real, real_sum, synthetic_sum).sum(-1)
    count = torch.where(real, keep, num_valid).sum(-1)
    mean = view_sum / count.clamp_min(1)
    details.add_views(f"{spec.factored.name}_{spec.factored.detail_name(name)}_bot{bottom}%_loss", mean, count > 0)
    return torch.where(count > 0, mean, 0).sum()


def set_means(fs: FactoredSpec, terms) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per set: (V,) MapAnything's plain per-view mean (masked where the set is) and whether the
    view has values; the total uses them for the sets not aggregated otherwise, the details for all."""
    means = {}
    for name in fs.sets():
        values = terms[name]
        if name in MASKED_SETS:
            mean, count = _masked_mean_per_view(values, terms["valid"])
            means[name] = mean, count > 0
        elif name == "pose_trans":
            count = terms["valid_trans"].sum(-1)
            means[name] = torch.where(terms["valid_trans"], values, 0).sum(-1) / count.clamp_min(1), count > 0
        else:  # per pixel (V, B, H, W) or per view and sample (V, B)
            mean = (_image_sum(values, (1,)) if values.dim() == 4 else values.sum(1)) / values[0].numel()
            means[name] = mean, torch.ones_like(mean, dtype=torch.bool)
    return means


def _factored_details(fs: FactoredSpec, terms, means, details: "DeviceDetails") -> None:
    """MapAnything's per-view details of each set: the mean where it has values and is > 0."""
    for name, (mean, present) in means.items():
        details.add_views(f"{fs.name}_{fs.detail_name(name)}", mean, present & (mean > 0))
    scale = terms["scale_sum"] / terms["scale_count"].clamp_min(1)
    details.add(f"{fs.name}_scale", scale, (terms["scale_count"] > 0) & (scale > 0))
    if fs.normal_and_gm:
        for name in ("normal", "gradient_matching"):
            details.add_views(f"{fs.name}_{name}", terms[name], terms[name] > 0)


def _mask_part(views, preds, details: "DeviceDetails") -> torch.Tensor:
    logits = preds["non_ambiguous_mask_logits"]
    target = views["non_ambiguous_mask"].float()  # as MapAnything's BCELoss casts it
    per_pixel = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    image = per_pixel.reshape(_view_count(views), 1, -1, per_pixel.shape[-1])  # (V, 1, B x H, W)
    per_view = _image_sum(image, (1,)) / per_pixel[0].numel()
    details.add_views("NonAmbiguousMaskLoss_mask", per_view, torch.ones_like(per_view, dtype=torch.bool),
                      average_over_all=True)
    return per_view.sum()


class DeviceDetails(Mapping):
    """MapAnything's `details` dict, kept on the device until first read, then read back in one
    transfer: per-view entries `<prefix>_view<k>` where present, and `<prefix>_avg` over them."""

    def __init__(self):
        # (prefix, one value per view or one in all, average over all views). The number of views is
        # not kept: compiled, it is a symbolic size (BatchedCriterion); _assemble counts it.
        self._groups: list[tuple[str, bool, bool]] = []
        self._values: list[torch.Tensor] = []
        self._present: list[torch.Tensor] = []
        self._read: dict | None = None
        self._copy: HostCopy | None = None

    def add_views(self, prefix: str, values: torch.Tensor, present: torch.Tensor, average_over_all=False) -> None:
        self._groups.append((prefix, True, average_over_all))
        self._values.append(values.detach().double())
        self._present.append(present)

    def add(self, name: str, value: torch.Tensor, present: torch.Tensor) -> None:
        self._groups.append((name, False, False))
        self._values.append(value.detach().double().reshape(1))
        self._present.append(present.reshape(1))

    def queue_read(self) -> None:
        """Queue the one transfer now, behind the work that produces the values; the first read
        then waits for that transfer only (readback.HostCopy)."""
        if self._copy is None and self._read is None:
            values = torch.cat(self._values)
            self._copy = HostCopy(torch.stack([values, torch.cat(self._present).to(values.dtype)]))

    def _materialize(self) -> dict:
        if self._read is None:
            self.queue_read()
            self._read = _assemble(self._groups, *self._copy.get().tolist())
            self._values = self._present = self._copy = None  # device memory no longer held
        return self._read

    def __getitem__(self, key):
        return self._materialize()[key]

    def __iter__(self):
        return iter(self._materialize())

    def __len__(self):
        return len(self._materialize())


def _assemble(groups, values: list[float], present: list[float]) -> dict:
    per_view_groups = sum(per_view for _, per_view, _ in groups)
    views = (len(values) - (len(groups) - per_view_groups)) // max(per_view_groups, 1)
    details, at = {}, 0
    for prefix, per_view, average_over_all in groups:
        if not per_view:
            if present[at]:
                details[prefix] = values[at]
            at += 1
            continue
        kept = []
        for view in range(views):
            if present[at + view]:
                details[f"{prefix}_view{view + 1}"] = values[at + view]
                kept.append(values[at + view])
        if kept:
            details[f"{prefix}_avg"] = sum(kept) / (views if average_over_all else len(kept))
        at += views
    return details
