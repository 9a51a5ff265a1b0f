"""Evaluate checkpoints over a split; aggregate and tabulate single-vehicle vs cooperative.

For every sample of a cooperative dataset (the main vehicle's 4 cameras first, then the
other vehicles' cameras) the model runs twice on the same timestamp:

  single     the main vehicle's 4 views alone
  coop       all views; reported for the main vehicle's 4 views (coop_main: the fair
             comparison with single) and for all views (coop_all)

so "does the other vehicle help?" is single vs coop_main on the same pixels. A
single-vehicle dataset (4 views per sample) gives the single setting only.
"""

from __future__ import annotations

import math
from collections import defaultdict

from tqdm import tqdm

from mapanything_ext.evaluation.benchmark_metrics import BENCHMARK
from mapanything_ext.evaluation.metrics import BINNED, sample_metrics
from mapanything_ext.evaluation.pose_metrics import pooled
from mapanything_ext.evaluation.predict import batch_of_one, predict, to_cpu

MAIN_VIEWS = 4
METRICS = ("depth_abs_rel_metric", "depth_inlier_1.25_metric", "point_error_metric_m", "abs_registration_error_m",
           "rel_rotation_deg", "rel_translation_metric_m")
METRIC_HEADER = "metric, no alignment, delta 1.25, depth <= 250 m; metres, degrees"
BENCHMARK_HEADER = ("MapAnything's benchmark set: its names and definitions, prediction and truth each normalised by "
                    "their mean distance from the first camera, inlier threshold 1.03, pose AUC@5 in %; then depth "
                    "median-aligned per view")
LOWER_IS_BETTER = {m: not any(word in m for word in ("inlier", "auc")) for m in METRICS + BENCHMARK}


def evaluate_model(model, dataset, device, num_samples=None, label: str = "") -> dict:
    """Per-sample records and their aggregates for one model."""
    count = len(dataset) if num_samples is None else min(int(num_samples), len(dataset))
    records = []
    for index in tqdm(range(count), desc=f"evaluate {label}".strip(), mininterval=2.0):
        views = batch_of_one(dataset[index], device)
        cpu_views = to_cpu(views)
        record = {"index": index, "num_views": len(views)}
        single = predict(model, views[:MAIN_VIEWS])
        record["single"] = sample_metrics(cpu_views[:MAIN_VIEWS], single)
        if len(views) > MAIN_VIEWS:
            coop = predict(model, views)
            record["coop_main"] = sample_metrics(cpu_views[:MAIN_VIEWS], coop[:MAIN_VIEWS])
            record["coop_all"] = sample_metrics(cpu_views, coop)
        records.append(record)
    return {"samples": records, "summary": summarize(records)}


def summarize(records: list[dict]) -> dict:
    """Means per setting (per sample, and per view), and coop_all means per view count."""
    summary = {}
    for setting in ("single", "coop_main", "coop_all"):
        having = [r[setting] for r in records if setting in r]
        if not having:
            continue
        ates = [h["sample"]["ate_m"] for h in having if not math.isnan(h["sample"].get("ate_m", math.nan))]
        summary[setting] = {
            "per_sample": _mean_dicts([h["sample"] for h in having]),
            "per_view": _mean_dicts([v for h in having for v in h["views"]]),
            "by_true_depth": _mean_dicts([h["sample"] for h in having], BINNED),
            # pooled over every view pair of every sample, as published pose tables are
            "poses": {**pooled([p for h in having for p in h.get("pairs", [])]),
                      "ate_m": sum(ates) / len(ates) if ates else math.nan},
            "samples": len(having),
        }
    if "single" in summary and "coop_main" in summary:
        summary["gain"] = _paired_gain(records)
    by_count = defaultdict(list)
    for r in records:
        by_count[r["num_views"]].append(r.get("coop_all", r["single"])["sample"])
    summary["by_num_views"] = {str(n): {**_mean_dicts(s), "samples": len(s)} for n, s in sorted(by_count.items())}
    return summary


def _paired_gain(records: list[dict]) -> dict:
    """Per metric, coop_main minus single over the samples that have both: the mean difference, its
    standard error (paired: the same timestamps) and the count."""
    gain = {}
    for metric in METRICS + BENCHMARK:
        diffs = [r["coop_main"]["sample"][metric] - r["single"]["sample"][metric] for r in records
                 if "coop_main" in r and metric in r["coop_main"]["sample"] and metric in r["single"]["sample"]]
        diffs = [d for d in diffs if not math.isnan(d)]
        if len(diffs) >= 2:
            mean = sum(diffs) / len(diffs)
            spread = math.sqrt(sum((d - mean) ** 2 for d in diffs) / (len(diffs) - 1))
            gain[metric] = {"mean": mean, "se": spread / math.sqrt(len(diffs)), "n": len(diffs)}
    return gain


def _mean_dicts(dicts: list[dict], keys=METRICS + BENCHMARK) -> dict:
    out = {}
    for key in keys:
        values = [d[key] for d in dicts if key in d and not math.isnan(d[key])]
        if any(key in d for d in dicts):
            out[key] = sum(values) / len(values) if values else math.nan
    return out


