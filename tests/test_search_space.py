"""Search space: shared parameters for identical components, MBW blocks, constraints/repair, warm starts."""

from __future__ import annotations

import optuna
import pytest

from astolfo_opt.checkpoint.layout import block_ids
from astolfo_opt.errors import ConfigError
from astolfo_opt.search.pool import resolve_pool
from astolfo_opt.search.space import SearchSpace
from astolfo_opt.testing.factory import make_pool


@pytest.fixture(scope="module")
def pool_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("space_pool")
    p = make_pool(d, n=3)
    # m03 ships m00's text encoder bit for bit; m04 has a NaN in its UNet
    from astolfo_opt.testing.factory import ModelSpec, make_checkpoint

    make_checkpoint(d / "m03.safetensors", ModelSpec(seed=33, copy_components={"te0": p.models[0]}))
    make_checkpoint(d / "m04_nan.safetensors", ModelSpec(seed=44, corrupt={"model.diffusion_model.out.2.weight": "nan"}))
    return d


@pytest.fixture(scope="module")
def pool(pool_dir):
    return resolve_pool({"folder": str(pool_dir), "base": "base", "exclude": ["m04_nan"]}, cache_file=pool_dir / "facts.json")


def test_nan_model_named_with_fix(pool_dir):
    with pytest.raises(ConfigError, match=r"m04_nan: unet tensor .* pool.exclude=\[m04_nan\]"):
        resolve_pool({"folder": str(pool_dir), "base": "base"})
    p = resolve_pool({"folder": str(pool_dir), "base": "base", "nan_policy": "drop_model"})
    assert "m04_nan" in p.names and p.model("m04_nan").nonfinite["unet"] == ["model.diffusion_model.out.2.weight"]


def test_pool_order_and_identical_groups(pool):
    assert pool.names[0] == "base" and pool.arch == "sd1" and pool.size == "tiny"
    assert pool.excluded == {"m04_nan": "pool.exclude"}
    assert ["m00", "m03"] in pool.identical_groups("te0")
    assert all(len(g) == 1 for g in pool.identical_groups("unet"))


def test_shared_parameter_and_single_member(pool):
    sp = SearchSpace(pool, {"kind": "inclusion"})
    te = [n for n in sp.names if n.startswith("inc.te0.")]
    assert te == ["inc.te0.base", "inc.te0.m00", "inc.te0.m01", "inc.te0.m02"]  # m03 shares m00's parameter
    assert len([n for n in sp.names if n.startswith("inc.unet.")]) == 5
    c = sp.candidate(sp.uniform_params())
    te_members = [m["model"] for m in c.spec["components"]["te0"]["members"]]
    assert te_members == ["base", "m00", "m01", "m02"]  # the shared encoder enters once, not twice
    assert c.spec["components"]["unet"]["method"] == "weighted_average"
    assert set(c.spec["models"]) == {"base", "m00", "m01", "m02", "m03"}


def test_mbw_blocks_and_base_warm_start(pool):
    sp = SearchSpace(pool, {"kind": "inclusion_mbw", "mbw": {"components": ["unet"]}})
    alphas = [n.split(".")[-1] for n in sp.names if n.startswith("alpha.unet.")]
    assert alphas == [b for b in block_ids("sd1") if b != "BASE"]  # no UNet key sits in BASE with time_embed in IN00
    base = sp.candidate(sp.base_params())
    u = base.spec["components"]["unet"]
    assert u["anchor"] == "base" and set(u["alpha"].values()) == {0.0}
    assert [m["model"] for m in u["members"]] == ["base"]
    sp2 = SearchSpace(pool, {"kind": "inclusion_mbw", "mbw": {"components": ["unet"]}}, time_embed_block="BASE")
    assert "alpha.unet.BASE" in sp2.names


def test_min_models_repair_and_constraint(pool):
    sp = SearchSpace(pool, {"kind": "inclusion", "min_models": 3})
    params = {n: 0 for n in sp.names}
    params["inc.unet.m02"] = 1
    c = sp.candidate(params)
    assert [m["model"] for m in c.spec["components"]["unet"]["members"]] == ["m02", "base", "m00"]
    assert c.repaired["unet"] == ["base", "m00"] and c.violation == 2 + 3  # unet short by 2, te0 by 3
    ok = sp.candidate(sp.uniform_params())
    assert ok.violation == 0 and not ok.repaired


def test_weights_and_pairwise(pool):
    sp = SearchSpace(pool, {"kind": "weights"})
    assert all(n.startswith("w.") for n in sp.names)
    params = {n: 0.5 for n in sp.names}
    params["w.unet.m01"] = 0.01  # below min_weight: left out
    c = sp.candidate(params)
    assert "m01" not in [m["model"] for m in c.spec["components"]["unet"]["members"]]
    pw = SearchSpace(pool, {"kind": "pairwise_mbw", "pair_b": "m02"})
    assert pw.names[0] == "pair.IN00" and len(pw.names) == 25
    c = pw.candidate({n: 0.25 for n in pw.names})
    u = c.spec["components"]["unet"]
    assert u["anchor"] == "base" and u["members"] == [{"model": "m02", "weight": 1.0}] and u["alpha"]["OUT11"] == 0.25
    assert c.spec["components"]["te0"]["method"] == "copy"
    with pytest.raises(ConfigError, match="pair_b"):
        SearchSpace(pool, {"kind": "pairwise_mbw", "pair_b": "nope"})


def test_suggest_with_optuna_and_distributions(pool):
    sp = SearchSpace(pool, {"kind": "inclusion_mbw", "mbw": {"components": ["unet"], "step": 0.1}})
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=1))
    t = study.ask(sp.distributions())
    c = sp.candidate(t.params)
    assert set(t.params) == set(sp.names) and c.hash == sp.candidate(dict(t.params)).hash
    for w in sp.warm_starts():  # warm starts are valid points of the space
        assert all(sp.distributions()[k]._contains(sp.distributions()[k].to_internal_repr(v)) for k, v in w.items())


def test_bad_config(pool):
    with pytest.raises(ConfigError, match="space.kind"):
        SearchSpace(pool, {"kind": "nope"})
    with pytest.raises(ConfigError, match="missing"):
        SearchSpace(pool, {"kind": "inclusion"}).candidate({})


def test_without_base_the_first_model_supplies_the_vae(pool_dir, tmp_path):
    """No pool.base: the unsearched VAE (and keys pruned models lack) come from the first pool model - the file the
    render pipeline is built from - so the exported merge has a VAE and equals what the trial rendered."""
    from astolfo_opt.merge.kernel import merge
    from astolfo_opt.merge.sinks import CollectSink
    from astolfo_opt.search.space import spec_to_recipe

    p = resolve_pool({"folder": str(pool_dir), "exclude": ["m04_nan", "base"]}, cache_file=tmp_path / "f.json")
    sp = SearchSpace(p, {"kind": "inclusion"})
    c = sp.candidate({**sp.uniform_params(), "inc.unet.m01": 0})
    assert c.spec["base"] == p.names[0] == "m00" and "m00" in c.spec["models"]
    assert any("no pool.base" in line for line in sp.describe())
    sink = CollectSink()
    merge(spec_to_recipe(c.spec), sink, device="cpu")
    vae = [k for k in sink.tensors if k.startswith("first_stage_model.")]
    assert len(vae) > 100
