"""The pools of 2026 (issue 17): prediction type from markers and ModelSpec, mixed v / epsilon pools refused by merge,
search and export, markers carried through (never averaged), ModelSpec written on merge / export, fp8 in and out."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from astolfo_opt.checkpoint.inspect import inspect_model, inspect_pool
from astolfo_opt.checkpoint.io import open_checkpoint
from astolfo_opt.checkpoint.prediction import EPSILON, V_PREDICTION, read_prediction
from astolfo_opt.errors import ConfigError
from astolfo_opt.merge.kernel import merge
from astolfo_opt.merge.recipe import Recipe
from astolfo_opt.merge.sinks import CollectSink, SafetensorsSink, merge_metadata
from astolfo_opt.testing.factory import ModelSpec, make_checkpoint

VPRED = {"v_pred": "empty", "ztsnr": "empty"}
EMPTY = (torch.int64, (0,))


def _cli(*args: object) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "astolfo_opt.cli", *map(str, args)], capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def xl(tmp_path_factory):
    """Tiny SDXL files: v-pred (markers + ModelSpec), v-pred by ModelSpec only, plain epsilon, an fp8 epsilon copy."""
    d = tmp_path_factory.mktemp("xl_pred")
    spec_meta = {"modelspec.prediction_type": "v", "modelspec.resolution": "1024x1024", "modelspec.usage_hint": "odd, kept"}
    files = {
        "vbase": make_checkpoint(d / "v" / "vbase.safetensors", ModelSpec(arch="sdxl", seed=1, markers=VPRED, metadata=spec_meta)),
        "v1": make_checkpoint(d / "v" / "v1.safetensors", ModelSpec(arch="sdxl", seed=2, markers=VPRED)),
        "v2": make_checkpoint(d / "v" / "v2.safetensors", ModelSpec(arch="sdxl", seed=3, metadata={"modelspec.prediction_type": "v"})),
        "eps": make_checkpoint(d / "eps.safetensors", ModelSpec(arch="sdxl", seed=4)),
        "eps8": make_checkpoint(d / "eps8.safetensors", ModelSpec(arch="sdxl", seed=4, dtype="fp8_e4m3")),
    }
    return d, files


# ------------------------------------------------------------------------------------------------ reading
def test_read_prediction_from_markers_and_modelspec():
    assert read_prediction({"v_pred": EMPTY, "ztsnr": EMPTY}, {}).to_json() == {
        "prediction_type": V_PREDICTION, "source": "markers", "ztsnr": True, "markers": ["v_pred", "ztsnr"], "problems": []}
    assert read_prediction({}, {"modelspec.prediction_type": "v"}).type == V_PREDICTION
    assert read_prediction({}, {"modelspec.prediction_type": "EPSILON"}).type == EPSILON
    sd2 = read_prediction({}, {"modelspec.architecture": "stable-diffusion-v2-768-v"})
    assert (sd2.type, sd2.source) == (V_PREDICTION, "modelspec.architecture")
    assert read_prediction({}, {"modelspec.architecture": "stable-diffusion-v2-512"}).type == EPSILON
    nothing = read_prediction({}, {"modelspec.architecture": "stable-diffusion-xl-v1-base"})
    assert nothing.type is None and nothing.problems == ()
    # contradictions and malformed input: a warning naming both sides, the marker wins
    c = read_prediction({"v_pred": EMPTY}, {"modelspec.prediction_type": "epsilon"})
    assert c.type == V_PREDICTION and "v_pred says v_prediction" in c.problems[0] and "modelspec says epsilon" in c.problems[0]
    bad = read_prediction({"v_pred": (torch.int64, (3,)), "ztsnr": (torch.bool, (0,))}, {"modelspec.prediction_type": "sideways"})
    assert bad.type == V_PREDICTION and bad.ztsnr and len(bad.problems) == 3
    assert any("holds 3 value" in p for p in bad.problems) and any("dtype bool" in p for p in bad.problems)
    assert any("'sideways' is not a known value" in p for p in bad.problems)
    lone = read_prediction({"ztsnr": EMPTY}, {})
    assert lone.type is None and lone.ztsnr and "without v_pred" in lone.problems[0]


def test_inspect_reports_prediction_type_table_and_json(xl, tmp_path):
    d, f = xl
    rep = inspect_pool([d / "v", f["eps"]], cache=False)
    by = {m.name: m for m in rep.models}
    assert by["vbase"].prediction_type == V_PREDICTION and by["vbase"].prediction == {"source": "markers", "ztsnr": True,
                                                                                       "markers": ["v_pred", "ztsnr"]}
    assert by["v2"].prediction_type == V_PREDICTION and by["v2"].prediction["source"] == "modelspec"
    assert by["eps"].prediction_type is None and by["eps"].effective_prediction == EPSILON  # SDXL states nothing: epsilon
    assert by["vbase"].modelspec["modelspec.usage_hint"] == "odd, kept"  # unknown values untouched
    assert "prediction" in rep.prediction_mix and "vbase" in rep.prediction_mix and "eps" in rep.prediction_mix
    out = tmp_path / "pool.json"
    res = _cli("inspect", d / "v", f["eps"], "--json", out, "--no-cache")
    assert res.returncode == 0, res.stderr  # inspect reports the mix; merge / search / export refuse it
    data = json.loads(out.read_text())
    assert {m["name"]: m["prediction_type"] for m in data["models"]} == {"vbase": "v_prediction", "v1": "v_prediction",
                                                                        "v2": "v_prediction", "eps": None}
    assert "pred" in res.stdout and "v+ztsnr" in res.stdout and "?(eps)" in res.stdout
    assert "mixes prediction types" in res.stdout


def test_hostile_markers_and_metadata_are_warnings_not_crashes(tmp_path):
    """A marker holding data or of dtype bool, ModelSpec contradicting the markers, unknown modelspec values: inspect
    warns and keeps the model usable; the merge writes a clean empty marker."""
    p = make_checkpoint(tmp_path / "odd.safetensors", ModelSpec(arch="sdxl", seed=7, markers={"v_pred": "data", "ztsnr": "bool"},
                        metadata={"modelspec.prediction_type": "epsilon", "modelspec.newfield": "x"}))
    rep = inspect_model(p, cache=False)
    assert rep.errors == [] and rep.prediction_type == V_PREDICTION
    msgs = [f.message for f in rep.findings if f.kind == "prediction"]
    assert len(msgs) == 3 and rep.modelspec["modelspec.newfield"] == "x"
    out = tmp_path / "out.safetensors"
    merge(Recipe.average([p]), SafetensorsSink(out, merge_metadata(Recipe.average([p]))), device="cpu")
    with open_checkpoint(out) as r:
        assert tuple(r.info("v_pred").shape) == (0,) and r.metadata["modelspec.newfield"] == "x"
        assert r.metadata["modelspec.prediction_type"] == "v"


# ------------------------------------------------------------------------------------------------ merge / export
def test_merge_refuses_a_mixed_pool_unless_allowed(xl, tmp_path):
    _, f = xl
    out = tmp_path / "mixed.safetensors"
    res = _cli("merge", "--average", f["vbase"], f["eps"], "--out", out, "--no-progress")
    assert res.returncode != 0 and not out.exists()
    line = res.stderr.strip().splitlines()[-1]
    assert "prediction" in line and "vbase" in line and "eps" in line and "--allow-mixed-prediction" in line
    res = _cli("merge", "--average", f["vbase"], f["eps"], "--out", out, "--no-progress", "--allow-mixed-prediction")
    assert res.returncode == 0, res.stderr
    assert "merging anyway" in res.stderr
    with open_checkpoint(out) as r:
        assert "modelspec.prediction_type" not in r.metadata  # a mix states nothing rather than something wrong
    with pytest.raises(ConfigError, match="prediction"):
        merge(Recipe.average([f["v1"], f["eps8"]]), CollectSink(), device="cpu")
    r = Recipe.average([f["v1"], f["eps8"]])
    r.allow_mixed_prediction = True
    assert Recipe.from_yaml(r.to_yaml()).allow_mixed_prediction and "allow_mixed_prediction" not in Recipe.average([f["v1"]]).to_json()


def test_v_pred_merge_carries_markers_and_writes_modelspec(xl, tmp_path, monkeypatch):
    _, f = xl
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1764806400")
    out = tmp_path / "v.safetensors"
    # no base: the markers still come through (from the first model that has them), as empty tensors, never averaged
    res = _cli("merge", "--average", f["v1"], f["vbase"], f["v2"], "--out", out, "--no-progress", "--title", "my mix")
    assert res.returncode == 0, res.stderr
    with open_checkpoint(out) as r:
        assert {k: (r.info(k).dtype, tuple(r.info(k).shape)) for k in ("v_pred", "ztsnr")} == {"v_pred": EMPTY, "ztsnr": EMPTY}
        m = r.metadata
        recipe = Recipe.from_json(m["recipe"])
    assert m["modelspec.architecture"] == "stable-diffusion-xl-v1-base" and m["modelspec.prediction_type"] == "v"
    assert m["modelspec.title"] == "my mix" and m["modelspec.date"] == "2025-12-04T00:00:00+00:00"
    assert m["modelspec.merged_from"] == "v1, vbase, v2" and recipe.hash() in m["modelspec.description"]
    assert m["modelspec.implementation"] == "sgm" and m["modelspec.sai_model_spec"] == "1.0.0"
    # inherited from the first model (no base): nothing of the others'; vbase's resolution is not v1's to claim
    assert "modelspec.resolution" not in m
    assert inspect_model(out, cache=False).prediction_type == V_PREDICTION


def test_fp8_inputs_are_upcast_and_fp8_output_is_optional(xl, tmp_path):
    _, f = xl
    ref = CollectSink()
    merge(Recipe.average([f["eps"], f["eps8"]]), ref, device="cpu", out_dtype="fp32")
    k = "model.diffusion_model.out.2.weight"
    with open_checkpoint(f["eps"]) as a, open_checkpoint(f["eps8"]) as b:
        want = (a.get(k).float() + b.get(k).float()) / 2  # the fp8 tensor widened exactly, then averaged in fp32
        assert b.info(k).dtype == torch.float8_e4m3fn
    torch.testing.assert_close(ref.tensors[k], want, rtol=0, atol=1e-7)
    out = tmp_path / "o8.safetensors"
    res = _cli("merge", "--average", f["eps"], f["eps8"], "--out", out, "--no-progress", "--dtype", "fp8_e5m2")
    assert res.returncode == 0, res.stderr
    with open_checkpoint(out) as r:
        got = r.get(k)
        assert got.dtype == torch.float8_e5m2
        torch.testing.assert_close(got.float(), want.to(torch.float8_e5m2).float(), rtol=0, atol=0)
    # bf16 stays exact: one bf16 model merged alone into bf16 is bit for bit the input
    bf = make_checkpoint(tmp_path / "bf.safetensors", ModelSpec(arch="sdxl", seed=9, dtype="bf16"))
    one = CollectSink()
    merge(Recipe.average([bf]), one, device="cpu", out_dtype="bf16")
    with open_checkpoint(bf) as r:
        assert torch.equal(one.tensors[k], r.get(k))


# ------------------------------------------------------------------------------------------------ search / export
def test_search_refuses_a_mixed_pool_and_allows_it_when_told(xl, tmp_path):
    from astolfo_opt.search.pool import resolve_pool
    from astolfo_opt.search.space import SearchSpace, spec_to_recipe

    _, f = xl
    files = [str(f["vbase"]), str(f["v1"]), str(f["eps"])]
    with pytest.raises(ConfigError, match="prediction") as e:
        resolve_pool({"files": files, "base": "vbase"}, cache_file=tmp_path / "facts.json")
    assert "pool.allow_mixed_prediction=true" in str(e.value) and "\n" not in str(e.value)
    ok = resolve_pool({"files": files[:2], "base": "vbase"}, cache_file=tmp_path / "facts.json")
    assert ok.prediction == V_PREDICTION and not ok.allow_mixed_prediction
    mixed = resolve_pool({"files": files, "base": "vbase", "allow_mixed_prediction": True}, cache_file=tmp_path / "facts.json")
    assert mixed.prediction is None and mixed.allow_mixed_prediction
    spec = SearchSpace(mixed, {"kind": "inclusion"}).candidate(SearchSpace(mixed, {"kind": "inclusion"}).uniform_params()).spec
    assert spec["allow_mixed_prediction"] is True and spec_to_recipe(spec).allow_mixed_prediction  # export merges it too


def test_a_tiny_v_pred_sdxl_pool_searches_end_to_end(tmp_path):
    """Pipeline evaluator on a v-pred SDXL pool: the renderer picks sdxl-v from the base's markers (no pool.variant),
    trials render and score, and the exported best carries the markers and ModelSpec."""
    import optuna

    from astolfo_opt.search.app import run_search
    from astolfo_opt.search.export import export_trial
    from astolfo_opt.search.study import open_storage_url
    from scorers.testing import demo_objective_config

    d = tmp_path / "pool"
    meta = {"modelspec.prediction_type": "v", "modelspec.architecture": "stable-diffusion-xl-v1-base"}
    make_checkpoint(d / "base.safetensors", ModelSpec(arch="sdxl", seed=0, spread=0.0, markers=VPRED, metadata=meta))
    for i in range(2):
        make_checkpoint(d / f"m{i:02d}.safetensors", ModelSpec(arch="sdxl", seed=10 + i, markers=VPRED))
    cfg = {"study_name": "vxl", "run_dir": str(tmp_path / "run"), "n_trials": 4, "seed": 0, "progress": False, "artifacts": False,
           "device": "cpu", "pool": {"folder": str(d), "base": "base"}, "space": {"kind": "inclusion"},
           "sampler": {"name": "tpe", "n_startup_trials": 2}, "pruner": {"name": "none"}, "storage": {"kind": "rdb"},
           "strategy": {"name": "optuna"}, "evaluator": {"kind": "pipeline", "out_dtype": "fp16"},
           "scorer": demo_objective_config(tmp_path / "scorer", device="cpu"),
           "render": {"prompt_set": "tiny", "n_prompts": 2, "batch_size": 1, "steps": 2, "width": 64, "height": 64}}
    run_search(cfg)
    storage = open_storage_url(f"sqlite:///{tmp_path / 'run' / 'study.db'}")
    study = optuna.load_study(study_name="vxl", storage=storage)
    assert study.user_attrs["objective"]["render_variant"] == "sdxl-v"
    assert study.user_attrs["pool"]["prediction"] == V_PREDICTION
    assert len(study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))) == 4
    exp = export_trial(storage, "vxl", tmp_path / "best.safetensors", device="cpu")
    assert exp.verified
    with open_checkpoint(tmp_path / "best.safetensors") as r:
        assert {k: (r.info(k).dtype, tuple(r.info(k).shape)) for k in ("v_pred", "ztsnr")} == {"v_pred": EMPTY, "ztsnr": EMPTY}
        assert r.metadata["modelspec.prediction_type"] == "v" and r.metadata["modelspec.title"] == f"vxl trial {exp.trial}"
        assert r.metadata["modelspec.architecture"] == "stable-diffusion-xl-v1-base" and r.metadata["modelspec.date"]
