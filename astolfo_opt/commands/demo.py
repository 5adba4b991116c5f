"""``astolfo-opt demo``: tiny pool -> scan (NaN model excluded) -> pruned study -> export -> dashboard command."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="runs/demo", help="demo folder (pool, study.db, artifacts, best.safetensors)")
    parser.add_argument("--trials", type=int, default=24, help="number of trials (default 24)")
    parser.add_argument("--device", default="cpu", help="cpu (default) | auto | cuda")
    parser.add_argument("--keep", action="store_true", help="resume the previous demo study instead of starting fresh")


def run(args: argparse.Namespace) -> int:
    from astolfo_opt.search.demo import run_demo

    run_demo(args.out, n_trials=args.trials, fresh=not args.keep, device=args.device)
    return 0
