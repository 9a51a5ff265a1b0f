"""The data as the training job will read it: both roots, the split folders, and frames read by the
dataset's own reader (images against their intrinsics, depth present and plausible, depth against
the LiDAR where a frame has its `.pcd`).

A sample of frames spread over each split is read by default; `--scan-all` reads every frame.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import numpy as np
from tqdm import tqdm

from mapanything_ext.datasets.base import BadSampleError
from mapanything_ext.datasets.opv2v import NUM_CAMERAS, _OPV2VIndex, load_frame_metadata
from mapanything_ext.datasets.pcd import PCDError, read_pcd_xyz
from mapanything_ext.preflight.lidar_depth import TOLERANCE, agreement

MIN_VALID_DEPTH_FRACTION = 0.05  # a camera's depth with fewer valid pixels is implausible
MAX_PLAUSIBLE_MEDIAN_M = 250.0


SHOWN_PER_KIND = 3  # frames named per kind of problem; the rest are counted


class DataReport:
    """Lines to print and problems found, gathered over every check (nothing stops at the first); a
    problem repeated over many frames is named for the first few and counted for the rest."""

    def __init__(self):
        self.lines: list[str] = []
        self.problems: list[str] = []
        self.ratios: dict[tuple[str, int], list[tuple[float, int]]] = defaultdict(list)
        self._by_kind: dict[str, list[str]] = defaultdict(list)

    def frame_problem(self, kind: str, message: str) -> None:
        self._by_kind[kind].append(message)

    def close(self) -> None:
        for kind, messages in self._by_kind.items():
            self.problems += messages[:SHOWN_PER_KIND]
            if len(messages) > SHOWN_PER_KIND:
                self.problems.append(f"... and {len(messages) - SHOWN_PER_KIND} more with {kind}")
        self._by_kind.clear()


def check_data(cfg, scan_all: bool = False, sample: int = 8) -> DataReport:
    report = DataReport()
    roots = {"machine.opv2v_root": cfg.machine.get("opv2v_root"), "machine.opv2v_depth_root": cfg.machine.get("opv2v_depth_root")}
    for key, value in roots.items():
        if not value or not Path(value).is_dir():
            report.problems.append(f"{key}={value} is not a folder")
    if report.problems:
        return report
    image_root, depth_root = Path(roots["machine.opv2v_root"]), Path(roots["machine.opv2v_depth_root"])
    if image_root.resolve() == depth_root.resolve():
        report.problems.append(f"machine.opv2v_depth_root={depth_root} is the image tree itself (machine.opv2v_root): "
                               f"it must point at the parallel depth tree (OPV2V_Hetero in HEAL's release)")
        return report
    for split in dict.fromkeys((cfg.dataset.train_split, cfg.dataset.test_split)):
        _check_split(image_root, depth_root, split, scan_all, sample, report)
    report.close()
    _judge_lidar(report)
    return report


def _check_split(image_root: Path, depth_root: Path, split: str, scan_all: bool, sample: int,
                 report: DataReport) -> None:
    try:
        index = _OPV2VIndex(image_root, depth_root, split)
    except FileNotFoundError as err:
        report.problems.append(str(err))
        return
    frames = [(s, c, f) for s, cavs in index.frames.items() for c, fs in cavs.items() for f in fs]
    chosen = frames if scan_all else [frames[i] for i in _spread(len(frames), sample)]
    bad = 0
    for scenario, cav, frame in tqdm(chosen, desc=f"[preflight] reading {split}", disable=not scan_all,
                                     mininterval=2.0):
        problems = _check_frame(index, scenario, cav, frame, report)
        for kind, message in problems:
            report.frame_problem(kind, message)
        bad += bool(problems)
    report.lines.append(f"data: {split}: {len(index.frames)} scenario(s), {len(frames)} vehicle-frames; "
                        f"{len(chosen)} read{' (all)' if scan_all else ''}, {bad} with problems")


def _spread(n: int, k: int) -> list[int]:
    """k indices spread evenly over range(n) (all when k >= n)."""
    return list(range(n)) if k >= n else sorted({round(i * (n - 1) / max(k - 1, 1)) for i in range(k)})


def _check_frame(index: _OPV2VIndex, scenario: str, cav: str, frame: str, report: DataReport) -> list[tuple[str, str]]:
    """(kind, message) of each problem of one vehicle-frame; its depth/LiDAR ratios go to the report."""
    where = f"{index.split}/{scenario}/{cav}/{frame}"
    try:
        meta = load_frame_metadata(index.root / index.split / scenario / cav / f"{frame}.yaml")
        views, _ = index.raw_views(scenario, cav, frame, meta=meta)
    except (FileNotFoundError, BadSampleError, OSError, ValueError) as err:
        return [(type(err).__name__, f"{where}: {err}")]
    problems = []
    for k, view in enumerate(views):
        valid = view.depth > 0
        fraction = float(valid.mean())
        median = float(np.median(view.depth[valid])) if valid.any() else 0.0
        if fraction < MIN_VALID_DEPTH_FRACTION or not 0.5 <= median <= MAX_PLAUSIBLE_MEDIAN_M:
            problems.append(("implausible depth", f"{where} camera{k}: implausible depth ({100 * fraction:.1f}% valid pixels, median "
                            f"{median:.2f} m; expected > {100 * MIN_VALID_DEPTH_FRACTION:.0f}% and 0.5..250 m): "
                            f"is machine.opv2v_depth_root the depth tree, in a known encoding (docs/data.md)?"))
    pcd = index.root / index.split / scenario / cav / f"{frame}.pcd"
    if pcd.is_file():
        try:
            points = read_pcd_xyz(pcd)
        except (PCDError, OSError, ValueError) as err:
            return problems + [("unreadable LiDAR files", f"{pcd}: {err}")]
        for k, view in enumerate(views[:NUM_CAMERAS]):
            cam = meta[f"camera{k}"]
            result = agreement(points, meta["lidar_pose"], cam["cords"], cam["intrinsic"], view.depth, k)
            if result.judged:
                report.ratios[(index.split, k)].append((result.median_ratio, result.points))
    return problems


def _judge_lidar(report: DataReport) -> None:
    """One line per split and camera: the median over frames of each frame's median ratio."""
    if not report.ratios:
        report.lines.append("data: no frame read had its LiDAR .pcd: depth not checked against the LiDAR")
        return
    for (split, camera), values in sorted(report.ratios.items()):
        ratio = float(np.median([r for r, _ in values]))
        points = sum(n for _, n in values)
        report.lines.append(f"data: {split} camera{camera}: decoded depth / LiDAR depth, median {ratio:.3f} over "
                            f"{len(values)} frame(s), {points} points")
        if abs(ratio - 1.0) > TOLERANCE:
            report.problems.append(
                f"{split} camera{camera}: decoded depth is {ratio:.3f}x the LiDAR's depth (median over {len(values)} "
                f"frames): the depth PNGs are not decoded as they were encoded (docs/data.md, depth encoding), or the "
                f"depth tree belongs to other frames")