def format_tables(results: dict[str, dict]) -> str:
    """Markdown: per setting our metric set, then MapAnything's benchmark set, each with the cooperation
    gain; then depth bins, poses and view counts."""
    lines = []
    for title, columns in ((METRIC_HEADER, METRICS), (BENCHMARK_HEADER, BENCHMARK)):
        lines += _setting_table(results, title, columns) + _gain_table(results, columns)
    lines += _depth_bin_table(results)
    lines += _pose_tables(results)
    lines += ["", "## By number of views (all views of the sample)", "",
              "| checkpoint | views | samples | depth_abs_rel_metric | point_error_metric_m | rel_rotation_deg | "
              "pointmaps_abs_rel |", "|---|---|---|---|---|---|---|"]
    for label, result in results.items():
        for n, s in result["summary"]["by_num_views"].items():
            lines.append(f"| {label} | {n} | {s['samples']} | {_fmt(s.get('depth_abs_rel_metric'))} | "
                         f"{_fmt(s.get('point_error_metric_m'))} | {_fmt(s.get('rel_rotation_deg'))} | "
                         f"{_fmt(s.get('pointmaps_abs_rel'))} |")
    return "\n".join(lines).lstrip("\n") + "\n"


def _setting_table(results: dict[str, dict], title: str, columns: tuple[str, ...]) -> list[str]:
    lines = ["", f"## Per sample means ({title})", "",
             "| checkpoint | setting | samples | " + " | ".join(columns) + " |", "|---|---|---|" + "---|" * len(columns)]
    for label, result in results.items():
        for setting in ("single", "coop_main", "coop_all"):
            if setting in result["summary"]:
                s = result["summary"][setting]
                lines.append(f"| {label} | {setting} | {s['samples']} | "
                             + " | ".join(_fmt(s["per_sample"].get(m)) for m in columns) + " |")
    return lines


def _gain_table(results: dict[str, dict], columns: tuple[str, ...]) -> list[str]:
    gains = [(label, r["summary"]) for label, r in results.items() if "coop_main" in r["summary"]]
    if not gains:
        return []
    lines = ["", "### Does the other vehicle help? (main vehicle's 4 views: single -> coop, same timestamps)", "",
             "| checkpoint | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]
    for label, summary in gains:
        cells = [_gain(summary["single"]["per_sample"].get(m), summary["coop_main"]["per_sample"].get(m), m,
                       summary.get("gain", {}).get(m)) for m in columns]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return lines


def _depth_bin_table(results: dict[str, dict]) -> list[str]:
    """Per sample means of depth AbsRel and point error over the pixels of each true-depth range."""
    lines = ["", "## By true depth (metric, no alignment; per sample means over the pixels in each range; metres)", "",
             "| checkpoint | setting | " + " | ".join(BINNED) + " |", "|---|---|" + "---|" * len(BINNED)]
    for label, result in results.items():
        for setting in ("single", "coop_main", "coop_all"):
            binned = result["summary"].get(setting, {}).get("by_true_depth")
            if binned:
                lines.append(f"| {label} | {setting} | " + " | ".join(_fmt(binned.get(c)) for c in BINNED) + " |")
    return lines


POSE_COLUMNS = ("pose_pairs", "auc_5", "auc_30", "rra_5", "rra_15", "rra_30", "rta_5", "rta_15", "rta_30", "ate_m")


def _pose_tables(results: dict[str, dict]) -> list[str]:
    """Camera poses as published tables give them (pose_metrics.py): pooled over view pairs; the
    cooperative samples' pairs split into those inside one vehicle's rig and those across vehicles."""
    lines = ["", "## Camera poses (pooled over view pairs: AUC, RRA and RTA in fractions at the degrees named; "
             "ATE in metres after similarity alignment, mean over samples)", "",
             "| checkpoint | setting | " + " | ".join(POSE_COLUMNS) + " |", "|---|---|" + "---|" * len(POSE_COLUMNS)]
    split = []
    for label, result in results.items():
        for setting in ("single", "coop_main", "coop_all"):
            poses = result["summary"].get(setting, {}).get("poses")
            if poses:
                lines.append(f"| {label} | {setting} | " + " | ".join(_fmt(poses.get(c)) for c in POSE_COLUMNS) + " |")
        coop = result["summary"].get("coop_all", {}).get("poses")
        if coop:
            split += [f"| {label} | {kind} | " + " | ".join(_fmt(coop.get(f"{c}_{kind}")) for c in POSE_COLUMNS[:-1]) + " |"
                      for kind in ("intra", "cross")]
    if split:
        lines += ["", "## Camera poses of the cooperative samples: pairs inside one vehicle's rig (intra) and "
                  "across vehicles (cross, the registration the cooperative stages are for)", "",
                  "| checkpoint | pairs | " + " | ".join(POSE_COLUMNS[:-1]) + " |",
                  "|---|---|" + "---|" * (len(POSE_COLUMNS) - 1), *split]
    return lines


def _fmt(value) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.4g}"


def _gain(single, coop, metric, paired: dict | None = None) -> str:
    """`single -> coop (word)`: better or worse only when the paired mean difference exceeds twice its
    standard error over the samples (the sample-to-sample noise); else within noise."""
    if single is None or coop is None or math.isnan(single) or math.isnan(coop):
        return "-"
    if paired is None or abs(paired["mean"]) <= 2 * paired["se"]:
        word = "within noise" if paired is not None else "too few samples to tell"
    else:
        better = paired["mean"] < 0 if LOWER_IS_BETTER[metric] else paired["mean"] > 0
        word = "better" if better else "worse"
    return f"{_fmt(single)} -> {_fmt(coop)} ({word})"
