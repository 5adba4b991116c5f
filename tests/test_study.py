"""Study machinery with the synthetic evaluator: full study, pruning, resume after SIGKILL, two workers on one
storage (SQLite and journal), greedy baseline, Hydra app, dashboard arguments."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from astolfo_opt.search.app import run_search
from astolfo_opt.search.study import open_storage_url
from astolfo_opt.testing.factory import make_pool

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def pool_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("study_pool")
    make_pool(d, n=4)
    return d


def cfg_for(pool_dir: Path, run_dir: Path, **over) -> dict:
    cfg = {"study_name": "s", "run_dir": str(run_dir), "n_trials": 12, "seed": 0, "progress": False, "artifacts": False,
           "pool": {"folder": str(pool_dir), "base": "base"}, "space": {"kind": "inclusion_mbw", "mbw": {"components": ["unet"]}},
           "evaluator": {"kind": "benchkit.evaluators.synthetic", "n_steps": 4, "noise": 0.02},
           "sampler": {"name": "tpe", "n_startup_trials": 4},
           "pruner": {"name": "none"}, "storage": {"kind": "rdb"}, "strategy": {"name": "optuna"}}
    for k, v in over.items():
        cfg[k] = {**cfg[k], **v} if isinstance(v, dict) and isinstance(cfg.get(k), dict) else v
    return cfg


def load(run_dir: Path, name: str = "s", journal: bool = False) -> optuna.Study:
    url = f"journal:{run_dir / 'journal.log'}" if journal else f"sqlite:///{run_dir / 'study.db'}"
    return optuna.load_study(study_name=name, storage=open_storage_url(url))


def test_full_study_with_warm_starts_and_attrs(pool_dir, tmp_path):
    res = run_search(cfg_for(pool_dir, tmp_path, artifacts=True))
    study = load(tmp_path)
    trials = study.get_trials()
    assert len(trials) == 12 and all(t.state == TrialState.COMPLETE for t in trials)
    assert res.best_number == study.best_trial.number and res.evaluations + sum("cached_from" in t.user_attrs for t in trials) == 12
    # warm starts first: uniform average, then the base alone
    assert study.metric_names == ["objective"]  # the dashboard's label, not "Objective 0"
    assert trials[0].user_attrs["warm_start"] and set(v for k, v in trials[0].params.items() if k.startswith("inc.")) == {1}
    base_members = json.loads(trials[1].user_attrs["recipe"])["components"]["unet"]["members"]
    assert [m["model"] for m in base_members] == ["base"]
    ua = trials[2].user_attrs
    for key in ("recipe", "recipe_hash", "tensor_hash", "component_hashes", "scores", "per_prompt", "time", "worker"):
        assert key in ua, key
    assert len(ua["per_prompt"]) == 4 and set(ua["time"]) >= {"merge", "render", "score", "other", "total"}
    arts = list((tmp_path / "artifacts").rglob("*"))
    assert len([a for a in arts if a.is_file()]) == 12  # one recipe JSON per trial (synthetic: no images)
    # re-running a finished study does nothing more
    again = run_search(cfg_for(pool_dir, tmp_path))
    assert again.ran_here == 0 and len(load(tmp_path).trials) == 12


def test_pruner_fires(pool_dir, tmp_path):
    run_search(cfg_for(pool_dir, tmp_path, n_trials=16, pruner={"name": "median", "n_startup_trials": 3},
                       sampler={"name": "random"}))
    study = load(tmp_path)
    pruned = study.get_trials(states=(TrialState.PRUNED,))
    assert pruned, "median pruner never fired"
    p = pruned[0]
    assert max(p.intermediate_values) < 4 and p.user_attrs["running_values"]  # stopped before the last batch
    assert len(study.get_trials(states=(TrialState.COMPLETE, TrialState.PRUNED))) == 16


def test_multi_objective_disables_pruning(pool_dir, tmp_path):
    res = run_search(cfg_for(pool_dir, tmp_path, n_trials=6, evaluator={"multi": True}, sampler={"name": "nsga2", "population_size": 4},
                             pruner={"name": "median"}))
    study = load(tmp_path)
    assert len(study.directions) == 2 and all(t.state == TrialState.COMPLETE for t in study.trials)
    assert study.metric_names == ["match", "alpha"]
    assert all(not t.intermediate_values for t in study.trials) and len(res.best_values) == 2


def test_greedy_records_trials(pool_dir, tmp_path):
    res = run_search(cfg_for(pool_dir, tmp_path, n_trials=14, strategy={"name": "greedy"}, space={"kind": "inclusion"}))
    study = load(tmp_path)
    trials = study.get_trials()
    assert len(trials) == res.greedy["evaluations"] <= 14
    assert all(t.user_attrs.get("strategy") == "greedy" for t in trials)
    # each greedy step toggles exactly one inclusion relative to the start (uniform average) in the first sweep
    first = trials[0].params
    assert all(v == 1 for v in first.values())
    assert all(sum(first[k] != t.params[k] for k in first) == 1 for t in trials[1:5])
    assert res.greedy["best_value"] >= trials[0].value


def test_hydra_app_runs_and_sweeps(pool_dir, tmp_path, monkeypatch, capsys):
    from astolfo_opt.commands.search import run_passthrough

    monkeypatch.chdir(tmp_path)
    common = [f"pool.folder={pool_dir}", "pool.base=base", "evaluator.kind=benchkit.evaluators.synthetic", "n_trials=5",
              "progress=false", "space=inclusion"]
    assert run_passthrough([*common, "study_name=h1", "pruner=none"]) == 0
    out = capsys.readouterr().out
    assert "study h1" in out and "astolfo-opt dashboard --storage sqlite:///runs/h1/study.db" in out
    assert len(load(tmp_path / "runs/h1", "h1").trials) == 5
    assert list((tmp_path / "runs/h1/hydra").glob("*/.hydra/config.yaml"))
    rc = run_passthrough(["-m", *common, "sampler=random,qmc", "seed=0,1", "study_name=sw_${sampler.name}_${seed}"])
    assert rc == 0
    for name in ("sw_random_0", "sw_random_1", "sw_qmc_0", "sw_qmc_1"):
        assert len(load(tmp_path / "runs" / name, name).trials) == 5
    # bad input: one line, exit 2
    assert run_passthrough(["pool.folder=/nonexistent", "evaluator.kind=benchkit.evaluators.synthetic", "study_name=bad"]) == 2
    assert "error: pool folder not found: /nonexistent" in capsys.readouterr().err


def test_default_search_is_set_up_for_real_models(pool_dir, tmp_path, monkeypatch, capsys):
    """With no scorer / render override, `astolfo-opt search` is the real-use configuration (ViT-L/14 + LAION head,
    512 px / 20 steps), and without local CLIP weights it stops with one line naming the key to set."""
    from hydra import compose, initialize_config_dir

    from astolfo_opt.commands.search import run_passthrough

    monkeypatch.delenv("ASTOLFO_CLIP_L14", raising=False)
    with initialize_config_dir(config_dir=str(SHIPPED), version_base="1.3", job_name="defaults"):
        cfg = compose("config")
    assert cfg.scorer.scorers.clip.model == "ViT-L-14-quickgelu" and "aesthetic" in cfg.scorer.scorers
    assert (cfg.render.width, cfg.render.height, cfg.render.steps, cfg.render.prompt_set) == (512, 512, 20, "default")
    monkeypatch.chdir(tmp_path)
    assert run_passthrough([f"pool.folder={pool_dir}", "pool.base=base", "n_trials=1", "progress=false", "study_name=d"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: scorer.scorers.clip.pretrained is required"), err


def test_dashboard_server_args(tmp_path, pool_dir, monkeypatch):
    from astolfo_opt.commands import dashboard

    run_search(cfg_for(pool_dir, tmp_path, n_trials=2, artifacts=True))
    url = f"sqlite:///{tmp_path / 'study.db'}"
    ns = argparse.Namespace(storage=url, artifacts=None, host="0.0.0.0", port=8123, dry_run=False)
    seen = {}
    import optuna_dashboard

    monkeypatch.setattr(optuna_dashboard, "run_server", lambda storage, **kw: seen.update(storage=storage, **kw))
    assert dashboard.run(ns) == 0
    assert seen["host"] == "0.0.0.0" and seen["port"] == 8123
    assert Path(seen["artifact_store"]._base_path) == tmp_path / "artifacts"
    assert optuna.load_study(study_name="s", storage=seen["storage"]).trials
    from astolfo_opt.errors import ConfigError

    with pytest.raises(ConfigError, match="study database not found"):
        dashboard.server_args(argparse.Namespace(storage="sqlite:////nope/x.db", artifacts=None, host="h", port=1, dry_run=True))


@pytest.mark.parametrize(("sampler", "pruner", "space"), [
    ("cmaes", "successive_halving", "inclusion_mbw"), ("gp", "hyperband", "weights"), ("qmc", "median", "pairwise_mbw"),
    ("random", "none", "inclusion"), ("tpe", "median", "weights"), ("staged", "none", "inclusion_mbw"),
])
def test_every_sampler_pruner_space(pool_dir, tmp_path, sampler, pruner, space):
    cfg = cfg_for(pool_dir, tmp_path, n_trials=7, pruner={"name": pruner}, space={"kind": space, "min_models": 2},
                  storage={"kind": "memory"})
    cfg["sampler"] = {"name": sampler} if sampler == "staged" else {"name": sampler, "n_startup_trials": 3}
    res = run_search(cfg)
    assert sum(res.states.get(s, 0) for s in ("COMPLETE", "PRUNED")) == 7 and res.best_values is not None


def test_fail_dead_trials_other_host_uses_heartbeat(tmp_path):
    import time as _time

    from astolfo_opt.search.study import fail_dead_trials

    study = optuna.create_study(storage=optuna.storages.InMemoryStorage())
    stale, fresh, local_dead = study.ask(), study.ask(), study.ask()
    stale.set_user_attr("worker", {"host": "elsewhere", "pid": 1, "started": 0})
    stale.set_user_attr("heartbeat", _time.time() - 1000)
    fresh.set_user_attr("worker", {"host": "elsewhere", "pid": 1, "started": 0})
    fresh.set_user_attr("heartbeat", _time.time())
    import socket

    local_dead.set_user_attr("worker", {"host": socket.gethostname(), "pid": 2**22 + 12345, "started": 0})
    assert sorted(fail_dead_trials(study, grace_period=300)) == [stale.number, local_dead.number]
    states = {t.number: t.state for t in study.trials}
    assert states[fresh.number] == TrialState.RUNNING and states[stale.number] == TrialState.FAIL


def test_hashing_sink_and_fingerprints():
    import torch

    from astolfo_opt.search.evaluator import HashingSink, TeeSink, fingerprints_close

    keys = ["model.diffusion_model.input_blocks.1.0.in_layers.2.weight", "model.diffusion_model.out.2.bias",
            "cond_stage_model.transformer.text_model.final_layer_norm.weight", "alphas_cumprod"]
    g = torch.Generator().manual_seed(0)
    ts = {k: torch.randn(64, generator=g).half() for k in keys}

    def run(tensors, previous=None):
        h = HashingSink("sd1", previous)
        sink = TeeSink(h, None)
        sink.begin([])
        for k, t in tensors.items():
            sink.consume(k, t)
        sink.end()
        return h

    a, b = run(ts), run({k: t.clone() for k, t in ts.items()})
    assert a.hashes == b.hashes and set(a.hashes) == {"unet", "te0"}  # pass-through keys are not hashed
    assert set(a.fingerprints["unet"]) == {"IN01", "OUT11"}
    drift = {k: t.clone() for k, t in ts.items()}
    drift[keys[0]].view(torch.int16)[3] += 1  # one fp16 ulp in one element: incremental-merge rounding drift
    c = run(drift)
    assert c.hashes["unet"] != a.hashes["unet"] and c.hashes["te0"] == a.hashes["te0"]
    assert fingerprints_close(a.fingerprints["unet"], c.fingerprints["unet"], rtol=1e-3)
    other = {k: t.clone() for k, t in ts.items()}
    other[keys[0]] *= 1.01
    d = run(other)
    assert not fingerprints_close(a.fingerprints["unet"], d.fingerprints["unet"])
    assert fingerprints_close(a.fingerprints["unet"], run(ts).fingerprints["unet"])
    # a later incremental merge that emits only te0 keeps the unet hash
    e = run({keys[2]: ts[keys[2]]}, previous=a.hashes)
    assert e.hashes["unet"] == a.hashes["unet"]


SHIPPED = Path(__file__).resolve().parents[1] / "conf"


@pytest.mark.parametrize("group", ["sampler", "pruner"])
def test_every_shipped_sampler_and_pruner_config_builds(group):
    """Each conf/sampler/*.yaml and conf/pruner/*.yaml, composed through Hydra as `astolfo-opt search` would, builds
    its Optuna object (a shipped name the factory does not know, or an option it rejects, fails here)."""
    from hydra import compose, initialize_config_dir

    from astolfo_opt.search.app import section
    from astolfo_opt.search.study import make_pruner, make_sampler

    names = sorted(p.stem for p in (SHIPPED / group).glob("*.yaml"))
    assert len(names) >= 5
    with initialize_config_dir(config_dir=str(SHIPPED), version_base="1.3", job_name="shipped"):
        for name in names:
            cfg = section(compose("config", overrides=[f"{group}={name}"]), group)
            if group == "sampler":
                multi = name == "nsga2"
                obj = make_sampler(cfg, 0, multi=multi, constraints=False)
                assert isinstance(obj, optuna.samplers.BaseSampler), name
            else:
                obj = make_pruner(cfg, multi=False)
                assert isinstance(obj, optuna.pruners.BasePruner), name
