"""Choose the search default by its worst case (issue 15): every strategy on every oracle variant and pool size.

A *cell* is one ``bench_search.py`` run: an oracle variant (``benchkit.oracle.MISMATCHES``: the original cone and
five that each break one assumption of the surrogate's model) at one pool size, on the reporting seeds, every
strategy with the same trial budget. This script runs the cells that have no JSON yet (``--jobs`` at a time, each a
subprocess with one BLAS thread), then reports:

- per cell the median best true ``s`` at the budget and the median true ``s`` of the incumbent (the trial with the
  best *observed* value: the one a user would export);
- **the rule**: a strategy's regret in a cell is the best strategy's median incumbent ``s`` minus its own; the default
  should be the strategy whose largest regret over all cells is smallest (ties: the current default);
- the issue's targets that these cells can check.

The committed world-mode results (``experiments/results/bench_world_search_n*.json``, ``bench_search.py --world``)
join the rule as cells too, on the same 0-to-1 scale (:func:`load_world_cells`). ``--rerun NAME`` runs one changed
strategy again on every cell and keeps the others' runs.

The summary goes to ``experiments/results/search_suite.json``; ``experiments/search_report.py`` (run at the end when the
cells are the committed ones) turns it into the tables of ``experiments/README_bench_search.md`` - never typed by hand.

  python experiments/search_suite.py --jobs 2            # run missing cells, then report
  python experiments/search_suite.py --report-only       # tables from the committed JSONs
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchkit.oracle import MISMATCHES  # noqa: E402
from experiments.bench_search import DEFAULT, SEED_SETS  # noqa: E402

#: the strategies issue 15 compares (qmc is a space-filling baseline, left to bench_search.py)
STRATEGIES = ("surrogate", "staged", "tpe", "cmaes", "gp", "random", "greedy")
#: (mismatch, pool size) cells: every variant at 12 and 32 models, the original oracle also at 50
CELLS = tuple((m, n) for n in (12, 32) for m in MISMATCHES) + (("original", 50),)
RESULTS = ROOT / "experiments" / "results" / "search_suite"


def cell_path(folder: Path, mismatch: str, models: int) -> Path:
    return folder / f"{mismatch}_n{models}.json"


def run_cells(cells: list[tuple[str, int]], args, out: Path | None = None) -> None:
    """Run the cells whose JSON is missing in ``out`` (default ``args.out``), ``args.jobs`` subprocesses at a time
    (pools are made first, serially)."""
    out = out or args.out
    todo = [c for c in cells if not cell_path(out, *c).is_file()]
    if not todo:
        return
    from benchkit.oracle import make_bench_pool

    for n in sorted({n for _, n in todo}):
        for seed in SEED_SETS[args.seed]:
            make_bench_pool(args.workdir / f"pool_n{n}_s{seed}", n, seed=seed)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    running: list[tuple[subprocess.Popen, tuple[str, int], float]] = []
    out.mkdir(parents=True, exist_ok=True)
    (out / "logs").mkdir(exist_ok=True)
    queue = list(todo)
    while queue or running:
        while queue and len(running) < args.jobs:
            m, n = queue.pop(0)
            log = open(out / "logs" / f"{m}_n{n}.log", "w")  # noqa: SIM115 (closed with the process)
            cmd = [sys.executable, str(ROOT / "experiments" / "bench_search.py"), "--seed", args.seed, "--models", str(n),
                   "--mismatch", m, "--trials", str(args.trials), "--strategies", ",".join(args.strategies),
                   "--workdir", str(args.workdir), "--json", str(cell_path(out, m, n))]
            running.append((subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env), (m, n), time.time()))
            print(f"started {m} N={n}", flush=True)
        time.sleep(2)
        for item in list(running):
            proc, cell, t0 = item
            if proc.poll() is not None:
                running.remove(item)
                print(f"finished {cell[0]} N={cell[1]} rc={proc.returncode} in {time.time() - t0:.0f} s", flush=True)


def rerun_strategy(cells: list[tuple[str, int]], args) -> None:
    """``--rerun NAME``: run strategy NAME alone on every cell (into ``<out>/rerun_NAME/``, git-ignored), then replace its
    entries in the cell JSONs - its summary, its per-seed rows, the cell's criteria - and record the commit it ran at.
    For a changed strategy: the others' runs do not depend on it, so they are kept instead of rerun."""
    import subprocess as sp

    from astolfo_opt.checkpoint.writer import atomic_write_text
    from experiments.bench_search import criteria

    name = args.rerun
    tmp = args.out / f"rerun_{name}"
    run_cells(cells, argparse.Namespace(**{**vars(args), "strategies": [name]}), out=tmp)
    commit = sp.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    dirty = bool(sp.run(["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                        text=True).stdout.strip())
    for m, n in cells:
        cell, new = cell_path(args.out, m, n), json.loads(cell_path(tmp, m, n).read_text())
        d = json.loads(cell.read_text())
        if (d["seeds"], d["trials"], d["noise"]) != (new["seeds"], new["trials"], new["noise"]):
            raise SystemExit(f"{cell}: the rerun's seeds / trials / noise differ from the cell's; rerun the whole cell")
        d["strategies"][name] = new["strategies"][name]
        rows = {r["seed"]: r for r in new["per_seed"]}
        for row in d["per_seed"]:
            row["strategies"][name] = rows[row["seed"]]["strategies"][name]
        d["criteria"] = criteria(d["strategies"], d["trials"])
        d.setdefault("reruns", {})[name] = f"{commit}{' + uncommitted changes' if dirty else ''}"
        atomic_write_text(cell, json.dumps(d, indent=1))
        print(f"{m} N={n}: {name} replaced (incumbent {new['strategies'][name]['incumbent_true_at_budget']:.3f})", flush=True)


def load_cells(folder: Path) -> list[dict[str, Any]]:
    """Every cell JSON in ``folder``, ordered by pool size, then variant as listed in MISMATCHES."""
    out = []
    for p in folder.glob("*_n*.json"):
        d = json.loads(p.read_text())
        if d.get("mismatch") in MISMATCHES:
            shown = p.relative_to(ROOT) if p.is_relative_to(ROOT) else p
            out.append({**d, "path": str(shown)})
    order = list(MISMATCHES)
    return sorted(out, key=lambda c: (c["models"], order.index(c["mismatch"])))


def load_world_cells(folder: Path) -> list[dict[str, Any]]:
    """World-mode results (``bench_world_search_n*.json`` in ``folder``) as cells of the rule. A strategy's figure is
    the median over search seeds of the share of the gap from the uniform average (trial 0) to the best-known objective
    that its incumbent closed, ``(inc - uniform) / (best_known - uniform)``: 0 at the uniform average, 1 at the best
    known - the scale ``s`` has on the oracle (0 at the uniform average, 1 at the target), so one regret compares both."""
    import statistics

    out = []
    for p in sorted(folder.glob("bench_world_search_n*.json")):
        d = json.loads(p.read_text())
        if d.get("mode") != "world" or "uniform_objective" not in d:
            continue
        st = {}
        for n, s in d["strategies"].items():
            share = []
            for r in s["per_run"]:
                u, b = d["uniform_objective"][str(r["seed"])], d["best_known"][str(r["seed"])]
                share.append((r["incumbent_objective"] - u) / (b - u) if b > u else 1.0)
            st[n] = {"incumbent_true_at_budget": statistics.median(share), "best_at_budget": s["best_at_budget"],
                     "judge_accuracy": s["judge_accuracy"], "renders_to_95": s["renders_to_95"]}
        shown = p.relative_to(ROOT) if p.is_relative_to(ROOT) else p
        out.append({"mismatch": "world", "models": d["models"], "path": str(shown), "seeds": d["seeds"], "trials": d["trials"],
                    "world_seed": d["world_seed"], "strategies": st})
    return sorted(out, key=lambda c: c["models"])


def decide(cells: list[dict[str, Any]]) -> dict[str, Any]:
    """The worst-case rule over the cells present (see module doc)."""
    names = [s for s in STRATEGIES if all(s in c["strategies"] for c in cells)]
    regrets: dict[str, list[tuple[float, str]]] = {s: [] for s in names}
    for c in cells:
        inc = {s: c["strategies"][s]["incumbent_true_at_budget"] for s in names}
        top = max(inc.values())
        for s in names:
            regrets[s].append((top - inc[s], f"{c['mismatch']} N={c['models']}"))
    worst = {s: max(r) for s, r in regrets.items()}
    best = min(names, key=lambda s: (round(worst[s][0], 4), s != DEFAULT))
    return {"rule": "minimise over strategies the largest regret over cells; regret = best strategy's median incumbent "
                    "true s in the cell minus the strategy's own (world cells: the share of the uniform -> best-known gap "
                    "the incumbent closed, in place of s)", "worst_regret": {s: {"regret": round(w, 4), "cell": c}
                                                                                    for s, (w, c) in worst.items()},
            "winner": best, "current_default": DEFAULT, "cells": len(cells)}


def targets(cells: list[dict[str, Any]]) -> dict[str, Any]:
    """Issue 15's synthetic-mode targets, checked on the cells present."""
    out: dict[str, Any] = {}
    for c in cells:
        if c["mismatch"] == "world":
            st = c["strategies"]
            for key, label in (("best_at_budget", "median objective"), ("judge_accuracy", "median judge accuracy")):
                other = max((v[key] for n, v in st.items() if n != DEFAULT), default=None)
                if other is not None:
                    out[f"world_n{c['models']}: default {label} >= every other strategy's"] = {
                        "default": round(st[DEFAULT][key], 4), "best other": round(other, 4), "met": st[DEFAULT][key] >= other}
            if "random" in st:
                d, r = st[DEFAULT]["renders_to_95"], st["random"]["renders_to_95"]
                out[f"world_n{c['models']}: default renders to 95% <= 1/3 of random's"] = {
                    "default": d, "random": r, "met": d is not None and (r is None or 3 * d <= r)}
            continue
        if c["mismatch"] != "original" and "tpe" in c["strategies"]:
            d, t = c["strategies"][DEFAULT]["best_at_budget"], c["strategies"]["tpe"]["best_at_budget"]
            out[f"{c['mismatch']}_n{c['models']}: default >= tpe - 0.02"] = {"default": round(d, 4), "tpe": round(t, 4),
                                                                           "met": d >= t - 0.02}
        if c["mismatch"] == "original" and c["models"] == 12:
            d = c["strategies"][DEFAULT]["best_at_budget"]
            out["original_n12: default median >= 0.90 at T=60"] = {"default": round(d, 4), "met": d >= 0.90}
    return out


def write_report(folder: Path) -> dict[str, Any]:
    """``search_suite.json`` (beside the cell folder) from the cell JSONs: the cells' figures, the rule's decision and
    the targets. ``experiments/search_report.py`` turns it into the README tables."""
    from astolfo_opt.checkpoint.writer import atomic_write_text

    cells = load_cells(folder)
    if not cells:
        raise SystemExit(f"no cell JSON under {folder}: run without --report-only first")
    world = load_world_cells(folder.parent)
    decision, checks = decide(cells + world), targets(cells + world)
    summary = {"default": DEFAULT, "mismatches": MISMATCHES, "seed_sets": {k: list(v) for k, v in SEED_SETS.items()},
               "decision": decision, "targets": checks,
               "cells": [{k: c[k] for k in ("mismatch", "models", "path", "seeds", "trials")} |
                         {"strategies": {s: {k: c["strategies"][s][k] for k in ("best_at_budget", "incumbent_true_at_budget",
                                                                                "trials_to_95", "best_at_budget_min",
                                                                                "best_at_budget_max")}
                                         for s in c["strategies"]}} for c in cells],
               "world_cells": world}
    atomic_write_text(folder.parent / "search_suite.json", json.dumps(summary, indent=1))
    return summary


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--jobs", type=int, default=2, help="cells run at once (each one process, one BLAS thread)")
    ap.add_argument("--seed", default="reporting", choices=sorted(SEED_SETS), help="seed set of the cells")
    ap.add_argument("--trials", type=int, default=60)
    ap.add_argument("--strategies", default=",".join(STRATEGIES))
    ap.add_argument("--cells", default=None, help="comma list like original:12,quadratic:32 (default: all)")
    ap.add_argument("--out", type=Path, default=RESULTS, help="cell JSON folder")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/astolfo-search-suite"), help="bench pools (reused)")
    ap.add_argument("--report-only", action="store_true")
    ap.add_argument("--rerun", default=None, help="rerun one strategy on every cell and replace its entries (a changed "
                                                  "sampler; the other strategies' runs are kept)")
    a = ap.parse_args(argv)
    a.strategies = [s.strip() for s in a.strategies.split(",") if s.strip()]
    cells = list(CELLS) if not a.cells else [(c.split(":")[0], int(c.split(":")[1])) for c in a.cells.split(",")]
    if a.rerun:
        rerun_strategy(cells, a)
    elif not a.report_only:
        run_cells(cells, a)
    summary = write_report(a.out)
    if a.out == RESULTS:  # the committed cells: refresh the README's generated tables too
        from experiments.search_report import main as report

        report([])
    print(json.dumps(summary["decision"], indent=1))
    print(json.dumps(summary["targets"], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
