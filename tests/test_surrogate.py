"""Weight-space surrogate sampler (issue 8): the Gram distance is the distance of real merges, the projector inverts the
params -> merge map, the sampler plugs into an Optuna study, beats random on a tiny oracle problem, is deterministic
and stateless, and falls back to the staged plan where it cannot map the space."""

from __future__ import annotations

import json
import logging
import random
from pathlib import Path

import numpy as np
import optuna
import pytest

from astolfo_opt.errors import ConfigError
from astolfo_opt.search.surrogate import (
    ParamMap,
    Projector,
    RadialSurrogate,
    SurrogateSampler,
    Unsupported,
    WeightSpace,
    weight_space_from_files,
)
from astolfo_opt.search.surrogate.sampler import _finished
from astolfo_opt.testing.factory import make_pool
from benchkit.oracle import (
    CachedOracle,
    GramOracle,
    NoisyOracleEvaluator,
    ReferenceOracle,
    draw_target,
    make_bench_pool,
    space_from_bench_pool,
)

NO_BASE_BITS = {"kind": "inclusion_mbw", "components": ["unet", "te0", "te1"], "min_models": 1, "include_base": False,
                "mbw": {"components": ["unet"], "range": [0.0, 1.0]}}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A 4-model bench pool (one far-off model), its ``inclusion_mbw`` space, a target and the exact oracle."""
    pool, outliers = make_bench_pool(tmp_path_factory.mktemp("surrogate") / "pool", 4, seed=0)
    space = space_from_bench_pool(pool)
    target = space.candidate(draw_target(space, 0, outliers))
    return pool, space, target, GramOracle(space, target.spec)


def _ws(space) -> WeightSpace:
    pool = space.pool
    return weight_space_from_files(pool.paths, pool.base, space.components, space.time_embed_block)


def _random_params(space, rng: random.Random) -> dict:
    out = {}
    for n in space.names:
        out[n] = rng.randint(0, 1) if n.startswith("inc.") else round(rng.uniform(0.05, 1.0), 6)
    for comp in space.components:  # at least one member per component, so the space never repairs the recipe
        bits = [n for n in out if n.startswith(f"inc.{comp}.")]
        if bits and not any(out[b] for b in bits):
            out[bits[0]] = 1
    return out


def test_gram_distance_equals_torch_merge_distance(tiny):
    _, space, target, _ = tiny
    ws = _ws(space)
    assert ws.names == [n for n in space.pool.names if n != "base"] and ws.ref == "base"
    assert len(ws.blocks) == 26 and ws.gram.shape == (26, 4, 4)  # 25 UNet blocks + the text encoder
    assert weight_space_from_files(space.pool.paths, "base", space.components, space.time_embed_block) is ws  # cached
    ref = ReferenceOracle(space, target.spec)  # a plain fp32 torch merge of every tensor
    rng = random.Random(3)
    for _ in range(4):
        s1, s2 = (space.candidate(_random_params(space, rng)).spec for _ in range(2))
        m1, m2 = ref.merge(s1), ref.merge(s2)
        direct = sum(float((m1[k].double() - m2[k].double()).pow(2).sum()) for k in m1)
        assert direct > 0
        assert ws.dist2(ws.coords(s1), ws.coords(s2)) == pytest.approx(direct, rel=1e-4)


def test_weight_space_leaves_out_a_non_finite_member(tmp_path, caplog):
    """A pool member with NaN in one UNet tensor: the pass warns and keeps it out of the geometry (zero rows), while
    the healthy members' block Grams are the ones a pool without it gives."""
    key = "model.diffusion_model.input_blocks.1.0.in_layers.2.weight"
    pool = make_pool(tmp_path / "p", n=3, seed=11, overrides={1: {"corrupt": {key: "nan"}}})
    clean = make_pool(tmp_path / "q", n=3, seed=11)
    paths = {p.stem: str(p) for p in [pool.base, *pool.models]}
    with caplog.at_level(logging.WARNING):
        ws = weight_space_from_files(paths, "base", ["unet", "te0"], None, cache=False)
    assert any("m01" in r.getMessage() and key in r.getMessage() for r in caplog.records)
    assert np.isfinite(ws.gram).all()
    assert ws.names == ["m00", "m01", "m02"]
    i = ws.names.index("m01")
    unet = [j for j, (c, _) in enumerate(ws.blocks) if c == "unet"]
    assert not ws.gram[unet][:, i, :].any()  # left out of every UNet block, even those read before the NaN
    ref = weight_space_from_files({p.stem: str(p) for p in [clean.base, *clean.models]}, "base", ["unet", "te0"], None, cache=False)
    keep = [0, 2]
    np.testing.assert_allclose(ws.gram[:, keep][:, :, keep], ref.gram[:, keep][:, :, keep], rtol=1e-9)


