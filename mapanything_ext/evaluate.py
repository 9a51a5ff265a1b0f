"""Evaluate checkpoints on an OPV2V split: metrics.json, a readable table, plots, PLY export.

    python -m mapanything_ext.evaluate checkpoint=<path> [machine=<profile>] [dataset=opv2v_coop_ft] ...
    python -m mapanything_ext.evaluate 'logs=[<old run>/log.txt,<new run>]'   # loss curves only

See configs/evaluate.yaml for every option and docs/evaluation.md for the metrics.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig, ListConfig, OmegaConf

from mapanything_ext.config import CONFIG_DIR, register_resolvers
from mapanything_ext.evaluation import export_ply, plots
from mapanything_ext.evaluation.predict import batch_of_one, load_model, predict, to_cpu
from mapanything_ext.evaluation.report import MAIN_VIEWS, evaluate_model, format_tables
from mapanything_ext.models.input_contract import check_images_only
from mapanything_ext.datasets.build import build_dataset

register_resolvers()
warnings.filterwarnings("ignore", message="(?s).*is validated against ConfigStore schema with the same name")


def checkpoints_of(cfg: DictConfig) -> list[Path]:
    value = cfg.checkpoint
    paths = [_file_of(Path(p)) for p in (value if isinstance(value, (list, ListConfig)) else [value])]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"checkpoint(s) not found: {', '.join(missing)}")
    return paths


def _file_of(path: Path) -> Path:
    """A run folder given as checkpoint= means its checkpoint-best.pth; without one, say what is there."""
    if not path.is_dir():
        return path
    best = path / "checkpoint-best.pth"
    if best.is_file():
        print(f"[evaluate] {path} is a run folder: evaluating its {best.name}", flush=True)
        return best
    found = sorted(p.name for p in path.glob("*.pth"))
    raise FileNotFoundError(f"{path} is a folder without checkpoint-best.pth; give one of its checkpoints as "
                            f"checkpoint=: {', '.join(found) if found else 'it holds no .pth file'}")


def labels_of(cfg: DictConfig, paths: list[Path]) -> list[str]:
    if cfg.labels:
        if len(cfg.labels) != len(paths):
            raise ValueError(f"labels has {len(cfg.labels)} names for {len(paths)} checkpoints")
        return list(cfg.labels)
    return [f"{p.parent.name}/{p.stem}" for p in paths]


def plot_logs(cfg: DictConfig) -> Path:
    """Loss curves of several runs on one epoch axis, from their log.txt files: ours and those of
    MapAnything's own loop (a run continued here from one of its checkpoints, say)."""
    logs = [Path(p) for p in (cfg.logs if isinstance(cfg.logs, (list, ListConfig)) else [cfg.logs])]
    missing = [str(p) for p in logs if not (p.is_file() or (p / "log.txt").is_file())]
    if missing:
        raise FileNotFoundError(f"no log.txt at: {', '.join(missing)}")
    if cfg.labels and len(cfg.labels) != len(logs):
        raise ValueError(f"labels has {len(cfg.labels)} names for {len(logs)} logs")
    out = Path(cfg.output_dir) if cfg.output_dir else Path(".")
    out.mkdir(parents=True, exist_ok=True)
    png = plots.loss_curves(logs, out / "loss_curves.png", list(cfg.labels) if cfg.labels else None)
    print(f"[evaluate] plot: {png}")
    return out


def run(cfg: DictConfig) -> Path:
    if cfg.get("logs"):
        return plot_logs(cfg)
    if cfg.checkpoint is None:
        raise ValueError("give checkpoint=<file> (or a list) to evaluate, or logs=[...] to plot loss curves")
    paths = checkpoints_of(cfg)
    labels = labels_of(cfg, paths)
    out = Path(cfg.output_dir) if cfg.output_dir else paths[0].parent / f"eval_{cfg.split}"
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device)
    dataset_cfg = OmegaConf.merge(cfg.dataset.test_dataset, {"split": cfg.split})
    dataset = build_dataset(dataset_cfg)
    count = len(dataset) if cfg.num_samples is None else min(int(cfg.num_samples), len(dataset))
    print(f"[evaluate] {count} of the {len(dataset)} samples of split {cfg.split!r} on {device}; writing to {out}",
          flush=True)
    results, models = {}, {}
    for path, label in zip(paths, labels):
        model = load_model(path, cfg.model, device, cfg.trust_foreign_checkpoints)
        # A model that reads ground truth from its inputs gets no report at all.
        check_images_only(model, batch_of_one(dataset[0], device))
        results[label] = evaluate_model(model, dataset, device, cfg.num_samples, label)
        models[label] = model
    (out / "metrics.json").write_text(json.dumps(_jsonable(results), indent=1) + "\n")
    table = format_tables(results)
    (out / "table.md").write_text(table)
    print(table)
    if cfg.plots:
        _plots(cfg, out, paths, labels, results, models, dataset, device)
    if cfg.export_ply:
        _export(cfg, out, labels[-1], models[labels[-1]], dataset, device)
    if cfg.get("export_hf"):
        from mapanything_ext.export import export

        export(paths[-1], cfg.export_hf)
    print(f"[evaluate] metrics: {out / 'metrics.json'}\n[evaluate] table: {out / 'table.md'}", flush=True)
    return out


def _plots(cfg, out, paths, labels, results, models, dataset, device) -> None:
    runs = [(p.parent, label) for p, label in zip(paths, labels) if (p.parent / "log.txt").is_file()]
    if runs:
        print(f"[evaluate] plot: {plots.loss_curves([r for r, _ in runs], out / 'loss_curves.png', [l for _, l in runs])}")
    print(f"[evaluate] plot: {plots.metric_vs_views(results, out / 'metric_vs_views.png')}")
    views = batch_of_one(dataset[int(cfg.sample)], device)
    for label, model in models.items():
        png = out / f"depth_errors_{_slug(label)}_sample{cfg.sample}.png"
        plots.depth_error_maps(to_cpu(views), predict(model, views), png, title=f"{label}, sample {cfg.sample}")
        print(f"[evaluate] plot: {png}")


def _export(cfg, out, label, model, dataset, device) -> None:
    views = batch_of_one(dataset[int(cfg.sample)], device)
    files = export_ply.export_sample(to_cpu(views), predict(model, views), out,
                                     stem=f"{_slug(label)}_sample{cfg.sample}",
                                     max_points_per_view=int(cfg.max_points_per_view))
    kind = "cooperative" if len(views) > MAIN_VIEWS else "single-vehicle"
    for name, path in files.items():
        print(f"[evaluate] {kind} point cloud ({name}): {path}")


def _slug(label: str) -> str:
    return label.replace("/", "_").replace(" ", "_")


def _jsonable(obj):
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, float) and obj != obj:
        return None  # NaN is not JSON
    return obj


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="evaluate")
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
