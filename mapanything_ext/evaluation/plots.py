"""PNG plots: loss curves from log.txt, per-view depth error maps, metrics vs number of views."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: clusters have no display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from mapanything_ext.datasets.image_norm import IMAGENET_MEAN, IMAGENET_STD  # noqa: E402
from mapanything_ext.run_log import read_epoch_records, test_loss_of  # noqa: E402


def loss_curves(runs: list[Path], out_png: Path, labels: list[str] | None = None) -> Path:
    """Train (solid) and eval (dashed: the test loss median, checkpoint-best's) loss per epoch for one or
    several runs (run folders or log.txt files, ours or MapAnything's own: both count epochs trained
    from 1), and below them the learning rate each epoch trained with (its mean; a warm-up longer than
    the run shows here)."""
    fig, (ax, lr_ax) = plt.subplots(2, 1, figsize=(7, 6.5), sharex=True, gridspec_kw={"height_ratios": [3, 1.4]})
    for i, run in enumerate(runs):
        label = labels[i] if labels else _name_of(Path(run))
        records = [r for r in read_epoch_records(run) if len(r) > 1]  # (MapAnything's first line: epoch only)
        color = f"C{i % 10}"
        ax.plot([r["epoch"] for r in records], [r.get("train_loss", np.nan) for r in records], "-o", color=color,
                label=f"{label} train")
        tested = [r for r in records if test_loss_of(r) is not None]
        ax.plot([r["epoch"] for r in tested], [test_loss_of(r) for r in tested], "--s", color=color,
                label=f"{label} eval")
        lr_ax.plot([r["epoch"] for r in records], [r.get("train_lr", np.nan) for r in records], "-o", color=color,
                   label=label)
    ax.set_ylabel("loss")
    ax.set_title("Training and evaluation loss, learning rate")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    lr_ax.set_xlabel("epoch")
    lr_ax.set_ylabel("learning rate")
    lr_ax.grid(alpha=0.3)
    return _save(fig, out_png)


def _name_of(run: Path) -> str:
    return run.parent.name if run.is_file() else run.name


def image_rgb(view: dict) -> np.ndarray:
    """The view's input image (H, W, 3) in [0, 1], undoing the dinov2/ImageNet normalisation."""
    img = view["img"][0].permute(1, 2, 0).numpy()
    return np.clip(img * IMAGENET_STD + IMAGENET_MEAN, 0.0, 1.0)


def depth_error_maps(views: list[dict], preds: list[dict], out_png: Path, title: str = "") -> Path:
    """One row per view: input image, true depth, predicted depth, |error| / true depth."""
    rows = len(views)
    fig, axes = plt.subplots(rows, 4, figsize=(13, 2.4 * rows), squeeze=False)
    for row, (view, pred) in enumerate(zip(views, preds)):
        gt = view["depthmap"][0, ..., 0].numpy()
        z = pred["pts3d_cam"][0, ..., 2].numpy()
        valid = view["valid_mask"][0].numpy().astype(bool) & (gt > 0)
        rel = np.where(valid, np.abs(z - gt) / np.maximum(gt, 1e-6), np.nan)
        vmax = float(np.percentile(gt[valid], 95)) if valid.any() else 1.0
        name = view["instance"][0] if isinstance(view["instance"], (list, tuple)) else str(view["instance"])
        panels = [(image_rgb(view), None, name), (np.where(valid, gt, np.nan), "viridis", "true depth (m)"),
                  (z, "viridis", "predicted depth (m)"), (rel, "magma", "AbsRel error")]
        for col, (data, cmap, label) in enumerate(panels):
            ax = axes[row, col]
            kwargs = {} if cmap is None else {"cmap": cmap, "vmin": 0,
                                              "vmax": vmax if col in (1, 2) else 0.5}
            shown = ax.imshow(data, **kwargs)
            if cmap is not None:
                fig.colorbar(shown, ax=ax, fraction=0.046)
            ax.set_title(label, fontsize=8)
            ax.axis("off")
    if title:
        fig.suptitle(title)
    return _save(fig, out_png, top=1.0 - 0.35 / rows if title else 1.0)


def metric_vs_views(results: dict[str, dict], out_png: Path, metric: str = "depth_abs_rel_metric") -> Path:
    """A metric of the whole sample against its number of views, one line per checkpoint."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, result in results.items():
        by_count = result["summary"]["by_num_views"]
        counts = sorted(by_count, key=int)
        ax.plot([int(c) for c in counts], [by_count[c].get(metric, np.nan) for c in counts], "-o", label=label)
    ax.set_xlabel("views per sample")
    ax.set_ylabel(metric)
    ax.set_title(f"{metric} vs number of views")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, out_png)


def _save(fig, out_png: Path, top: float = 1.0) -> Path:
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout(rect=(0, 0, 1, top))
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return out_png
