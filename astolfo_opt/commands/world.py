"""``astolfo-opt world build|check|judge``: the tiny trained world (see :mod:`astolfo_opt.world`)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    b = sub.add_parser("build", help="build (or reuse) a world folder: pool, scorer, judge, prompt sets, world.json")
    b.add_argument("out", help="world folder (created)")
    b.add_argument("--seed", type=int, default=0, help="world seed (default 0): same seed, machine and lock -> same file hashes")
    b.add_argument("--models", type=int, default=None, help="finetunes incl. outliers (default: demo 5, bench 32)")
    b.add_argument("--arch", default="sd1", help="sd1 (an sdxl world does not fit the CPU budget; see the README)")
    b.add_argument("--size", default="demo", help="demo (<= 3 min on 2 cores) | bench (32 models, <= 20 min) | test (seconds)")
    b.add_argument("--quiet", action="store_true", help="no progress bars")
    c = sub.add_parser("check", help="measure the world's properties against the thresholds stated in world/check.py")
    c.add_argument("out", help="world folder")
    c.add_argument("--recipes", type=int, default=30, help="random recipes for the objective-judge correlation (default 30)")
    c.add_argument("--json", default=None, help="write every number here (default: OUT/check.json)")
    j = sub.add_parser("judge", help="judge an `astolfo-opt render` folder with the world's judge")
    j.add_argument("--images", required=True, help="folder written by astolfo-opt render (PNGs + render.json)")
    j.add_argument("--world", default="runs/world-demo", help="world folder holding judge/ (default runs/world-demo)")
    j.add_argument("--json", default=None, help="write accuracy, per-attribute accuracy and per-image rows here")


def run(args: argparse.Namespace) -> int:
    from astolfo_opt.checkpoint.writer import atomic_write_text

    if args.action == "build":
        from astolfo_opt.world.build import BuildParams, build_world

        build_world(args.out, BuildParams(seed=args.seed, models=args.models, arch=args.arch, size=args.size),
                    progress=not args.quiet)
        return 0
    if args.action == "check":
        from dataclasses import asdict

        from astolfo_opt.world.check import check_world

        props = check_world(args.out, recipes=args.recipes)
        print(f"\n{'property':18s} {'value':>7s} {'threshold':>9s}  result")
        for pr in props:
            print(f"{pr.name:18s} {pr.value:7.3f} {pr.threshold:9.3f}  {'pass' if pr.passed else 'FAIL'}")
        path = Path(args.json) if args.json else Path(args.out) / "check.json"
        atomic_write_text(path, json.dumps([asdict(p) for p in props], indent=1, default=str) + "\n")
        print(f"written: {path}")
        return 0 if all(p.passed for p in props) else 1
    from astolfo_opt.world.judge import judge_folder

    res = judge_folder(Path(args.images), Path(args.world))
    print(f"{args.images}: judge accuracy {res['accuracy']:.3f} over {res['images']} images "
          f"({', '.join(f'{a} {v:.2f}' for a, v in res['attributes'].items())})")
    if args.json:
        atomic_write_text(Path(args.json), json.dumps(res, indent=1) + "\n")
    return 0
