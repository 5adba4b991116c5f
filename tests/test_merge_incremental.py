"""IncrementalMerger: equal to from-scratch merges over a long random sequence, and reads only what changed."""

from __future__ import annotations

import random

import pytest
import torch

from astolfo_opt.checkpoint.layout import block_ids
from astolfo_opt.merge.incremental import IncrementalMerger
from astolfo_opt.merge.kernel import merge
from astolfo_opt.merge.recipe import ComponentRecipe, Member, Recipe
from astolfo_opt.merge.sinks import CollectSink, NullSink
from astolfo_opt.testing.factory import make_pool


@pytest.fixture(scope="module")
def pool5(tmp_path_factory):
    return make_pool(tmp_path_factory.mktemp("inc_pool"), n=5, arch="sd1", seed=11)


def _same(a: CollectSink, b: CollectSink, where) -> None:
    assert list(a.tensors) == list(b.tensors), where
    for k in a.tensors:
        assert a.tensors[k].dtype == b.tensors[k].dtype, (where, k)
        assert torch.allclose(a.tensors[k].double(), b.tensors[k].double(), rtol=1e-5, atol=1e-6), (where, k)


@pytest.mark.parametrize("chunk", [None, 4096], ids=["whole", "chunked"])
def test_incremental_equals_from_scratch_over_30_random_recipes(pool5, monkeypatch, chunk):
    if chunk:  # tiny tensors take the slice-by-slice (fused update + narrow) path that full-size ones take
        import astolfo_opt.merge.execute as execute

        monkeypatch.setattr(execute, "_CHUNK", chunk)
    names = [p.stem for p in pool5.models]
    models = {p.stem: str(p) for p in pool5.all}
    rng = random.Random(3)
    inc = IncrementalMerger(device="cpu", out_dtype=torch.float32, threads=2)
    prev = None
    kinds = []
    for step in range(30):
        kind = "random" if prev is None else rng.choice(["flip", "weight", "alpha", "anchor", "random"])
        if kind == "random":
            comps = {}
            for c in ("unet", "te0"):
                chosen = [n for n in names if rng.random() < 0.6] or [names[step % 5]]
                comps[c] = ComponentRecipe("weighted_average", [Member(n, rng.choice([1.0, 2.0])) for n in chosen],
                                           anchor="base", alpha={b: rng.uniform(0.2, 1.0) for b in block_ids("sd1")})
        else:
            comps = {}
            for c, cr in prev.components.items():
                comps[c] = ComponentRecipe(cr.method, [Member(m.model, m.weight) for m in cr.members], cr.anchor, dict(cr.alpha))
            c = rng.choice(["unet", "te0"])
            cr = comps[c]
            if kind == "flip":
                n = rng.choice(names)
                if any(m.model == n for m in cr.members) and len(cr.members) > 1:
                    cr.members = [m for m in cr.members if m.model != n]
                elif not any(m.model == n for m in cr.members):
                    cr.members.append(Member(n, 1.0))
            elif kind == "weight":
                rng.choice(cr.members).weight = rng.choice([0.5, 1.5, 3.0])
            elif kind == "alpha":
                cr.alpha = {b: rng.uniform(0.2, 1.0) for b in cr.alpha}
            else:
                cr.anchor = rng.choice([None, "base", names[0]])
        recipe = Recipe(models=models, base="base", components=comps)
        a = CollectSink()
        stats = inc.merge(recipe, a)
        kinds.append(kind)
        if kind == "alpha":
            assert stats.tensors_read == 0, step  # anchor and ensemble sums are cached
        if prev is not None and kind in ("flip", "weight"):
            assert len(stats.models_read) <= 1, (step, stats.models_read)
        b = CollectSink()
        merge(recipe, b, out_dtype=torch.float32, components=stats.components or ["unet"])
        if stats.components:
            _same(a, b, step)
        prev = recipe
    assert {"flip", "weight", "alpha", "anchor"} <= set(kinds)
    inc.close()


def test_incremental_reads_only_the_changed_model(pool5):
    models = {p.stem: str(p) for p in pool5.models}
    names = list(models)

    def mk(unet_members):
        return Recipe(models=models, components={
            "unet": ComponentRecipe("weighted_average", [Member(n) for n in unet_members]),
            **{c: ComponentRecipe("weighted_average", [Member(n) for n in names]) for c in ("te0", "vae")}})

    inc = IncrementalMerger(device="cpu", out_dtype=torch.float16)
    first = inc.merge(mk(names), NullSink())
    assert first.models_read == set(names) and sorted(inc.last_changed) == ["te0", "unet", "vae"]
    flip = inc.merge(mk(names[1:]), NullSink())
    assert inc.last_changed == ["unet"] and flip.components == ["unet"]
    assert flip.models_read == {names[0]}
    assert 0 < flip.tensors_read < first.tensors_read / 5  # one of five models, UNet keys only
    same = inc.merge(mk(names[1:]), NullSink())
    assert same.keys == 0 and same.tensors_read == 0 and inc.last_changed == []
    forced = inc.merge(mk(names[1:]), CollectSink(), force=True)
    assert sorted(forced.components) == ["te0", "unet", "vae"] and forced.tensors_read == 0
    back = CollectSink()
    inc.merge(mk(names), back)
    ref = CollectSink()
    merge(mk(names), ref, out_dtype=torch.float16, components=["unet"])
    _same(back, ref, "flip back")


