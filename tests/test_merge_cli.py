"""``astolfo-opt merge``: recipe and --average runs, summary line, metadata; bad input leaves no output file."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from astolfo_opt.checkpoint.io import open_checkpoint
from astolfo_opt.checkpoint.layout import get_layout
from astolfo_opt.merge.recipe import ComponentRecipe, Member, Recipe
from astolfo_opt.testing.factory import ModelSpec, make_checkpoint


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "astolfo_opt.cli", "merge", *map(str, args)], capture_output=True, text=True,
                          timeout=300)


def test_average_with_base_and_ckpt_input(tiny_pools, tmp_path):
    pool = tiny_pools["sd1"]
    ckpt = make_checkpoint(tmp_path / "old.ckpt", ModelSpec(seed=5, fmt="ckpt", old_style_te=True))
    out = tmp_path / "avg.safetensors"
    res = _cli("--average", *pool.models, ckpt, "--base", pool.base, "--out", out, "--no-progress")
    assert res.returncode == 0, res.stderr
    assert "merged 1131 keys from 5 models" in res.stdout and "GB read" in res.stdout
    r = open_checkpoint(out)
    assert set(get_layout("sd1", "tiny").required_keys()) <= set(r.keys())
    recipe = Recipe.from_json(r.metadata["recipe"])
    assert recipe.base == "base" and [m.model for m in recipe.components["unet"].members] == ["m00", "m01", "m02", "old"]
    assert r.metadata["astolfo_opt_version"] and "old.ckpt" in r.metadata["sd_merge_models"]
    k = "model.diffusion_model.out.2.weight"
    want = sum(open_checkpoint(p).get(k).double() for p in [*pool.models, ckpt]) / 4
    assert torch.allclose(r.get(k).double(), want, atol=1e-3)


def test_recipe_file_with_dtype_and_progress(tiny_pools, tmp_path):
    pool = tiny_pools["sd1"]
    recipe = Recipe(models={p.stem: str(p) for p in pool.all}, base="base", components={
        "unet": ComponentRecipe("weighted_average", [Member("m00"), Member("m01")], anchor="base", alpha={"M00": 0.5})})
    (tmp_path / "r.yaml").write_text(recipe.to_yaml())
    out = tmp_path / "r.safetensors"
    res = _cli(tmp_path / "r.yaml", "--out", out, "--dtype", "bf16", "--device", "cpu")
    assert res.returncode == 0, res.stderr
    assert "merge" in res.stderr  # tqdm bar
    r = open_checkpoint(out)
    assert r.info("model.diffusion_model.out.2.weight").dtype == torch.bfloat16
    assert Recipe.from_json(r.metadata["recipe"]).hash() == recipe.hash()
    # te0 / vae are not in the recipe: copied from the base, bit for bit (bf16 of fp16 values is exact here? no: compare)
    k = "first_stage_model.decoder.conv_out.weight"
    assert torch.equal(r.get(k), open_checkpoint(pool.base).get(k).to(torch.bfloat16))


@pytest.fixture(scope="module")
def bad_inputs(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli_bad")
    good = make_checkpoint(d / "good.safetensors", ModelSpec(seed=1))
    broken = d / "broken.safetensors"
    broken.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    return d, good, {
        "truncated": broken,
        "mix architectures": make_checkpoint(d / "xl.safetensors", ModelSpec(arch="sdxl", seed=1)),
        "NaN/Inf": make_checkpoint(d / "nan.safetensors", ModelSpec(seed=3, corrupt={"model.diffusion_model.out.2.weight": "inf"})),
        "not found": d / "nope.safetensors",
    }


@pytest.mark.parametrize("needle", ["truncated", "mix architectures", "NaN/Inf", "not found"])
def test_bad_input_is_one_line_and_leaves_no_output(bad_inputs, needle):
    d, good, bad = bad_inputs
    out = d / f"out_{needle[:3]}.safetensors"
    res = _cli("--average", good, bad[needle], "--out", out, "--no-progress")
    assert res.returncode == 2, res.stderr
    assert needle in res.stderr and "Traceback" not in res.stderr
    assert res.stderr.strip().count("\n") == 0 and res.stderr.startswith("error: ")
    assert not out.exists() and not list(d.glob(f".{out.name}.partial-*"))


@pytest.mark.parametrize("args, needle", [
    (["--out", "x.bin"], "must be a .safetensors"),
    ([], "either a RECIPE file or --average"),
    (["--out", "{good}"], "is also input model"),
    (["--device", "tpu"], "device"),
])
def test_bad_arguments(bad_inputs, args, needle):
    d, good, _ = bad_inputs
    args = [a.format(good=good) for a in args]
    if "--out" not in args:
        args += ["--out", str(d / "o.safetensors")]
    lead = ["--average", str(good)] if needle != "either a RECIPE file or --average" else []
    res = _cli(*lead, *args, "--no-progress")
    assert res.returncode == 2 and needle in res.stderr and "Traceback" not in res.stderr, res.stderr
    assert not (d / "o.safetensors").exists()


def test_bad_recipe_file(tmp_path):
    (tmp_path / "r.yaml").write_text("models: {a: a.safetensors}\ncomponents: {unet: {method: slerp, members: [a]}}\n")
    res = _cli(tmp_path / "r.yaml", "--out", tmp_path / "o.safetensors")
    assert res.returncode == 2 and "slerp" in res.stderr and "Traceback" not in res.stderr
    assert not (tmp_path / "o.safetensors").exists()
