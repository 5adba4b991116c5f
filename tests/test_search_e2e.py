"""End to end with the real merge kernel (oracle evaluator) and the real pipeline + scorers: study -> export, and the
exported tensors are exactly the ones the trial scored."""

from __future__ import annotations

import json

import optuna
import pytest
from optuna.trial import TrialState

from astolfo_opt.errors import AstolfoError
from astolfo_opt.search.app import run_search
from astolfo_opt.search.study import open_storage_url
from astolfo_opt.testing.factory import ModelSpec, make_checkpoint, make_pool


@pytest.fixture(scope="module")
def pool_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("e2e_pool")
    p = make_pool(d, n=3)
    make_checkpoint(d / "m03.safetensors", ModelSpec(seed=33, copy_components={"te0": p.models[0]}))
    return d


def base_cfg(pool_dir, run_dir, **kw):
    cfg = {"study_name": "e2e", "run_dir": str(run_dir), "n_trials": 8, "seed": 0, "progress": False, "artifacts": True,
           "device": "cpu", "pool": {"folder": str(pool_dir), "base": "base"},
           "space": {"kind": "inclusion_mbw", "mbw": {"components": ["unet"]}}, "sampler": {"name": "tpe", "n_startup_trials": 4},
           "pruner": {"name": "none"}, "storage": {"kind": "rdb"}, "strategy": {"name": "optuna"}}
    cfg.update(kw)
    return cfg


def test_oracle_study_and_export(pool_dir, tmp_path):
    from safetensors import safe_open

    from astolfo_opt.search.export import export_trial

    target = {"inc.unet.m00": 0, "inc.te0.m01": 0, "alpha.unet.M00": 0.2, "alpha.unet.OUT05": 0.4}
    res = run_search(base_cfg(pool_dir, tmp_path, evaluator={"kind": "benchkit.evaluators.oracle", "target": target, "out_dtype": "fp32"}))
    study = optuna.load_study(study_name="e2e", storage=f"sqlite:///{tmp_path / 'study.db'}")
    trials = study.get_trials(states=(TrialState.COMPLETE,))
    assert len(trials) == 8
    assert trials[0].value == pytest.approx(0.0, abs=1e-5)  # the uniform warm start is the reference: s = 0
    assert all(t.value <= 1.0 + 1e-6 for t in trials) and res.best_values[0] >= trials[0].value
    # the hidden optimum scores 1 through the same evaluator (kernel merge into the distance sink)
    from astolfo_opt.search.evaluator import TrialContext
    from astolfo_opt.search.pool import resolve_pool
    from astolfo_opt.search.space import SearchSpace
    from benchkit.evaluators import OracleEvaluator

    space = SearchSpace(resolve_pool({"folder": str(pool_dir), "base": "base"}), {"kind": "inclusion_mbw"})
    best = space.candidate({**space.uniform_params(), **target})
    ev = OracleEvaluator(space, best, device="cpu")
    ctx = TrialContext()
    assert next(iter(ev.evaluate(best, ctx))).values[0] == pytest.approx(1.0, abs=1e-4)
    assert next(iter(ev.evaluate(space.candidate(space.uniform_params()), ctx))).values[0] == pytest.approx(0.0, abs=1e-4)
    # the second trial (base alone) read no new model for the MBW-only change? at least the merge ran incrementally
    assert all("merge" in t.user_attrs and t.user_attrs["tensor_hash"] for t in trials)
    exp = export_trial(open_storage_url(f"sqlite:///{tmp_path / 'study.db'}"), "e2e", tmp_path / "best.safetensors", device="cpu")
    assert exp.verified and exp.trial == study.best_trial.number
    with safe_open(str(tmp_path / "best.safetensors"), "pt") as f:
        meta = f.metadata()
    assert meta["astolfo_opt_study"] == "e2e" and json.loads(meta["astolfo_opt_params"]) == study.best_trial.params
    assert json.loads(meta["recipe"])["components"]["unet"]["anchor"] == "base" and meta["sd_merge_recipe"]