def test_projector_returns_the_recipe_whose_merge_is_the_centre(tiny):
    pool, _, _, _ = tiny
    space = space_from_bench_pool(pool, NO_BASE_BITS)  # no base bit: every merge has exactly one recipe
    ws = _ws(space)
    dists = space.distributions()
    pm = ParamMap(ws, dists, space.candidate(space.uniform_params()).spec)
    proj = Projector(pm)
    rng = random.Random(5)
    for _ in range(5):
        p = _random_params(space, rng)
        u = ws.coords(space.candidate(p).spec)
        assert np.allclose(pm.coords(p), u)  # the map mirrors SearchSpace.candidate
        q, d2 = proj.project(u)
        assert d2 == pytest.approx(0.0, abs=1e-9 * float(np.trace(ws.gram.sum(0))))
        assert {n: q[n] for n in p if n.startswith("inc.")} == {n: p[n] for n in p if n.startswith("inc.")}
        for n in (n for n in p if n.startswith("alpha.")):
            assert q[n] == pytest.approx(p[n], abs=1e-6), n
    # a centre outside the family: the nearest recipe beats every other recipe tried
    uc = 0.5 * ws.coords(space.candidate(_random_params(space, rng)).spec) + 0.5 * ws.coords(
        space.candidate(_random_params(space, rng)).spec)
    q, d2 = proj.project(uc)
    assert ws.dist2(pm.coords(q), uc) == pytest.approx(d2, rel=1e-6, abs=1e-12)
    assert all(d2 <= ws.dist2(ws.coords(space.candidate(_random_params(space, rng)).spec), uc) + 1e-12 for _ in range(50))


def _run(space, oracle, sampler, trials: int, seed: int) -> tuple[optuna.Study, list[float]]:
    """A study through the real objective (warm starts, recipe attributes); best true s after each trial."""
    from astolfo_opt.search.objective import TrialObjective
    from astolfo_opt.search.study import enqueue_warm_starts, run_trials

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    study = optuna.create_study(storage=optuna.storages.InMemoryStorage(), direction="maximize", sampler=sampler)
    ev = NoisyOracleEvaluator(oracle, noise=0.02, seed=seed)
    enqueue_warm_starts(study, space.warm_starts(), trials)
    run_trials(study, TrialObjective(space, ev, pruning=False, artifacts=None, n_trials=trials, reuse_duplicates=True), trials)
    best, curve = -np.inf, []
    for t in sorted(study.trials, key=lambda t: t.number):
        best = max(best, oracle.value(json.loads(t.user_attrs["recipe"])))
        curve.append(best)
    return study, curve


#: seeds of the search-quality test (none of them was used to choose the sampler's settings: those were scanned on
#: experiments/bench_search.py's pools), and what it asks of them
QUALITY_SEEDS = (0, 1, 2, 3, 4, 5)


