"""``astolfo-opt demo``: trained tiny world -> scan (NaN model excluded) -> study (scorer=world) -> export -> judge."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="runs/demo", help="demo folder (study.db, artifacts, best.safetensors, summary.json)")
    parser.add_argument("--world", default="runs/world-demo", help="world folder (built on the first run; default runs/world-demo)")
    parser.add_argument("--trials", type=int, default=30, help="number of trials (default 30)")
    parser.add_argument("--device", default="cpu", help="cpu (default) | auto | cuda")
    parser.add_argument("--keep", action="store_true", help="resume the previous demo study instead of starting fresh")


def run(args: argparse.Namespace) -> int:
    from astolfo_opt.search.demo import run_demo

    run_demo(args.out, n_trials=args.trials, fresh=not args.keep, device=args.device, world_dir=args.world)
    return 0