def test_pipeline_study_prunes_and_exports(pool_dir, tmp_path):
    from astolfo_opt.search.export import export_trial
    from scorers.testing import demo_objective_config

    scorer = demo_objective_config(tmp_path / "scorer", device="cpu")
    render = {"prompt_set": "tiny", "n_prompts": 4, "batch_size": 1, "heldout_prompt_set": "heldout", "heldout_n_prompts": 2,
              "steps": 2, "width": 64, "height": 64}
    cfg = base_cfg(pool_dir, tmp_path, n_trials=6, evaluator={"kind": "pipeline", "out_dtype": "fp16"}, scorer=scorer,
                   render=render, pruner={"name": "median", "n_startup_trials": 2})
    run_search(cfg)
    study = optuna.load_study(study_name="e2e", storage=f"sqlite:///{tmp_path / 'study.db'}")
    counted = study.get_trials(states=(TrialState.COMPLETE, TrialState.PRUNED))
    assert len(counted) == 6
    t = study.best_trial
    assert set(t.user_attrs["scores"]) == {"clip", "aesthetic"} and len(t.user_attrs["per_prompt"]) == 4
    assert t.user_attrs["time"]["render"] > 0 and t.user_attrs["prompt_set_hash"]
    pngs = list((tmp_path / "artifacts").rglob("*"))
    assert len([p for p in pngs if p.is_file()]) >= 2 * len(counted)  # grid + recipe per trial
    # the held-out prompts are rendered for finished trials only and reported beside the objective, never optimised
    done = study.get_trials(states=(TrialState.COMPLETE,))
    assert all(set(x.user_attrs["holdout"]) == {"heldout_prompts/objective", "heldout_prompts/clip", "heldout_prompts/aesthetic"}
               or "cached_from" in x.user_attrs for x in done)
    assert all("holdout" not in x.user_attrs for x in study.get_trials(states=(TrialState.PRUNED,)))
    assert abs(t.user_attrs["holdout"]["heldout_prompts/objective"] - t.value) > 0  # other prompts, another value
    storage = open_storage_url(f"sqlite:///{tmp_path / 'study.db'}")
    exp = export_trial(storage, "e2e", tmp_path / "best.safetensors", device="cpu")
    assert exp.verified and json.loads(exp.metadata["astolfo_opt_holdout"]) == t.user_attrs["holdout"]
    # a failed check never replaces an earlier export at the target name, and leaves no partial file behind
    before = (tmp_path / "best.safetensors").read_bytes()
    forged = optuna.trial.create_trial(params=t.params, distributions=t.distributions, value=t.value,
                                       user_attrs={**t.user_attrs, "component_hashes": {"unet": "0" * 32}, "fingerprints": {}})
    study.add_trial(forged)  # a trial whose recorded tensors are not what its recipe merges to
    with pytest.raises(AstolfoError, match="differ from what the trial scored"):
        export_trial(storage, "e2e", tmp_path / "best.safetensors", trial=study.trials[-1].number, device="cpu")
    assert (tmp_path / "best.safetensors").read_bytes() == before
    assert not [p for p in tmp_path.iterdir() if ".partial-" in p.name]


def test_methods_study_renders_ties_and_exports_it(pool_dir, tmp_path):
    """``space.methods`` end to end: the staged plan sweeps the methods right after the model flips; a TIES / DARE-TIES
    trial is merged (incremental merger), swapped, rendered and scored, and export rebuilds exactly what it scored."""
    from astolfo_opt.search.export import export_trial
    from scorers.testing import demo_objective_config

    scorer = demo_objective_config(tmp_path / "scorer", device="cpu")
    render = {"prompt_set": "tiny", "n_prompts": 2, "batch_size": 1, "steps": 2, "width": 64, "height": 64}
    space = {"kind": "inclusion", "components": ["unet"], "methods": ["weighted_average", "ties", "dare_ties"]}
    cfg = base_cfg(pool_dir, tmp_path, n_trials=11, evaluator={"kind": "pipeline", "out_dtype": "fp16"}, scorer=scorer,
                   render=render, space=space, sampler={"name": "staged"}, artifacts=False)
    run_search(cfg)
    study = optuna.load_study(study_name="e2e", storage=f"sqlite:///{tmp_path / 'study.db'}")
    done = study.get_trials(states=(TrialState.COMPLETE,))
    swept = [t for t in done if t.params["method.unet"] != "weighted_average"]
    assert swept, [t.params for t in done]
    t = swept[0]
    spec = json.loads(t.user_attrs["recipe"])
    unet = spec["components"]["unet"]
    assert unet["method"] in ("ties", "dare_ties") and 0 < unet["params"]["density"] <= 1 and unet["anchor"] == "base"
    twin = next(x for x in done if x.params["method.unet"] == "weighted_average" and
                {k: v for k, v in x.params.items() if k.startswith("inc.")} == {k: v for k, v in t.params.items() if k.startswith("inc.")})
    assert t.value != twin.value  # the same models under another method render other pictures
    exp = export_trial(open_storage_url(f"sqlite:///{tmp_path / 'study.db'}"), "e2e", tmp_path / "ties.safetensors",
                       trial=t.number, device="cpu")
    assert exp.verified