def test_surrogate_sampler_beats_random_on_a_tiny_oracle(tiny):
    """Same pool, target, noise (σ = 0.02) and warm starts over 6 seeds. The surrogate proposes from trial 7 on and in
    24 trials gets closer to the target than random search does in twice as many. Judged by the median and a count,
    never by one seed's trajectory (measured: median 0.943, 5 of 6 seeds >= 0.9; random's median 0.87): the median
    must reach 0.9 and beat random's by 0.02, and at least 4 of the 6 seeds must reach 0.9."""
    _, space, _, gram = tiny
    oracle = CachedOracle(gram)
    finals, rnds = [], []
    for seed in QUALITY_SEEDS:
        smp = SurrogateSampler(seed=seed, n_startup=6)
        study, curve = _run(space, oracle, smp, 24, seed)
        _, rnd = _run(space, oracle, optuna.samplers.RandomSampler(seed=seed), 48, seed)
        finals.append(curve[-1])
        rnds.append(rnd[-1])
        # every sampled trial names its kind (dashboard, pruner=incumbent spare_exploit); enqueued warm starts do not
        kinds = [t.user_attrs.get("proposal") for t in sorted(study.trials, key=lambda t: t.number)]
        warm = sum(bool(t.user_attrs.get("warm_start")) for t in study.trials)
        assert kinds[:warm] == [None] * warm and "staged" in kinds[warm:6]
        assert {"exploit", "explore"} <= set(kinds[6:]) and None not in kinds[warm:]
    med, med_rnd = float(np.median(finals)), float(np.median(rnds))
    assert med >= 0.9 and med > med_rnd + 0.02, (finals, rnds)
    assert sum(f >= 0.9 for f in finals) >= 4, finals


def test_surrogate_is_deterministic_and_stateless(tiny):
    _, space, _, gram = tiny
    oracle = CachedOracle(gram)
    a, _ = _run(space, oracle, SurrogateSampler(seed=4, n_startup=4), 10, 4)
    b, _ = _run(space, oracle, SurrogateSampler(seed=4, n_startup=4), 10, 4)
    assert [t.params for t in a.trials] == [t.params for t in b.trials]
    # a fresh sampler (a resumed study, another worker) proposes what the first one would have
    dists = a.trials[-1].distributions
    first, fresh = a.sampler.propose(a, dists), SurrogateSampler(seed=4, n_startup=4).propose(a, dists)  # type: ignore[attr-defined]
    assert first == fresh and a.sampler.last_fallback is None  # type: ignore[attr-defined]


def test_unsupported_spaces_fall_back_to_staged(tiny):
    pool, space, _, _ = tiny
    ws = _ws(space)
    with pytest.raises(Unsupported, match="w.unet"):
        ParamMap(ws, {"w.unet.m00": optuna.distributions.FloatDistribution(0.1, 1.0)}, {"components": {}})
    # a study over another family (pairwise MBW): runs, every proposal from the staged plan
    pw = space_from_bench_pool(pool, {"kind": "pairwise_mbw", "components": ["unet", "te0"]})
    target = pw.candidate({n: 0.3 for n in pw.names})
    smp = SurrogateSampler(seed=0, n_startup=3)
    study, curve = _run(pw, CachedOracle(GramOracle(pw, target.spec)), smp, 8, 0)
    assert len(study.trials) == 8 and "pair." in (smp.last_fallback or "")
    # a plain Optuna objective (no recipe attributes, no pool): the staged plan still optimises it
    plain = SurrogateSampler(seed=0, n_startup=2)
    st = optuna.create_study(direction="maximize", sampler=plain)
    st.optimize(lambda t: -sum((t.suggest_int(f"inc.unet.m{i}", 0, 1) - i % 2) ** 2 for i in range(3))
                - (t.suggest_float("alpha.unet.IN00", 0.0, 1.0) - 0.4) ** 2, n_trials=12)
    assert "recipe" in (plain.last_fallback or "") and st.best_value > -1.0


