"""The tiny trained world (astolfo_opt/world): its constructed VAE, the build's determinism, cache and bad-input
handling on the seconds-long ``test`` size, and end to end on the ``demo`` size (built once per test session):
``world check`` passes, a short search beats the uniform merge on the held-out judge over several seeds, and
export -> render -> judge reproduces the trial's images and judgement."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest
import torch
import yaml

from astolfo_opt.checkpoint import layout as L
from astolfo_opt.checkpoint import spec
from astolfo_opt.cli import main
from astolfo_opt.errors import ConfigError
from astolfo_opt.world import concepts as C
from astolfo_opt.world import vae as V
from astolfo_opt.world.build import RENDER, BuildParams, build_world, load_world

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------------ pieces
def test_world_layout_is_sd1_key_names_at_its_own_widths():
    world, full = L.get_layout("sd1", "world"), L.get_layout("sd1", "full")
    assert set(world.entries) <= set(full.entries)  # real SD1 key names (fewer skip connections: equal widths)
    missing = set(full.entries) - set(world.entries)
    assert missing and all("skip_connection" in k for k in missing)
    assert L.detect_size("sd1", {k: e.shape for k, e in world.entries.items()}) == "world"
    assert spec.sizes_of("sd1") == ("full", "tiny", "world") and "world" not in spec.sizes_of("sdxl")


def test_constructed_vae_is_pooling_and_nearest_upsampling(tmp_path):
    from astolfo_opt.render.pipeline import build_pipeline
    from astolfo_opt.testing.factory import ModelSpec, make_checkpoint

    pipe = build_pipeline(make_checkpoint(tmp_path / "w.safetensors", ModelSpec(size="world", spread=0.0)), device="cpu")
    vae = V.construct(pipe.modules["vae"], float(pipe.modules["vae"].config.scaling_factor))
    x = C.draw(C.all_concepts()[::7], torch.Generator().manual_seed(0))
    sf = vae.config.scaling_factor
    with torch.no_grad():
        z = vae.encode(x).latent_dist.mean * sf
        y = vae.decode(z / sf).sample
    assert (z - V.encode(x)).abs().max() < 2e-3
    assert (y - V.decode(z)).abs().max() < 2e-3
    assert (y - V.decode(V.encode(x))).abs().max() < 2e-3  # decode(encode(x)) is x pooled to 8x8 cells


def test_prompts_parse_back_to_concepts():
    for c in C.all_concepts():
        assert C.parse_prompt(c.prompt) == c
    assert C.parse_prompt("a photo of a cat") is None
    train, held = C.split_heldout(C.all_concepts())
    assert held and not set(train) & set(held)
    for a in ("colour", "shape", "background"):  # each held-out value is seen in training in other combinations
        assert {getattr(c, a) for c in held} <= {getattr(c, a) for c in train}


def test_world_render_config_matches_what_the_world_carries():
    cfg = yaml.safe_load((ROOT / "conf" / "render" / "world.yaml").read_text())
    assert {k: cfg[k] for k in RENDER} == RENDER


# ------------------------------------------------------------------------------------------------ test-size world
@pytest.fixture(scope="module")
def small_world(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("world") / "w"
    build_world(out, BuildParams(size="test", seed=3), progress=False, log=lambda s: None)
    return out


def test_build_is_deterministic_and_cached(small_world, tmp_path, capsys):
    doc = load_world(small_world)
    assert {"pool/base.safetensors", "scorer/tower.safetensors", "judge/judge.safetensors", "prompts.yaml"} <= set(doc["files"])
    assert len([f for f in doc["files"] if f.startswith("pool/")]) == 1 + 3 + 3  # base, 3 models, 3 planted faults
    again = tmp_path / "again"
    build_world(again, BuildParams(size="test", seed=3), progress=False, log=lambda s: None)
    other = load_world(again)
    assert {k: v["sha256"] for k, v in other["files"].items()} == {k: v["sha256"] for k, v in doc["files"].items()}
    mtimes = {p: p.stat().st_mtime_ns for p in again.rglob("*") if p.is_file()}
    build_world(again, BuildParams(size="test", seed=3), progress=False)
    assert "already built" in capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in again.rglob("*") if p.is_file()} == mtimes  # a no-op
    with pytest.raises(ConfigError, match="describes another world"):
        build_world(again, BuildParams(size="test", seed=4), progress=False)


def test_world_models_are_real_sd1_files(small_world):
    from astolfo_opt.checkpoint.inspect import inspect_model

    rep = inspect_model(small_world / "pool" / "m00.safetensors", scan=True, cache=False)
    assert rep.arch == "sd1" and rep.size == "world" and not rep.nonfinite_keys()
    nan = inspect_model(next((small_world / "pool").glob("*_nan.safetensors")), scan=True, cache=False)
    assert nan.nonfinite_keys()
    doc = load_world(small_world)
    te_copy = next(n for n, k in doc["faults"].items() if k == "copied te0")
    a = inspect_model(small_world / "pool" / f"{te_copy}.safetensors", scan=True, cache=False)
    src = inspect_model(small_world / "pool" / "m00.safetensors", scan=True, cache=False)
    assert a.component_hashes["te0"] == src.component_hashes["te0"] and a.component_hashes["unet"] != src.component_hashes["unet"]


def test_broken_worlds_are_one_line_naming_file_and_rebuild(small_world, tmp_path):
    import shutil

    with pytest.raises(ConfigError, match=r"does not exist; build it with `astolfo-opt world build"):
        load_world(tmp_path / "nowhere")
    half = tmp_path / "half"
    shutil.copytree(small_world, half)
    (half / "world.json").unlink()  # what a build stopped before its manifest leaves
    with pytest.raises(ConfigError, match=r"world.json is missing: .* is not a finished world"):
        load_world(half)
    bad = tmp_path / "bad"
    shutil.copytree(small_world, bad)
    f = bad / "pool" / "m00.safetensors"
    data = bytearray(f.read_bytes())
    data[-100] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.raises(ConfigError) as e:
        load_world(bad)
    msg = str(e.value)
    assert "m00.safetensors is corrupted" in msg and "astolfo-opt world build" in msg and "\n" not in msg
    (bad / "world.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not a readable world manifest"):
        load_world(bad)


def test_cli_errors_are_one_line(tmp_path, capsys):
    assert main(["world", "judge", "--images", str(tmp_path), "--world", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "render.json not found" in err
    assert main(["world", "check", str(tmp_path / "none")]) == 2
    assert "astolfo-opt world build" in capsys.readouterr().err
    assert main(["world", "build", str(tmp_path / "x"), "--arch", "sdxl"]) == 2
    assert "only sd1 worlds" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ demo world, end to end
# demo_world: the session fixture in conftest.py (built once, shared with test_review.py)


@pytest.mark.slow
def test_world_check_passes(demo_world):
    from astolfo_opt.world.check import check_world

    props = check_world(demo_world, recipes=30)
    failed = [(p.name, round(p.value, 3), p.threshold) for p in props if not p.passed]
    assert not failed, failed


@pytest.mark.slow
def test_short_search_beats_uniform_merge_on_the_judge_over_seeds(demo_world, tmp_path):
    from astolfo_opt.search.demo import run_demo

    gains = []
    for seed in (0, 1, 2):
        res = run_demo(tmp_path / f"s{seed}", n_trials=20, world_dir=demo_world, extra_overrides=[f"seed={seed}"])
        s = res["summary"]
        gains.append(s["best_judge_accuracy"] - s["uniform_judge_accuracy"])
    assert statistics.median(gains) >= 0.15, gains
    assert sum(g >= 0.1 for g in gains) >= 2, gains


@pytest.mark.slow
def test_export_render_judge_reproduces_the_trial(demo_world, tmp_path, capsys):
    import optuna

    from astolfo_opt.render.prompts import load_prompt_set
    from astolfo_opt.search.demo import run_demo
    from astolfo_opt.search.space import spec_to_recipe
    from astolfo_opt.world.check import WorldEval
    from astolfo_opt.world.judge import judge

    res = run_demo(tmp_path / "d", n_trials=8, world_dir=demo_world)
    best = res["export"].path
    out = tmp_path / "render"
    assert main(["render", "--checkpoint", str(best), "--prompts", str(demo_world / "prompts.yaml"), "--out", str(out)]) == 0
    meta = json.loads((out / "render.json").read_text())
    assert {k: meta["settings"][k] for k in RENDER} == RENDER  # the world's settings, with no flags
    assert main(["world", "judge", "--images", str(out), "--world", str(demo_world), "--json", str(tmp_path / "j.json")]) == 0
    judged = json.loads((tmp_path / "j.json").read_text())
    # the trial's own images: its recipe swapped into the study's resident pipeline, as the evaluator rendered them
    study = optuna.load_study(study_name="demo", storage=f"sqlite:///{tmp_path / 'd' / 'study.db'}")
    trial = study.trials[res["export"].trial]
    ev = WorldEval(demo_world)
    ev.load(spec_to_recipe(json.loads(trial.user_attrs["recipe"])))
    prompts = load_prompt_set(demo_world / "prompts.yaml").prompts
    images = ev.pipe.render(prompts, ev.settings)
    from PIL import Image

    for f, im in zip(meta["files"], images, strict=True):
        assert Image.open(out / f).convert("RGB").tobytes() == im.tobytes(), f
    again = judge(ev.judge_net, images, [p.prompt for p in prompts])
    assert again["accuracy"] == judged["accuracy"] and [r["predicted"] for r in again["rows"]] == [r["predicted"] for r in judged["rows"]]
    assert judged["accuracy"] == pytest.approx(res["summary"]["best_judge_accuracy_study_prompts"])
