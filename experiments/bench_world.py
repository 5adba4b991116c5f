"""Build a world and print its budgets: build time per stage against the size's budget, pool bytes against 1 GB, and
(``--check``) every property ``world check`` measures. Budgets are printed, never asserted.

  python experiments/bench_world.py --size demo --check --json experiments/results/bench_world_demo.json
  python experiments/bench_world.py --size bench --models 32 --json experiments/results/bench_world_bench.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

BUDGET_S = {"demo": 180, "bench": 1200, "test": None}
POOL_BUDGET_BYTES = 1_000_000_000


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="demo", choices=["demo", "bench", "test"])
    ap.add_argument("--models", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None, help="world folder (default: a temp folder, deleted)")
    ap.add_argument("--check", action="store_true", help="also run world check")
    ap.add_argument("--json", type=Path, required=True)
    a = ap.parse_args(argv)

    import torch

    from astolfo_opt.world.build import BuildParams, build_world, load_world

    tmp = a.out is None
    out = a.out or Path(tempfile.mkdtemp(prefix="astolfo-world-")) / "world"
    try:
        if tmp or not (out / "world.json").exists():
            t0 = time.perf_counter()
            build_world(out, BuildParams(seed=a.seed, models=a.models, size=a.size), progress=False)
            wall = time.perf_counter() - t0
        else:
            wall = None
        doc = load_world(out)
        pool = sum(info["bytes"] for rel, info in doc["files"].items() if rel.startswith("pool/"))
        res = {"size": a.size, "models": doc["models"], "seed": a.seed, "machine": {"cpus": os.cpu_count(),
               "torch_threads": torch.get_num_threads(), "python": platform.python_version(), "torch": torch.__version__},
               "build_wall_s": wall, "build_seconds": doc["build_seconds"], "budget_s": BUDGET_S[a.size],
               "pool_bytes": pool, "pool_files": len([f for f in doc["files"] if f.startswith("pool/")]),
               "pool_budget_bytes": POOL_BUDGET_BYTES, "losses": doc["losses"]}
        total = doc["build_seconds"]["total"]
        print(f"world {a.size}: {res['pool_files']} pool files, {pool / 1e6:.0f} MB (budget {POOL_BUDGET_BYTES / 1e9:.0f} GB); "
              f"built in {total:.0f} s (budget {BUDGET_S[a.size]} s): " +
              ", ".join(f"{k} {v:.0f} s" for k, v in doc["build_seconds"].items() if k != "total"))
        if a.check:
            from astolfo_opt.world.check import check_world

            t0 = time.perf_counter()
            props = check_world(out)
            res["check_s"] = round(time.perf_counter() - t0, 1)
            res["check"] = [asdict(p) for p in props]
            for p in props:
                print(f"  {p.name:18s} {p.value:7.3f} (threshold {p.threshold}) {'pass' if p.passed else 'FAIL'}")
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(res, indent=1, default=str) + "\n")
        print(f"written: {a.json}")
    finally:
        if tmp:
            shutil.rmtree(out.parent, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