def test_default_sampler_config_and_multi_objective_error():
    from hydra import compose, initialize_config_dir

    from astolfo_opt.search.app import section
    from astolfo_opt.search.study import make_sampler
    with initialize_config_dir(config_dir=str(Path(__file__).resolve().parents[1] / "conf"), version_base="1.3", job_name="defaults"):
        cfg = compose("config")
    assert section(cfg, "sampler")["name"] == "surrogate" and section(cfg, "pruner")["name"] == "none"
    assert isinstance(make_sampler(section(cfg, "sampler"), 0, multi=False, constraints=False), SurrogateSampler)
    with pytest.raises(ConfigError, match="nsga2") as e:
        make_sampler(section(cfg, "sampler"), 0, multi=True, constraints=False)
    assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="not an option of sampler=surrogate"):
        make_sampler({"name": "surrogate", "nope": 1}, 0, multi=False, constraints=False)


def test_search_app_runs_the_surrogate_on_the_pool_files(tmp_path, caplog):
    """``astolfo-opt search``'s code path: the sampler finds the pool through the study's attributes, reads the Gram
    matrices from the files (a shared-component group included), proposes from its fit, and a resumed study goes on."""
    import logging

    from astolfo_opt.search.app import run_search
    from astolfo_opt.testing.factory import ModelSpec, make_checkpoint, make_pool

    pool = make_pool(tmp_path / "pool", n=3)
    make_checkpoint(tmp_path / "pool" / "m03.safetensors", ModelSpec(seed=33, copy_components={"te0": pool.models[0]}))
    cfg = {"study_name": "sur", "run_dir": str(tmp_path / "run"), "n_trials": 10, "seed": 0, "progress": False, "artifacts": False,
           "pool": {"folder": str(tmp_path / "pool"), "base": "base"}, "space": {"kind": "inclusion_mbw"},
           "evaluator": {"kind": "benchkit.evaluators.synthetic", "n_steps": 2, "noise": 0.02},
           "sampler": {"name": "surrogate", "n_startup": 4},
           "pruner": {"name": "incumbent"}, "storage": {"kind": "rdb"}, "strategy": {"name": "optuna"}}
    with caplog.at_level(logging.INFO, logger="astolfo_opt.search"):
        res = run_search(cfg)
        assert sum(res.states.get(s, 0) for s in ("COMPLETE", "PRUNED")) == 10
        again = run_search({**cfg, "n_trials": 13})
    assert sum(again.states.get(s, 0) for s in ("COMPLETE", "PRUNED")) == 13
    assert "weight-space surrogate: block Gram matrices" in caplog.text  # read from the files once
    assert "staged plan proposes instead" not in caplog.text  # after the startup every proposal came from the fit


def test_thompson_draws_are_continuous_in_the_data(tiny):
    """The same study must give the same proposals on every machine. Rounding differs between CPUs (BLAS kernels),
    so a draw has to be a continuous function of the fit: with an eigendecomposition of the posterior the sign and
    basis of near-repeated eigenvalues flip under a 1e-12 change (this flipped seed 1 of the test above between CPUs,
    0.94 vs 0.813); the Cholesky factor of the precision does not."""
    _, space, _, gram = tiny
    smp = SurrogateSampler(seed=1, n_startup=6)
    study, _ = _run(space, CachedOracle(gram), smp, 12, 1)
    dists = study.trials[-1].distributions
    done, _ = _finished(study, dists, 1.0)
    pm, _ = smp._map(study, dists, done)
    U, y, wts, best = smp._data(pm, done)
    draws = []
    for eps in (0.0, 1e-12):
        sur = RadialSurrogate(pm, s_w=smp.prior_sd_weight, tau=smp.prior_sd_alpha, mu_sd=smp.prior_sd_shared_alpha)
        sur.fit(U, y + eps * np.arange(len(y)), weights=wts, starts=[sur.x_from_params(best), sur.prior_mean()])
        draws.append([sur.sample(np.random.default_rng(k), 1.0) for k in range(8)])
    spread = float(np.abs(np.asarray(draws[0]) - np.asarray(draws[1])).max())
    assert spread < 1e-5, spread
    assert float(np.abs(draws[0][0] - draws[0][1]).max()) > 1e-3  # the draws do spread: the check is not vacuous


