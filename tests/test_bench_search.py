"""Search benchmark (issue 8): the weight-space oracle is exact at its anchors and agrees with a real merge; the
benchmark script runs every strategy through the real search code and writes valid JSON + PNG; the default
``staged`` sampler plugs into Optuna and its plan does what it says."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import optuna
import pytest

from astolfo_opt.search.strategies import StagedSampler, staged_plan
from benchkit.oracle import (
    MISMATCHES,
    SECOND_OPTIMUM,
    CachedOracle,
    GramOracle,
    MismatchedOracle,
    NoisyOracleEvaluator,
    ReferenceOracle,
    coefficients,
    draw_target,
    make_bench_pool,
    space_from_bench_pool,
)

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def bench_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("bench")


@pytest.fixture(scope="session")
def bench_setup(bench_dir):
    folder = bench_dir / "pool_n4_s0"
    pool, outliers = make_bench_pool(folder, 4, seed=0)
    space = space_from_bench_pool(pool)
    target = space.candidate(draw_target(space, 0, outliers))
    return pool, outliers, space, target


@pytest.fixture(scope="session")
def gram(bench_setup):
    _, _, space, target = bench_setup
    return GramOracle(space, target.spec)


def test_pool_and_target_shape(bench_setup):
    pool, outliers, space, target = bench_setup
    assert outliers == ["m03"]
    assert space.kind == "inclusion_mbw" and set(space.components) == {"unet", "te0"}
    for comp in ("unet", "te0"):
        members = {m["model"] for m in target.spec["components"][comp]["members"]}
        assert len(members) >= 2 and "m03" not in members and "base" not in members
    alphas = target.spec["components"]["unet"]["alpha"]
    assert len(alphas) == 25 and all(0.2 <= a <= 1.0 for a in alphas.values())
    assert target.spec["components"]["unet"]["anchor"] == "base"


def test_coefficients_follow_contracts():
    spec = {"base": "b", "components": {"unet": {"method": "weighted_average", "anchor": "b", "alpha": {"IN00": 0.25},
                                                 "alpha_default": 1.0, "members": [{"model": "x", "weight": 1.0},
                                                                                   {"model": "y", "weight": 3.0}]}}}
    names = ["b", "x", "y"]
    assert coefficients(spec, names, "unet", "IN00") == pytest.approx([0.75, 0.0625, 0.1875])
    assert coefficients(spec, names, "unet", "OUT00") == pytest.approx([0.0, 0.25, 0.75])
    assert coefficients(spec, names, "te0", "BASE") == [1.0, 0.0, 0.0]  # absent component: the base's


def test_oracle_anchors_and_agreement(bench_setup, gram):
    _, _, space, target = bench_setup
    uniform = space.candidate(space.uniform_params()).spec
    ref = ReferenceOracle(space, target.spec)
    assert gram.value(uniform) == pytest.approx(0.0, abs=1e-9)
    assert gram.value(target.spec) == pytest.approx(1.0, abs=1e-9)
    assert ref.value(uniform) == pytest.approx(0.0, abs=1e-5)
    assert ref.value(target.spec) == pytest.approx(1.0, abs=1e-5)
    base_alone = space.candidate(space.base_params()).spec
    other = dict(target.params)
    other["inc.unet.m03"] = 1  # the outlier in: far worse than the target
    for spec in (base_alone, space.candidate(other).spec):
        g = gram.value(spec)
        assert 0.0 < g < 1.0 or g < 0.0
        assert g == pytest.approx(ref.value(spec), abs=1e-4)
    assert gram.value(space.candidate(other).spec) < gram.value(target.spec) - 0.2


def test_kernel_oracle_matches_gram(bench_setup, gram):
    from benchkit.oracle import KernelOracle

    _, _, space, target = bench_setup
    kern = KernelOracle(space, target.spec)
    uniform = space.candidate(space.uniform_params()).spec
    assert kern.value(uniform) == pytest.approx(0.0, abs=1e-4)
    assert kern.value(target.spec) == pytest.approx(1.0, abs=1e-4)
    p = dict(target.params)
    p["alpha.unet.M00"] = 0.0
    p["inc.te0.m03"] = 1
    assert kern.value(space.candidate(p).spec) == pytest.approx(gram.value(space.candidate(p).spec), abs=1e-4)


def test_noisy_evaluator_reports_prompt_steps(bench_setup, gram):
    _, _, space, target = bench_setup
    from astolfo_opt.search.evaluator import TrialContext

    ev = NoisyOracleEvaluator(gram, noise=0.02, seed=1, n_steps=4)
    batches = list(ev.evaluate(target, TrialContext()))
    assert [b.step for b in batches] == [1, 2, 3, 4] and ev.steps_run == 4
    assert ev.true_values == [pytest.approx(1.0)]
    assert abs(batches[-1].values[0] - 1.0) < 0.2


def test_mismatched_oracles_break_one_assumption_each(bench_setup, gram):
    """Issue 15's suite: each variant keeps s = 1 at the target and 0 (or its own link of r = 1) at the uniform
    average, and differs from the cone where it should; the rank-only warp is monotone and far from affine."""
    _, outliers, space, target = bench_setup
    uniform = space.candidate(space.uniform_params()).spec
    base_only = {k: int(k.endswith(".base")) if k.startswith("inc.") else v for k, v in space.uniform_params().items()}
    other = space.candidate(base_only).spec
    r_other = gram.distance(other) / gram.norm
    o = {k: MismatchedOracle(space, target.spec, k, seed=3, outliers=outliers) for k in MISMATCHES}
    for k, m in o.items():
        assert m.value(target.spec) == pytest.approx(1.0, abs=1e-9), k
    for k in ("original", "block_sensitivity", "quadratic", "saturating", "rank_only"):
        assert o[k].value(uniform) == pytest.approx(0.0, abs=1e-9), k
    assert o["original"].value(other) == pytest.approx(gram.value(other), abs=1e-12)
    assert o["quadratic"].value(other) == pytest.approx(1 - r_other**2, abs=1e-9)
    assert o["saturating"].value(other) == pytest.approx(1 - (1 - math.exp(-2 * r_other)) / (1 - math.exp(-2)), abs=1e-9)
    w = o["block_sensitivity"].block_weights
    assert set(w) == set(gram.grams) and all(0.1 <= v <= 10 for v in w.values()) and max(w.values()) / min(w.values()) > 3
    assert abs(o["block_sensitivity"].value(other) - gram.value(other)) > 1e-3  # another metric, not a rescaled one
    two = o["two_optima"]
    assert two.value(two.second.target_spec) >= SECOND_OPTIMUM - 1e-9  # the second cone's peak is there
    assert two.value(other) >= gram.value(other) - 1e-12  # the max of two cones is never below the first
    ys = [o["rank_only"].observe(-2 + i / 50) for i in range(176)]
    slopes = [b - a for a, b in zip(ys, ys[1:], strict=False)]
    assert all(d > 0 for d in slopes) and max(slopes) / min(slopes) > 30
    assert o["original"].observe(0.37) == 0.37
    with pytest.raises(Exception, match="unknown"):
        MismatchedOracle(space, target.spec, "nope", seed=0)


def test_noisy_evaluator_shows_the_rank_only_warp(bench_setup):
    """The searcher sees w(s + noise); the true s stays recorded for the tables."""
    _, outliers, space, target = bench_setup
    from astolfo_opt.search.evaluator import TrialContext

    m = CachedOracle(MismatchedOracle(space, target.spec, "rank_only", seed=1, outliers=outliers))
    ev = NoisyOracleEvaluator(m, noise=0.0, seed=1)
    (batch,) = ev.evaluate(target, TrialContext())
    assert ev.true_values == [pytest.approx(1.0)] and batch.values[0] == pytest.approx(m.observe(1.0))
    assert abs(batch.values[0] - 1.0) > 1e-3


def test_staged_plan_structure():
    d = {"inc.unet.a": optuna.distributions.IntDistribution(0, 1), "inc.unet.b": optuna.distributions.IntDistribution(0, 1),
         "alpha.unet.IN00": optuna.distributions.FloatDistribution(0.0, 1.0)}
    plan = staged_plan(d, seed=0)
    first = next(plan)
    assert first == {"inc.unet.a": 1, "inc.unet.b": 1, "alpha.unet.IN00": 1.0}  # uniform average
    p1 = plan.send(0.0)
    assert p1["inc.unet.a"] == 0 and p1["inc.unet.b"] == 1  # sweep: one bit flipped
    p2 = plan.send(0.5)  # dropping a helped
    assert p2["inc.unet.a"] == 1 and p2["inc.unet.b"] == 0
    p3 = plan.send(-0.1)  # only a helped -> a stays out, then the alpha line search starts
    assert p3["inc.unet.a"] == 0 and p3["alpha.unet.IN00"] == pytest.approx(0.75)


def test_staged_sampler_optimises_a_separable_toy():
    """On a noiseless separable toy (4 bits, 2 alphas) the sampler finds the optimum well within 40 trials: at least 4
    of 5 seeds find the bits, and the median best is within 0.02 of the optimum (measured: 10 of 10 seeds, best 0)."""
    def f(trial: optuna.Trial) -> float:
        bits = [trial.suggest_int(f"inc.unet.m{i}", 0, 1) for i in range(4)]
        al = [trial.suggest_float(f"alpha.unet.B{i}", 0.0, 1.0) for i in range(2)]
        want = [1, 0, 1, 0]
        return -sum(b != w for b, w in zip(bits, want, strict=True)) - sum((a - 0.4) ** 2 for a in al)

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    bests, found = [], 0
    for seed in range(5):
        study = optuna.create_study(direction="maximize", sampler=StagedSampler(seed=seed))
        study.optimize(f, n_trials=40)
        assert study.trials[0].params["inc.unet.m0"] == 1  # starts at the uniform average
        bests.append(study.best_value)
        found += [study.best_params[f"inc.unet.m{i}"] for i in range(4)] == [1, 0, 1, 0]
    assert float(np.median(bests)) > -0.02 and found >= 4, (bests, found)


def test_bench_smoke(tmp_path, bench_dir, bench_setup, experiment):
    bench = experiment("bench_search")
    out_json, out_png = tmp_path / "r.json", tmp_path / "r.png"
    rc = bench.main(["--seed", "0", "--models", "4", "--trials", "6", "--repeats", "1", "--workdir", str(bench_dir),
                     "--json", str(out_json), "--png", str(out_png)])
    assert rc == 0
    res = json.loads(out_json.read_text())
    assert res["default"] == "surrogate" and res["trials"] == 6
    assert set(res["strategies"]) == set(bench.STRATEGIES)
    for name, s in res["strategies"].items():
        assert len(s["curve"]) == 6, name
        assert all(b >= a - 1e-12 for a, b in zip(s["curve"], s["curve"][1:], strict=False)), name  # best-so-far
        assert s["trials_to_95"] is None or 1 <= s["trials_to_95"] <= 6
        assert math.isfinite(s["best_at_budget"]) and s["best_at_budget"] == pytest.approx(s["curve"][-1], abs=1e-5)
    # every optuna strategy starts at the uniform average (s = 0) through the study's warm start
    assert res["strategies"]["random"]["curve"][0] == pytest.approx(0.0, abs=1e-9)
    assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_pruning_mode_and_bad_input(tmp_path, capsys, bench_dir, bench_setup, experiment):
    bench = experiment("bench_search")
    out = tmp_path / "p.json"
    rc = bench.main(["--mode", "pruning", "--seed", "0", "--models", "4", "--trials", "8", "--prompts", "4",
                     "--pruners", "none,incumbent", "--workdir", str(bench_dir), "--json", str(out)])
    assert rc == 0
    res = json.loads(out.read_text())
    none, inc = res["pruners"]["none"], res["pruners"]["incumbent"]
    assert 0 < none["render_steps"] <= 8 * 4  # 4 prompt steps per evaluated trial (reused duplicates render nothing)
    assert none["saving"] == 0.0 and none["saving_at_equal_best"] == 0.0
    assert inc["trials"] == 16  # pruned runs get twice the trials, to find the steps needed for the same best
    assert inc["pruned_trials"] >= 1 and inc["saving_at_equal_best"] is not None
    assert bench.main(["--strategies", "nope", "--json", str(tmp_path / "x.json")]) == 2
    assert "unknown" in capsys.readouterr().err


def test_bound_learner_geometry_and_output(tmp_path, bench_dir, experiment):
    """experiments/bench_search_bound.py: with the bits exact, s depends only on the block alphas through the
    oracle's own Gram matrices (checked against the oracle itself), the ceilings grow with the blocks set exactly,
    and without noise the learner closes in on the target."""

    mod = experiment("bench_search_bound")
    experiment("bench_search")  # the bound imports bench_search.setup
    g, target, norm = mod.block_geometry(0, 4, bench_dir)
    assert len(g) == 25 and (g > 0).all() and mod.s_of(target, g, target, norm) == 1.0
    # the closed form agrees with the oracle on a recipe with the target's bits and other alphas
    _, space, tgt, cached = sys.modules["bench_search"].setup(0, 4, bench_dir, "gram")
    alphas = np.full_like(target, 0.3)
    params = dict(tgt.params) | {f"alpha.unet.{b}": float(a) for (_, b), a in
                                 zip([cb for cb in cached.oracle.grams if cb[0] == "unet"], alphas, strict=True)}
    assert mod.s_of(alphas, g, target, norm) == pytest.approx(cached.oracle.value(space.candidate(params).spec), abs=1e-9)
    c = mod.ceilings(g, target, norm)
    ladder = [c["shared"]] + [c[f"top{k}"] for k in (1, 2, 3, 5, 8, 12)]
    assert ladder == sorted(ladder) and ladder[-1] < 1.0
    better = 0
    for seed in range(5):  # the learner's best-so-far never falls; it passes the shared-alpha ceiling on most seeds
        curve = mod.learner_curve(g, target, norm, trials=30, noise=0.0, rng=np.random.default_rng(seed))
        assert curve == sorted(curve)
        better += curve[-1] > max(curve[3], c["shared"])
    assert better >= 4, better
    out = tmp_path / "bound.json"
    assert mod.main(["--seed", "0", "--models", "4", "--trials", "8", "--repeats", "1", "--workdir", str(bench_dir),
                     "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["per_seed"][0]["seed"] == 0 and len(res["per_seed"][0]["learner_curve"]) == 8
    assert mod.main(["--seed", "x", "--json", str(out)]) == 2


def test_staged_and_surrogate_handle_a_categorical_parameter():
    """A categorical parameter (a merge-method choice) used to crash both samplers (every value was cast to float).
    The staged plan now sweeps its choices like a bit; the surrogate, which has no weight-space map for it, falls back
    to that plan. Noiseless toy, 5 seeds each: at least 4 find the best choice and every bit (measured: 5 of 5)."""
    from astolfo_opt.search.surrogate import SurrogateSampler

    def f(trial: optuna.Trial) -> float:
        m = trial.suggest_categorical("method.unet", ["weighted_average", "ties", "dare_ties"])
        bits = [trial.suggest_int(f"inc.unet.m{i}", 0, 1) for i in range(3)]
        a = trial.suggest_float("alpha.unet.IN00", 0.0, 1.0)
        return float(m == "ties") + sum(bits) - (a - 0.3) ** 2

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    for make in (StagedSampler, SurrogateSampler):
        found = 0
        for seed in range(5):
            study = optuna.create_study(direction="maximize", sampler=make(seed=seed))
            study.optimize(f, n_trials=30)
            assert study.trials[0].params["method.unet"] == "weighted_average"  # the first choice is the start point
            bp = study.best_params
            found += bp["method.unet"] == "ties" and all(bp[f"inc.unet.m{i}"] == 1 for i in range(3))
        assert found >= 4, (make.__name__, found)


def test_search_suite_runs_cells_and_decides_by_the_worst_case(tmp_path, bench_dir, experiment):
    """experiments/search_suite.py: missing cells run as subprocesses, an existing cell is not run again, and the
    summary's worst-case rule is computed from the cells' own figures."""
    suite = experiment("search_suite")
    out = tmp_path / "cells"
    argv = ["--cells", "original:4,quadratic:4", "--trials", "6", "--strategies", "surrogate,random", "--jobs", "2",
            "--out", str(out), "--workdir", str(bench_dir / "suite")]
    assert suite.main(argv) == 0
    assert sorted(p.name for p in out.glob("*.json")) == ["original_n4.json", "quadratic_n4.json"]
    summary = json.loads((tmp_path / "search_suite.json").read_text())
    cells = {c["mismatch"]: json.loads((out / f"{c['mismatch']}_n4.json").read_text())["strategies"] for c in summary["cells"]}
    regret = {s: max(max(c[x]["incumbent_true_at_budget"] for x in c) - c[s]["incumbent_true_at_budget"] for c in cells.values())
              for s in ("surrogate", "random")}
    d = summary["decision"]
    assert {s: w["regret"] for s, w in d["worst_regret"].items()} == pytest.approx(regret, abs=1e-4)
    assert d["winner"] == min(regret, key=lambda s: (round(regret[s], 4), s != "surrogate")) and d["cells"] == 2
    assert all(c["seeds"] == [100, 101, 102, 103, 104] and c["trials"] == 6 for c in summary["cells"])
    mtime = (out / "original_n4.json").stat().st_mtime
    assert suite.main(argv[:1] + ["original:4"] + argv[2:]) == 0
    assert (out / "original_n4.json").stat().st_mtime == mtime  # an existing cell is not run again

    # --rerun NAME: that strategy alone runs again on every cell; its entries are replaced, the others' kept as they were
    before = {m: json.loads((out / f"{m}_n4.json").read_text()) for m in ("original", "quadratic")}
    assert suite.main([*argv, "--rerun", "random"]) == 0
    for m, old in before.items():
        new = json.loads((out / f"{m}_n4.json").read_text())
        assert new["strategies"]["surrogate"] == old["strategies"]["surrogate"]
        assert [r["strategies"]["surrogate"] for r in new["per_seed"]] == [r["strategies"]["surrogate"] for r in old["per_seed"]]
        rerun = json.loads((out / "rerun_random" / f"{m}_n4.json").read_text())
        assert new["strategies"]["random"] == rerun["strategies"]["random"] and "random" in new["reruns"]


def test_world_cells_enter_the_rule_as_the_gap_share(tmp_path, experiment):
    """A world-mode JSON beside the cell folder is a cell of the rule: per run the share of the uniform -> best-known
    gap its incumbent closed (0: the uniform average, 1: the best known), median over seeds; and the world targets."""
    suite = experiment("search_suite")
    out = tmp_path / "cells"
    out.mkdir()
    cell = {"mismatch": "original", "models": 12, "seeds": [100], "trials": 60, "noise": 0.02, "strategies": {
        s: {"incumbent_true_at_budget": v, "best_at_budget": v, "trials_to_95": None, "best_at_budget_min": v,
            "best_at_budget_max": v} for s, v in (("surrogate", 0.9), ("random", 0.7))}}
    (out / "original_n12.json").write_text(json.dumps(cell))
    runs = {"surrogate": [(100, 1.0), (101, 1.4)], "random": [(100, 2.0), (101, 1.8)]}
    world = {"mode": "world", "models": 12, "seeds": [100, 101], "trials": 60, "world_seed": 100,
             "uniform_objective": {"100": 1.0, "101": 1.0}, "best_known": {"100": 2.0, "101": 2.0},
             "strategies": {s: {"best_at_budget": max(v for _, v in r), "judge_accuracy": 0.5,
                                "renders_to_95": 12 if s == "surrogate" else 48,
                                "per_run": [{"seed": seed, "incumbent_objective": v} for seed, v in r]}
                            for s, r in runs.items()}}
    (tmp_path / "bench_world_search_n12.json").write_text(json.dumps(world))
    summary = suite.write_report(out)
    w = summary["world_cells"][0]["strategies"]
    assert w["surrogate"]["incumbent_true_at_budget"] == pytest.approx(0.2)  # median of 0.0 and 0.4
    assert w["random"]["incumbent_true_at_budget"] == pytest.approx(0.9)  # median of 1.0 and 0.8
    d = summary["decision"]
    assert d["cells"] == 2 and d["worst_regret"]["surrogate"] == {"regret": pytest.approx(0.7), "cell": "world N=12"}
    assert d["worst_regret"]["random"]["regret"] == pytest.approx(0.2) and d["winner"] == "random"
    t = summary["targets"]
    assert t["world_n12: default median objective >= every other strategy's"]["met"] is False
    assert t["world_n12: default renders to 95% <= 1/3 of random's"] == {"default": 12, "random": 48, "met": True}
    assert not any(k.startswith("world_n12: default >= tpe") for k in t)


def test_bench_search_readme_is_generated_from_the_committed_json(experiment, tmp_path):
    """Every table of experiments/README_bench_search.md comes from experiments/results (no hand-typed figure goes
    stale): the committed README equals its regeneration, and a changed figure is caught."""
    report = experiment("search_report")
    assert report.main(["--check"]) == 0
    text = report.README.read_text()
    assert {m.group("name") for m in report.BLOCK.finditer(text)} == set(report.BLOCKS)
    stale = tmp_path / "R.md"
    body = next(m.group("body") for m in report.BLOCK.finditer(text) if m.group("name") == "tuning")
    assert "| **surrogate** (default) |" in body
    stale.write_text(text.replace(body, body.replace("| **surrogate** (default) |", "| **surrogate** (default) | 9.999", 1), 1))
    assert report.main(["--check", "--readme", str(stale)]) == 1
    assert report.main(["--readme", str(stale)]) == 0 and stale.read_text() == text


@pytest.mark.slow
def test_world_mode_runs_strategies_through_the_real_pipeline(tmp_path, capsys, experiment):
    """``bench_search.py --world``: each strategy is a real study (merge -> swap -> render -> score) on a built world;
    renders are counted per trial, the incumbent is judged again on study + held-out prompts, the JSON keeps the
    search-benchmark keys."""
    from astolfo_opt.world.build import BuildParams, build_world

    world = tmp_path / "world"
    build_world(world, BuildParams(size="test", seed=3), progress=False, log=lambda s: None)
    bench = experiment("bench_search")
    out, png = tmp_path / "w.json", tmp_path / "w.png"
    rc = bench.main(["--world", str(world), "--models", "3", "--trials", "3", "--seed", "0", "--strategies", "random,greedy",
                     "--workdir", str(tmp_path / "runs"), "--json", str(out), "--png", str(png)])
    assert rc == 0
    res = json.loads(out.read_text())
    assert res["mode"] == "world" and res["default"] == "surrogate" and res["trials"] == 3
    assert res["pool"][0] == "base" and len(res["pool"]) == 4 and not any("nan" in m for m in res["pool"])
    from astolfo_opt.render.prompts import load_prompt_set

    n_prompts = len(load_prompt_set(world / "prompts.yaml").prompts)
    for name, s in res["strategies"].items():
        assert {"best_at_budget", "curve", "trials_to_95", "judge_accuracy", "renders_to_95"} <= set(s), name
        assert len(s["curve"]) == 3 and all(b >= a for a, b in zip(s["curve"], s["curve"][1:], strict=False)), name
        assert 0 < s["renders"] <= 3 * n_prompts and s["renders"] % n_prompts == 0, name
        assert 0.0 <= s["judge_accuracy"] <= 1.0 and 0.0 <= s["judge_heldout"] <= 1.0
        assert s["time_split"]["render"] > 0 and s["time_split"]["merge"] > 0
    assert res["best_known"]["0"] == pytest.approx(max(s["best_at_budget"] for s in res["strategies"].values()))
    assert res["uniform_objective"]["0"] == pytest.approx(res["strategies"]["random"]["curve"][0], abs=1e-5)  # trial 0: the average
    # a finished (strategy, seed) run is kept: the same sweep again reuses it instead of running the study again
    kept = tmp_path / "runs" / "random_n3_s0_t3.json"
    mtime = kept.stat().st_mtime
    assert bench.main(["--world", str(world), "--models", "3", "--trials", "3", "--seed", "0", "--strategies", "random",
                       "--workdir", str(tmp_path / "runs"), "--json", str(tmp_path / "again.json")]) == 0
    assert kept.stat().st_mtime == mtime
    again = json.loads((tmp_path / "again.json").read_text())["strategies"]["random"]
    assert again["curve"] == res["strategies"]["random"]["curve"]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert bench.main(["--world", str(world), "--models", "40", "--trials", "3", "--strategies", "random",
                       "--json", str(tmp_path / "x.json")]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error:") and "--models 40" in err and "world build" in err


def test_saving_at_equal_best_counts_the_cost_until_the_unpruned_final_best(experiment):
    bench = experiment("bench_search")
    base_curve, base_cum = [0.5, 0.8, 0.9, 0.9], [12, 24, 36, 48]  # the unpruned run first has its 0.9 after 36 renders
    # the pruned run gets there after 16 renders (its bad trials stopped after one 4-prompt batch)
    saved, hit = bench.saving_at_equal_best(base_curve, base_cum, [0.5, 0.7, 0.9, 0.95], [12, 16, 28, 40], 40)
    assert hit and saved == pytest.approx(1 - 28 / 36)
    saved, hit = bench.saving_at_equal_best(base_curve, base_cum, [0.5, 0.6], [12, 16], 16)  # never reaches 0.9
    assert not hit and saved == pytest.approx(1 - 16 / 36)
    saved, hit = bench.saving_at_equal_best(base_curve, base_cum, [0.5, 0.6, 0.89], [12, 24, 60], 60)
    assert not hit and saved < 0  # spent more than the unpruned run and still short: a negative saving


@pytest.mark.slow
def test_world_pruning_mode_compares_pruners_by_renders(tmp_path, capsys, demo_world, experiment):
    """``--world DIR --mode pruning``: the default strategy without a pruner (the shipped one-batch render, the same
    kept run as the search mode's) and with one (``--prune-batch`` prompts per report, twice the trials); a pruned
    trial counts the prompts it rendered; the saving is measured at the unpruned run's final best."""
    from astolfo_opt.render.prompts import load_prompt_set

    bench = experiment("bench_search")
    n_prompts = len(load_prompt_set(demo_world / "prompts.yaml").prompts)
    work, out, png = tmp_path / "runs", tmp_path / "p.json", tmp_path / "p.png"
    rc = bench.main(["--world", str(demo_world), "--mode", "pruning", "--pruners", "none,incumbent", "--pruning-strategy",
                     "random", "--models", "3", "--trials", "6", "--seed", "0", "--prune-batch", "4", "--workdir", str(work),
                     "--json", str(out), "--png", str(png)])
    assert rc == 0
    res = json.loads(out.read_text())
    assert res["mode"] == "pruning" and res["strategy"] == "random" and res["prompts"] == n_prompts
    none, inc = res["pruners"]["none"], res["pruners"]["incumbent"]
    assert none["batch"] == n_prompts and inc["batch"] == 4
    assert (work / "random_n3_s0_t6.json").is_file() and (work / "random_incumbent_b4_n3_s0_t12.json").is_file()
    assert none["trials"] == 6 and inc["trials"] == 12 and none["pruned_trials"] == 0
    r = inc["per_run"][0]
    assert r["pruned"] >= 1  # random proposes outlier merges the incumbent pruner stops after a batch or two
    assert r["renders"] % 4 == 0 and r["renders"] < r["trials_run"] * n_prompts  # pruned trials rendered part of the set
    assert none["per_run"][0]["renders"] <= 6 * n_prompts and none["saving_at_equal_best"] == 0.0
    kept = json.loads((work / "random_incumbent_b4_n3_s0_t12.json").read_text())
    goal = json.loads((work / "random_n3_s0_t6.json").read_text())["curve"][-1]
    if r["reached_unpruned_best"]:  # the saving is the renders it needed to first reach the unpruned best
        first = next(c for v, c in zip(kept["curve"], kept["cum_renders"], strict=True) if v >= goal - 1e-12)
        need = json.loads((work / "random_n3_s0_t6.json").read_text())
        i = next(j for j, v in enumerate(need["curve"]) if v >= goal - 1e-12)
        assert r["saving_at_equal_best"] == pytest.approx(1 - first / need["cum_renders"][i], abs=1e-4)
    spent = json.loads((work / "random_n3_s0_t6.json").read_text())["cum_renders"][-1]  # the unpruned run's renders
    assert r["best_at_equal_renders"] == max(v for v, c in zip(kept["curve"], kept["cum_renders"], strict=True) if c <= spent)
    assert len(inc["by_renders"]) == len(res["render_grid"]) and res["render_grid"][0] == n_prompts
    assert all(b >= a for a, b in zip(inc["by_renders"], inc["by_renders"][1:], strict=False))
    assert 0.0 <= r["judge_accuracy"] <= 1.0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert bench.main(["--world", str(demo_world), "--mode", "pruning", "--pruners", "none,incumbent", "--prune-batch",
                       str(n_prompts), "--models", "3", "--json", str(tmp_path / "x.json")]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error:") and "--prune-batch" in err


def test_sampler_set_changes_options_and_is_refused_on_reporting_seeds(tmp_path, capsys, bench_dir, experiment):
    bench = experiment("bench_search")
    assert bench.parse_sampler_set("surrogate.n_startup=36;tpe.n_startup_trials=5") == {
        "surrogate": {"n_startup": 36}, "tpe": {"n_startup_trials": 5}}
    out = tmp_path / "s.json"
    assert bench.main(["--seed", "0", "--models", "4", "--trials", "5", "--strategies", "surrogate", "--sampler-set",
                       "surrogate.n_startup=3", "--workdir", str(bench_dir), "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["sampler_set"] == {"surrogate": {"n_startup": 3}}
    assert bench._sampler("surrogate", 0).n_startup == 3  # the option reaches the sampler
    capsys.readouterr()
    for bad in (["--sampler-set", "n_startup=3"], ["--sampler-set", "surrogate.n_startup=3", "--seed", "reporting"]):
        assert bench.main([*bad, "--json", str(tmp_path / "x.json")]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error:") and "sampler-set" in err and err.count("\n") == 1, err
