"""Simulated reviews on the demo world: how many answers until the calibrated top-1 beats the automatic top-1 on a
hidden taste the automatic objective does not know (target: <= 30, median over seeds).

Per study seed: a 30-trial study on the demo world (``scorer=world``, TPE: see ``--sampler``), then, per
hidden taste (``review_sim.tastes()``), a fresh review of its top 8 distinct trials, 3 grids per round, answered by
the simulated reviewer through optuna-dashboard's API until the calibrated top-1 is better on the taste (cap 60
rounds; a round is one click or one skip). Seeds where the automatic top-1 is already the taste's best candidate
cannot be improved and are counted apart.

Tuning seeds (the prior strength is chosen on them) and reporting seeds are disjoint:

  python experiments/bench_review.py --seeds 10 11 12 --priors 0.03 0.1 0.3 1 4 --spread-rounds 30 \\
      --json experiments/results/bench_review_tune.json
  python experiments/bench_review.py --seeds 0 1 2 3 4 --priors 0.1 --json experiments/results/bench_review.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from review_sim import JudgedTrials, WorldTaste, answer_round, median, rounds_to_beat, tastes  # noqa: E402

TOP, SHOW, TRIALS, CAP = 8, 3, 30, 60


def run_seed(world: Path, seed: int, priors: list[float], work: Path, sampler: str) -> list[dict]:
    import optuna

    from astolfo_opt.search.app import run_search
    from astolfo_opt.search.demo import world_search_config
    from astolfo_opt.search.review import Review

    out = work / f"s{seed}"
    t0 = time.perf_counter()
    if not (out / "study.db").exists():  # --workdir keeps studies between runs (tuning, then reporting)
        run_search(world_search_config(world, out, TRIALS, study_name="review",
                                       extra_overrides=[f"seed={seed}", f"sampler={sampler}", "progress=false"]))
    search_s = time.perf_counter() - t0
    url = f"sqlite:///{out / 'study.db'}"
    study = optuna.load_study(study_name="review", storage=url)
    rows = []
    judged = JudgedTrials(world, study)
    for name, h in tastes().items():
        taste = WorldTaste(judged, h["weights"], h.get("focus"))
        for prior in priors:
            with contextlib.suppress(KeyError):
                optuna.delete_study(study_name="review+review", storage=url)
            t1 = time.perf_counter()
            review = Review(url, "review", top=TOP, show=SHOW, prior=prior)
            res = rounds_to_beat(review, taste, CAP, seed=seed)
            res.update(seed=seed, taste=name, prior=prior, search_s=round(search_s, 1), review_s=round(time.perf_counter() - t1, 1),
                       answers=review.rounds()["answers"], weights=review.calibration.weights)
            print(json.dumps(res), flush=True)
            rows.append(res)
    return rows


def weight_spread(world: Path, seed: int, priors: list[float], work: Path, rounds: int) -> list[dict]:
    """How far each prior lets the calibration move after ``rounds`` rounds of the judge taste: the largest and
    smallest (prompt, scorer) weight, against the automatic 1.0 (a too weak prior lets one prompt take over)."""
    import optuna

    from astolfo_opt.search.review import Review

    url = f"sqlite:///{work / f's{seed}' / 'study.db'}"
    study = optuna.load_study(study_name="review", storage=url)
    judged = JudgedTrials(world, study)
    out = []
    for prior in priors:
        with contextlib.suppress(KeyError):
            optuna.delete_study(study_name="review+review", storage=url)
        review = Review(url, "review", top=TOP, show=SHOW, prior=prior)
        taste, rng = WorldTaste(judged, tastes()["judge"]["weights"]), random.Random(seed)
        for _ in range(rounds):
            answer_round(review, taste, rng)
        ws = [w for pw in review.calibrate().prompt_weights.values() for w in pw.values()]
        out.append({"seed": seed, "prior": prior, "rounds": rounds, "max_weight": max(ws), "min_weight": min(ws),
                    "answers": review.rounds()["answers"]})
        print(json.dumps(out[-1]), flush=True)
    return out


def summarise(rows: list[dict]) -> dict:
    out = {}
    for prior in sorted({r["prior"] for r in rows}):
        for name in tastes():
            rs = [r for r in rows if r["prior"] == prior and r["taste"] == name]
            beatable = [r for r in rs if "already" not in r.get("reason", "")]
            solved = [r["rounds"] for r in beatable if r["rounds"] is not None]
            # an unsolved beatable seed counts as more than the cap in the median
            rounds = [r["rounds"] if r["rounds"] is not None else CAP + 1 for r in beatable]
            out[f"prior={prior}/{name}"] = {"seeds": len(rs), "already_best": len(rs) - len(beatable), "beaten": len(solved),
                                            "median_rounds": median(rounds) if rounds else None, "rounds": rounds}
        allr = [r["rounds"] if r["rounds"] is not None else CAP + 1 for r in rows
                if r["prior"] == prior and "already" not in r.get("reason", "")]
        out[f"prior={prior}/all"] = {"median_rounds": median(allr) if allr else None, "n": len(allr)}
    return out


def table(doc: dict) -> str:
    """Markdown: per seed and prior, how many tastes could be improved, the rounds it took, and the taste gained."""
    lines = ["| seeds | prior | tastes improvable / runs | beaten within the cap | median rounds (max) | median taste gain "
             "(auto top-1 -> calibrated top-1) |", "|---|---|---|---|---|---|"]
    for prior in doc["priors"]:
        for seed in [*doc["seeds"], "all"]:
            rs = [r for r in doc["runs"] if r["prior"] == prior and (seed == "all" or r["seed"] == seed)]
            ok = [r for r in rs if "already" not in r.get("reason", "")]
            done = [r for r in ok if r["rounds"] is not None]
            rounds = [r["rounds"] if r["rounds"] is not None else doc["cap"] + 1 for r in ok]
            gain = [r["calibrated_taste"] - r["auto_taste"] for r in done]
            med = f"{median(rounds):g} ({max(rounds)})" if rounds else "-"
            lines.append(f"| {'**all**' if seed == 'all' else seed} | {prior:g} | {len(ok)} / {len(rs)} | {len(done)} | {med} | "
                         + (f"{median(gain):+.3f}" if gain else "-") + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--world", type=Path, default=Path("runs/world-demo"), help="demo world (built when missing)")
    ap.add_argument("--seeds", type=int, nargs="+", default=None)
    ap.add_argument("--table", type=Path, default=None, help="print the markdown table of a result JSON and exit")
    ap.add_argument("--priors", type=float, nargs="+", default=[0.1])
    ap.add_argument("--sampler", default="tpe", help="the studies' sampler (default tpe: its studies differ per seed; the "
                    "default surrogate's 30-trial studies share many trials across seeds)")
    ap.add_argument("--spread-rounds", type=int, default=0,
                    help="also record the weight spread after N rounds of the judge taste, per seed and prior")
    ap.add_argument("--workdir", type=Path, default=None, help="keep the studies here (default: a temp folder, deleted)")
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args(argv)
    if a.table:
        print(table(json.loads(a.table.read_text())))
        return 0
    if not a.seeds:
        ap.error("--seeds is required (or --table FILE)")

    import torch

    from astolfo_opt.world.build import BuildParams, build_world

    build_world(a.world, BuildParams(size="demo"), progress=False)
    t0 = time.perf_counter()
    rows = []
    with tempfile.TemporaryDirectory(prefix="astolfo-review-bench-") as tmp:
        work = a.workdir or Path(tmp)
        for seed in a.seeds:
            rows += run_seed(a.world, seed, a.priors, work / a.sampler, a.sampler)
        spread = [x for seed in a.seeds for x in weight_spread(a.world, seed, a.priors, work / a.sampler, a.spread_rounds)] \
            if a.spread_rounds else []
    doc = {"seeds": a.seeds, "sampler": a.sampler, "spread": spread, "priors": a.priors, "top": TOP, "show": SHOW,
           "trials": TRIALS, "cap": CAP, "tastes": tastes(), "summary": summarise(rows), "runs": rows,
           "wall_s": round(time.perf_counter() - t0, 1),
           "machine": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "python": platform.python_version()}}
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(doc, indent=1) + "\n")
    for k, v in doc["summary"].items():
        print(k, v)
    return 0


if __name__ == "__main__":
    sys.exit(main())
