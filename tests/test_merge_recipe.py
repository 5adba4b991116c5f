"""Recipes as data: YAML / JSON round trip, canonical hashes, validation errors (no model files needed)."""

from __future__ import annotations

import json

import pytest

from astolfo_opt.errors import ConfigError
from astolfo_opt.merge.recipe import ComponentRecipe, Member, Recipe


def _recipe() -> Recipe:
    return Recipe(models={"a": "/x/a.safetensors", "b": "/x/b.safetensors", "c": "/x/c.safetensors"}, base="a", components={
        "unet": ComponentRecipe("weighted_average", [Member("a", 1), Member("b", 2.5)], anchor="c", alpha={"IN00": 0.3, "M00": 0.7}),
        "te0": ComponentRecipe("weighted_sum", [Member("a"), Member("b")], alpha_default=0.4),
        "vae": ComponentRecipe("add_difference", [Member("a"), Member("b"), Member("c")], alpha_default=0.5),
        "te1": ComponentRecipe("weighted_average", [Member("a"), Member("b")], block_weights={"b": {"BASE": 0.25}}),
    })


def test_yaml_and_json_round_trip_keep_content_and_hash():
    r = _recipe()
    for back in (Recipe.from_yaml(r.to_yaml()), Recipe.from_json(r.to_json())):
        assert back.to_dict() == r.to_dict()
        assert back.hash() == r.hash()
        assert all(back.component_hash(c) == r.component_hash(c) for c in ("unet", "te0", "te1", "vae"))
    assert json.loads(r.to_json())["components"]["unet"]["anchor"] == "c"


def test_hash_ignores_key_order_and_number_spelling():
    r = _recipe()
    d = r.to_dict()
    shuffled = Recipe.from_dict({k: d[k] for k in reversed(list(d))})
    shuffled.models = dict(reversed(list(r.models.items())))
    shuffled.components = dict(reversed(list(shuffled.components.items())))
    assert shuffled.hash() == r.hash()
    ints = Recipe.from_yaml(r.to_yaml().replace("weight: 1.0", "weight: 1"))
    assert ints.hash() == r.hash()
    # members of a weighted average are a set: their order does not define the result
    swapped = Recipe.from_dict(r.to_dict())
    swapped.components["unet"].members.reverse()
    assert swapped.hash() == r.hash()


def test_component_hash_tracks_what_defines_each_component():
    r = _recipe()
    r2 = Recipe.from_dict(r.to_dict())
    r2.components["unet"].alpha["M00"] = 0.71
    assert r2.hash() != r.hash()
    assert r2.component_hash("unet") != r.component_hash("unet")
    assert all(r2.component_hash(c) == r.component_hash(c) for c in ("te0", "te1", "vae"))
    moved = Recipe.from_dict(r.to_dict())
    moved.models["b"] = "/elsewhere/b.safetensors"  # a different file is a different model
    assert moved.component_hash("te0") != r.component_hash("te0")
    policy = Recipe.from_dict(r.to_dict())
    policy.nan_policy = "drop_model"
    assert policy.component_hash("unet") != r.component_hash("unet") and policy.hash() != r.hash()
    weight = Recipe.from_dict(r.to_dict())
    weight.components["te1"].block_weights["b"]["BASE"] = 0.5
    assert weight.component_hash("te1") != r.component_hash("te1") and weight.component_hash("unet") == r.component_hash("unet")


@pytest.mark.parametrize("mutate, needle", [
    (lambda r: r.components["unet"].members.append(Member("zz")), "not listed in recipe.models"),
    (lambda r: setattr(r.components["te0"], "method", "slerp"), "is not one of"),
    (lambda r: r.components["vae"].members.pop(), "takes exactly 3 members"),
    (lambda r: setattr(r, "nan_policy", "ignore"), "nan_policy"),
    (lambda r: setattr(r, "base", "nobody"), "recipe.base"),
    (lambda r: setattr(r, "time_embed_block", "OUT00"), "IN00 or BASE"),
    (lambda r: r.components.__setitem__("clip", ComponentRecipe(members=[Member("a")])), "unknown component"),
])
def test_validation_errors_are_one_line_config_errors(mutate, needle):
    r = _recipe()
    r.validate()
    mutate(r)
    with pytest.raises(ConfigError, match=needle) as e:
        r.validate()
    assert "\n" not in str(e.value)


def test_load_resolves_relative_paths_and_reports_bad_files(tmp_path):
    (tmp_path / "r.yaml").write_text(Recipe(models={"a": "a.safetensors"}).to_yaml())
    assert Recipe.load(tmp_path / "r.yaml").models["a"] == str(tmp_path / "a.safetensors")
    (tmp_path / "bad.yaml").write_text("models: [unclosed")
    with pytest.raises(ConfigError, match="not a valid recipe"):
        Recipe.load(tmp_path / "bad.yaml")
    with pytest.raises(ConfigError, match="recipe file not found"):
        Recipe.load(tmp_path / "missing.yaml")