def test_budget_too_small_falls_back_to_from_scratch(pool5):
    models = {p.stem: str(p) for p in pool5.models}
    names = list(models)
    mk = lambda ms: Recipe(models=models, components={"unet": ComponentRecipe("weighted_average", [Member(n) for n in ms])})
    inc = IncrementalMerger(device="cpu", out_dtype=torch.float32, budget_bytes=1024)
    inc.merge(mk(names), NullSink())
    assert inc.used_bytes() <= 1024
    a = CollectSink()
    s = inc.merge(mk(names[:2]), a)
    assert s.models_read == set(names[:2])  # no sums cached: the new recipe is merged from scratch
    b = CollectSink()
    merge(mk(names[:2]), b, out_dtype=torch.float32, components=["unet"])
    _same(a, b, "fallback")


def test_pairwise_alpha_changes_read_nothing(pool5):
    models = {p.stem: str(p) for p in pool5.models}
    inc = IncrementalMerger(device="cpu", out_dtype=torch.float32)
    for i in range(3):
        r = Recipe(models=models, components={"unet": ComponentRecipe(
            "add_difference", [Member("m00"), Member("m01"), Member("m02")], alpha={"M00": 0.1 * i}, alpha_default=0.5)})
        a = CollectSink()
        s = inc.merge(r, a)
        assert s.tensors_read == (0 if i else s.tensors_read) and (i or s.tensors_read > 0)
        b = CollectSink()
        merge(r, b, out_dtype=torch.float32, components=["unet"])
        _same(a, b, i)


@pytest.mark.parametrize("chunk", [None, 64], ids=["whole", "chunked"])
def test_incremental_nan_policy_matches_from_scratch(tmp_path, monkeypatch, chunk):
    if chunk:
        import astolfo_opt.merge.execute as execute

        monkeypatch.setattr(execute, "_CHUNK", chunk)
    from astolfo_opt.errors import NonFiniteError
    from astolfo_opt.testing.factory import ModelSpec, make_checkpoint

    key = "model.diffusion_model.middle_block.1.proj_in.weight"
    paths = {f"g{i}": make_checkpoint(tmp_path / f"g{i}.safetensors", ModelSpec(seed=i + 1)) for i in range(2)}
    paths["bad"] = make_checkpoint(tmp_path / "bad.safetensors", ModelSpec(seed=9, corrupt={key: "nan"}))
    models = {n: str(p) for n, p in paths.items()}

    def mk(names, policy):
        return Recipe(models=models, nan_policy=policy,
                      components={"unet": ComponentRecipe("weighted_average", [Member(n) for n in names])})

    inc = IncrementalMerger(device="cpu", out_dtype=torch.float32)
    inc.merge(mk(["g0", "g1"], "drop_model"), NullSink())
    for names in (["g0", "g1", "bad"], ["g0", "bad"], ["g1"], ["g0", "g1", "bad"]):
        a, b = CollectSink(), CollectSink()
        inc.merge(mk(names, "drop_model"), a)
        merge(mk(names, "drop_model"), b, out_dtype=torch.float32, components=["unet"])
        _same(a, b, names)
        assert torch.isfinite(a.tensors[key]).all()
    with pytest.raises(NonFiniteError, match=f"bad: tensor {key}"):
        IncrementalMerger(device="cpu").merge(mk(["g0", "bad"], "error"), NullSink())


def test_recipes_naming_different_subsets_keep_the_caches(pool5):
    """The search's recipes list only the models they use, so ``recipe.models`` differs from trial to trial. Dropping
    one UNet member must still read only that model, and leave te0 / vae (same recipe) un-emitted."""
    names = [p.stem for p in pool5.models]
    paths = {p.stem: str(p) for p in pool5.all}

    def recipe(unet: list[str]) -> Recipe:
        te0 = names[:3]
        used = ["base", *sorted(set(unet) | set(te0))]
        return Recipe(models={n: paths[n] for n in used}, base="base",
                      components={"unet": ComponentRecipe("weighted_average", [Member(n, 1.0) for n in unet], anchor="base",
                                                          alpha={"IN01": 0.5}),
                                  "te0": ComponentRecipe("weighted_average", [Member(n, 1.0) for n in te0])})

    inc = IncrementalMerger(device="cpu", out_dtype=torch.float32)
    first = recipe(names)
    inc.merge(first, NullSink())
    second = recipe(names[:-1])  # the last model leaves the recipe's model list entirely
    assert names[-1] not in second.models
    got = CollectSink()
    stats = inc.merge(second, got)
    assert stats.components == ["unet"], stats.components
    assert stats.models_read == {names[-1]}, stats.models_read  # subtracted from the cached sum, nothing else read
    want = CollectSink()
    merge(second, want, out_dtype=torch.float32, components=["unet"])
    _same(got, want, "subset")
    inc.close()
