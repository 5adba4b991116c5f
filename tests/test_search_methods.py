"""``space.methods``: a categorical merge method per component with conditional parameters, handled by every sampler.

The objective here is synthetic (a number computed from the recipe a trial would merge), so every sampler runs 30
trials in a second; what is tested is the machinery: the space's recipes validate, every sampler proposes each
method and its parameters, and the weight-space surrogate keeps to linear methods and says when it hands over.
"""

from __future__ import annotations

import collections
import json
import logging

import optuna
import pytest

from astolfo_opt.errors import ConfigError
from astolfo_opt.merge.recipe import Recipe
from astolfo_opt.search.pool import resolve_pool
from astolfo_opt.search.space import SearchSpace, active_point
from astolfo_opt.search.study import make_sampler
from astolfo_opt.testing.factory import make_pool
from benchkit.oracle import load_conf

METHODS = ["weighted_average", "ties", "dare_ties"]


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    d = tmp_path_factory.mktemp("methods_pool")
    make_pool(d, n=4)
    return resolve_pool({"folder": str(d), "base": "base"}, cache_file=d / "facts.json")


def _space(pool, **cfg):
    return SearchSpace(pool, {"kind": "inclusion_mbw", "methods": METHODS, "mbw": {"components": ["unet"]}, **cfg})


def test_methods_add_a_choice_and_conditional_parameters(pool):
    sp = _space(pool)
    assert "method.unet" in sp.names and "param.unet.ties.density" in sp.names and "param.te0.dare_ties.drop_rate" in sp.names
    assert not any(n.endswith(".seed") for n in sp.names)  # not searchable: method_seed
    assert sp.distributions()["method.unet"].choices == tuple(METHODS)
    start = sp.warm_starts()[0]
    assert start["method.unet"] == "weighted_average" and not any(n.startswith("param.") for n in start)
    p = {**start, "method.unet": "dare_ties", "param.unet.dare_ties.density": 0.4, "param.unet.dare_ties.lambda": 0.7,
         "param.unet.dare_ties.drop_rate": 0.5}
    cand = sp.candidate(p)
    unet = cand.spec["components"]["unet"]
    assert unet["method"] == "dare_ties" and unet["anchor"] == "base"
    assert unet["params"] == {"density": 0.4, "lambda": 0.7, "drop_rate": 0.5, "seed": 0.0}
    assert set(unet["alpha"]) and all(m["weight"] == 1.0 for m in unet["members"])  # α_b scales λ per block
    Recipe.from_dict(cand.spec).validate()
    with pytest.raises(ConfigError, match="missing"):
        sp.candidate({**start, "method.unet": "ties"})  # the chosen method's parameters are required
    assert active_point({**p, "param.unet.ties.density": 0.2}) == p  # another method's parameter is not part of the point


@pytest.mark.parametrize("cfg, needle", [
    ({"methods": ["weighted_sum"]}, "takes exactly 2 members"),
    ({"methods": ["tie"]}, "space.methods entry='tie' is not one of"),
    ({"methods": ["ties", "ties"]}, "lists a method twice"),
    ({"method_params": {"ties": {"density": [0.5, 2.0]}}}, r"density=\[0.5, 2\] must lie within \[0, 1\]"),
])
def test_bad_methods_config_is_one_line(pool, cfg, needle):
    with pytest.raises(ConfigError, match=needle):
        _space(pool, **cfg)


def test_a_delta_method_needs_the_base(pool):
    from pathlib import Path

    no_base = resolve_pool({"folder": str(Path(pool.model("base").path).parent)})
    with pytest.raises(ConfigError, match="ties takes deltas from the base model: set pool.base"):
        SearchSpace(no_base, {"kind": "inclusion", "methods": ["weighted_average", "ties"]})


def _objective(sp, favour: str):
    """Higher for the favoured method, for a TIES density near 0.5, and for more members; records the recipe."""
    def f(trial):
        cand = sp.suggest(trial)
        Recipe.from_dict(cand.spec).validate()
        trial.set_user_attr("recipe", json.dumps(cand.spec, sort_keys=True))
        v = 0.0
        for e in cand.spec["components"].values():
            v += (0.3 if e["method"] == favour else 0.0) + 0.05 * len(e["members"])
            if e["method"] == "ties":
                v -= 0.2 * abs(e["params"]["density"] - 0.5)
        return v
    return f


def _run(sp, sampler: str, favour: str, n: int = 30, seed: int = 0):
    st = optuna.create_study(direction="maximize", sampler=make_sampler(load_conf("sampler", sampler), seed, multi=False,
                                                                         constraints=False))
    for w in sp.warm_starts():
        st.enqueue_trial(w)
    st.optimize(_objective(sp, favour), n_trials=n)
    return st


@pytest.mark.parametrize("sampler", ["surrogate", "staged", "tpe", "cmaes", "gp", "random", "qmc"])
def test_every_sampler_searches_methods(pool, sampler):
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    sp = _space(pool)
    st = _run(sp, sampler, favour="ties")
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in st.trials)
    tried = collections.Counter(t.params["method.unet"] for t in st.trials)
    assert len(tried) == 3, tried
    densities = {round(t.params["param.unet.ties.density"], 3) for t in st.trials if "param.unet.ties.density" in t.params}
    assert densities, "no trial set TIES' density"
    assert all(set(active_point(t.params)) == set(t.params) for t in st.trials)  # trials record only their own parameters


def test_surrogate_keeps_to_linear_methods_and_says_when_it_hands_over(pool, caplog):
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    sp = _space(pool)
    st = _run(sp, "surrogate", favour="weighted_average", n=32)
    late = [t for t in st.trials[20:]]
    kinds = collections.Counter(t.user_attrs.get("proposal") for t in late)
    assert kinds["exploit"] + kinds["explore"] >= 6, kinds  # the weight-space model proposes ...
    modelled = [t for t in late if t.user_attrs.get("proposal") in ("exploit", "explore")]
    assert all(t.params["method.unet"] == "weighted_average" for t in modelled)  # ... with the incumbent's linear method
    with caplog.at_level(logging.WARNING, logger="astolfo_opt"):
        st2 = _run(sp, "surrogate", favour="ties", n=24)
    handed = [t for t in st2.trials if "not linear" in str(t.user_attrs.get("sampler_fallback", ""))]
    assert handed and all(t.user_attrs["proposal"] == "staged" for t in handed)
    assert any("covers linear methods only" in r.getMessage() for r in caplog.records)


def test_uniform_point_of_a_space_without_weighted_average_is_complete(pool):
    """The uniform start (also what the oracle normalises by) carries its first method's parameters at their defaults."""
    sp = _space(pool, methods=["ties", "dare"])
    uni = sp.uniform_params()
    assert uni["method.unet"] == "ties" and uni["param.unet.ties.density"] == 0.2 and uni["param.unet.ties.lambda"] == 1.0
    Recipe.from_dict(sp.candidate(uni).spec).validate()
    assert sp.warm_starts() == [uni]  # the base alone needs weighted_average
