"""`python -m mapanything_ext.preflight`: see the package's docstring (also printed by --help)."""

from __future__ import annotations

import argparse
import sys

import torch

from mapanything_ext import preflight
from mapanything_ext.config import compose_training
from mapanything_ext.models.offline import problems_of
from mapanything_ext.preflight.data_check import check_data
from mapanything_ext.preflight.memory_check import check_memory
from mapanything_ext.preflight.run_check import check_model, check_output


def parse(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(prog="python -m mapanything_ext.preflight", description=preflight.__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scan-all", action="store_true", help="read every frame of both splits (progress bar)")
    parser.add_argument("--frames", type=int, default=8, help="frames read per split without --scan-all (default 8)")
    parser.add_argument("overrides", nargs="*", help="the training command's overrides (machine=..., model=..., ...)")
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        parser.error(f"unknown option(s) {' '.join(unknown)}")
    return args, args.overrides


def say(line: str) -> None:
    print(f"[preflight] {line}", flush=True)


def main(argv=None) -> int:
    args, overrides = parse(list(sys.argv[1:] if argv is None else argv))
    cfg = compose_training(overrides)
    offline = problems_of(cfg)
    problems = list(offline)
    for warning in preflight.warnings_of(cfg):
        say(f"WARNING: {warning}")
    data = check_data(cfg, scan_all=args.scan_all, sample=args.frames)
    for line in data.lines:
        say(line)
    problems += data.problems
    lines: list[str] = []
    model = None
    if offline and cfg.model.get("name") == "mapanything":
        lines.append("model: not built (MapAnything's set-up has the problems listed)")
    else:
        model = check_model(cfg, lines, problems)
        if model is not None:
            check_memory(cfg, model, lines)
    if not data.problems:
        loss_lines, loss_problems = preflight.loss_check(cfg)
        lines += loss_lines
        problems += loss_problems
    check_output(cfg, model, lines, problems)
    for line in lines:
        say(line)
    for problem in problems:
        say(f"PROBLEM: {problem}")
    say(f"{'OK: the job can start' if not problems else f'{len(problems)} problem(s)'} (model {cfg.model.name}, "
        f"torch {torch.__version__}, torch hub dir {torch.hub.get_dir()})")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