class _Spike:
    """The cone oracle, except that one recipe (the base alone) scores far above anything the cone gives - no centre
    explains it and its neighbours at once, which is what the trained world does (a merge with an outlier in it scores
    far below what its weight-space distance says)."""

    def __init__(self, oracle, spike: dict):
        from astolfo_opt.search.space import spec_hash

        self.oracle, self.hash, self.spike = oracle, spec_hash, spec_hash(spike)

    def value(self, spec) -> float:
        return 3.0 if self.hash(spec) == self.spike else self.oracle.value(spec)


def test_misfit_hands_proposals_to_the_fallback_and_says_why(tiny, caplog):
    _, space, _, gram = tiny
    base_alone = space.candidate(space.warm_starts()[1]).spec
    assert set(base_alone["models"]) == {"base"}
    oracle = CachedOracle(_Spike(gram, base_alone))
    smp = SurrogateSampler(seed=0, n_startup=6)
    with caplog.at_level(logging.WARNING, logger="astolfo_opt.search"):
        study, _ = _run(space, oracle, smp, 14, 0)
    late = sorted(study.trials, key=lambda t: t.number)[6:]
    misfit = [t for t in late if "does not explain the best trial" in t.user_attrs.get("sampler_fallback", "")]
    # the GP proposes (kind misfit), or the staged plan where the GP repeated a known recipe
    assert len(misfit) >= len(late) - 1, [t.user_attrs.get("proposal") for t in late]
    assert {t.user_attrs["proposal"] for t in misfit} <= {"misfit", "staged"} and any(
        t.user_attrs["proposal"] == "misfit" for t in misfit)
    assert sum("sampler=gp proposes" in r.message for r in caplog.records) == 1  # one WARNING, not one per trial
    # the hand-over is for good, and read from the trials: every later proposal follows it, naming the first trial
    first = min(t.number for t in misfit)
    assert all(t in misfit for t in late if t.number > first)
    assert all(t.user_attrs["sampler_fallback"].startswith(f"since trial {first}: ") for t in misfit if t.number > first)
    keys = [json.dumps(t.params, sort_keys=True) for t in late]
    assert len(set(keys)) == len(keys)  # a known recipe the fallback proposes again goes to the staged plan instead
    # misfit_sigmas=0 turns the check off: the surrogate keeps proposing on the same data
    off, _ = _run(space, oracle, SurrogateSampler(seed=0, n_startup=6, misfit_sigmas=0), 10, 0)
    assert {t.user_attrs.get("proposal") for t in off.trials[6:]} <= {"exploit", "explore"}
    with pytest.raises(ConfigError, match="misfit_fallback"):
        SurrogateSampler(misfit_fallback="cmaes")


def test_misfit_fallback_tpe_proposes_through_its_own_startup_and_model(tiny, caplog):
    """``misfit_fallback: tpe`` is driven as Optuna drives a sampler: its grouped search space inferred first, its
    independent (startup) draws where it has no relative point - new recipes, not the uniform start again."""
    _, space, _, gram = tiny
    oracle = CachedOracle(_Spike(gram, space.candidate(space.warm_starts()[1]).spec))
    with caplog.at_level(logging.WARNING, logger="astolfo_opt.search"):
        study, _ = _run(space, oracle, SurrogateSampler(seed=0, n_startup=6, misfit_fallback="tpe"), 18, 0)
    assert sum("sampler=tpe proposes" in r.message for r in caplog.records) == 1
    late = sorted(study.trials, key=lambda t: t.number)[7:]
    kinds = [t.user_attrs.get("proposal") for t in late]
    assert kinds.count("misfit") >= len(late) - 2, kinds  # before and after TPE's own 10-trial startup
    keys = [json.dumps(t.params, sort_keys=True) for t in study.trials]
    assert len(set(keys)) == len(keys)

