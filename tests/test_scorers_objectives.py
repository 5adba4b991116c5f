"""Objective arithmetic (weights, normalisation, directions, multi-objective, held-out checks) on fake scorers with
known outputs, plus one-encode-per-tower behaviour of ``score_all`` on a counting fake tower."""

from __future__ import annotations

import math
from collections.abc import Sequence

import pytest
import torch

from astolfo_opt.errors import ConfigError
from scorers import Normalisation, Objective, Scorer, TowerScorer, build_objective, score_all
from scorers.base import to_floats


class Fixed:
    """Scores image i with values[i] (images are stand-ins: any objects)."""

    def __init__(self, name: str, values: Sequence[float], direction: str = "maximize"):
        self.name, self.values, self.direction, self.device = name, list(values), direction, torch.device("cpu")
        self.calls = 0

    def score(self, images, prompts):
        self.calls += 1
        return self.values[: len(images)]


class CountingTower:
    """Encodes image i as the vector [i, 1] so tower scorers can be checked by hand; counts encode calls."""

    device = torch.device("cpu")

    def __init__(self):
        self.calls = 0

    def encode_images(self, images):
        self.calls += 1
        return torch.tensor([[float(im), 1.0] for im in images])


class SumScorer(TowerScorer):
    def __init__(self, name: str, tower: CountingTower, scale: float):
        self.name, self.direction, self.tower, self.scale = name, "maximize", tower, scale

    def score_embeddings(self, image_embeds, prompts):
        return to_floats(image_embeds.sum(-1) * self.scale)


IMAGES = [0, 1, 2]
PROMPTS = ["a", "b", "c"]


def test_fake_scorer_satisfies_protocol():
    assert isinstance(Fixed("x", [1.0]), Scorer)


def test_weighted_sum_with_normalisations():
    a = Fixed("a", [1.0, 2.0, 3.0])
    b = Fixed("b", [10.0, 20.0, 60.0])
    obj = Objective([a, b], weights={"a": 2.0, "b": 0.5},
                    normalisation={"a": {"kind": "zscore", "mean": 2.0, "std": 0.5}, "b": {"kind": "minmax", "low": 10, "high": 60}})
    res = obj.evaluate(IMAGES, PROMPTS)
    za = [(v - 2.0) / 0.5 for v in (1, 2, 3)]          # -2, 0, 2
    mb = [(v - 10) / 50 for v in (10, 20, 60)]          # 0, 0.2, 1
    per_image = [2.0 * x + 0.5 * y for x, y in zip(za, mb, strict=True)]
    assert res.per_scorer == {"a": [1.0, 2.0, 3.0], "b": [10.0, 20.0, 60.0]}
    assert res.normalised["a"] == pytest.approx(za) and res.normalised["b"] == pytest.approx(mb)
    assert [r[0] for r in res.per_image] == pytest.approx(per_image)
    assert res.values == pytest.approx([sum(per_image) / 3])
    assert res.value == pytest.approx(sum(per_image) / 3)
    assert obj.names == ["objective"] and obj.directions == ["maximize"] and res.holdout == {}


def test_default_weights_and_none_normalisation_and_list_weights():
    a, b = Fixed("a", [1.0, 2.0, 3.0]), Fixed("b", [3.0, 3.0, 3.0])
    assert Objective([a, b]).evaluate(IMAGES, PROMPTS).values == pytest.approx([5.0])
    assert Objective([a, b], weights=[1.0, -1.0], normalisation="none").evaluate(IMAGES, PROMPTS).values == pytest.approx([-1.0])


def test_minimize_scorer_is_negated_in_the_sum():
    good = Fixed("good", [1.0, 1.0, 1.0])
    loss = Fixed("loss", [0.5, 0.5, 2.0], direction="minimize")
    res = Objective([good, loss]).evaluate(IMAGES, PROMPTS)
    assert res.values == pytest.approx([1.0 - 1.0])
    assert res.per_scorer["loss"] == [0.5, 0.5, 2.0]  # raw scores stay raw


def test_multi_objective_keeps_directions_and_ignores_weights():
    a = Fixed("a", [1.0, 2.0, 3.0])
    b = Fixed("b", [4.0, 4.0, 7.0], direction="minimize")
    obj = Objective([a, b], weights={"a": 5.0}, normalisation={"b": {"kind": "minmax", "low": 4, "high": 7}}, multi=True)
    assert obj.names == ["a", "b"] and obj.directions == ["maximize", "minimize"]
    res = obj.evaluate(IMAGES, PROMPTS)
    assert res.values == pytest.approx([2.0, 1.0 / 3.0])
    assert res.per_image == [pytest.approx([1.0, 0.0]), pytest.approx([2.0, 0.0]), pytest.approx([3.0, 1.0])]
    with pytest.raises(ConfigError, match="multi-objective"):
        _ = res.value


def test_holdout_scorer_and_heldout_prompts_reported_not_optimised():
    a = Fixed("a", [1.0, 2.0, 3.0])
    guard = Fixed("guard", [0.1, 0.2, 0.6])
    obj = Objective([a], holdout=[guard])
    res = obj.evaluate(IMAGES, PROMPTS)
    assert res.values == pytest.approx([2.0]) and "guard" not in res.per_scorer
    assert res.holdout == pytest.approx({"guard": 0.3})
    res = obj.evaluate(IMAGES, PROMPTS, holdout_images=[7, 8], holdout_prompts=["x", "y"])
    assert res.holdout == pytest.approx({"guard": 0.3, "heldout_prompts/objective": 1.5, "heldout_prompts/a": 1.5,
                                         "heldout_prompts/guard": 0.15})
    assert a.calls == 3 and guard.calls == 3  # once per evaluate plus once for the held-out prompt set
    with pytest.raises(ConfigError, match="both"):
        obj.evaluate(IMAGES, PROMPTS, holdout_images=[1])


def test_nan_score_propagates_to_the_objective():
    res = Objective([Fixed("a", [1.0, math.nan, 3.0])]).evaluate(IMAGES, PROMPTS)
    assert math.isnan(res.values[0])


def test_score_all_encodes_once_per_tower():
    t1, t2 = CountingTower(), CountingTower()
    s1, s2, s3 = SumScorer("s1", t1, 1.0), SumScorer("s2", t1, 10.0), SumScorer("s3", t2, -1.0)
    plain = Fixed("plain", [0.0, 0.0, 0.0])
    out = score_all([s1, s2, s3, plain], IMAGES, PROMPTS)
    assert t1.calls == 1 and t2.calls == 1 and plain.calls == 1
    assert out == {"s1": [1.0, 2.0, 3.0], "s2": [10.0, 20.0, 30.0], "s3": [-1.0, -2.0, -3.0], "plain": [0.0, 0.0, 0.0]}
    obj = Objective([s1], holdout=[s2])  # a holdout scorer on the same tower reuses the encode too
    obj.evaluate(IMAGES, PROMPTS)
    assert t1.calls == 2
    assert s1.score(IMAGES, PROMPTS) == [1.0, 2.0, 3.0] and t1.calls == 3  # standalone scoring encodes itself


def test_scorer_returning_wrong_count_is_an_error():
    with pytest.raises(ConfigError, match="returned 1 scores for 3 images"):
        score_all([Fixed("short", [1.0])], IMAGES, PROMPTS)


@pytest.mark.parametrize("spec, match", [
    ({"kind": "zscore", "mean": 1.0}, "needs std"),
    ({"kind": "zscore", "mean": 1.0, "std": 0.0}, "positive"),
    ({"kind": "minmax", "low": 2, "high": 1}, "high > low"),
    ({"kind": "rank"}, "kind 'rank'"),
    ({"kind": "zscore", "mean": 0, "std": 1, "scale": 2}, "unknown normalisation keys"),
    ("softmax", "kind 'softmax'"),
    (3, "must be none"),
])
def test_bad_normalisation_specs(spec, match):
    with pytest.raises(ConfigError, match=match):
        Normalisation.parse(spec, "normalisation.a")


def test_bad_objective_configs():
    a = Fixed("a", [1.0, 2.0, 3.0])
    with pytest.raises(ConfigError, match="unknown scorers"):
        Objective([a], weights={"b": 1.0})
    with pytest.raises(ConfigError, match="unknown scorers"):
        Objective([a], normalisation={"b": "none"})
    with pytest.raises(ConfigError, match="finite"):
        Objective([a], weights={"a": math.inf})
    with pytest.raises(ConfigError, match="2 weights for 1"):
        Objective([a], weights=[1.0, 2.0])
    with pytest.raises(ConfigError, match="unique"):
        Objective([a], holdout=[Fixed("a", [0.0])])
    with pytest.raises(ConfigError, match="direction"):
        Objective([Fixed("up", [1.0], direction="up")])
    with pytest.raises(ConfigError, match="at least one"):
        Objective([])


def test_build_objective_config_errors():
    with pytest.raises(ConfigError, match="scorers:"):
        build_objective({"weights": {}})
    with pytest.raises(ConfigError, match="unknown keys"):
        build_objective({"scorers": {}, "weigths": {}})
    with pytest.raises(ConfigError, match="empty"):
        build_objective({"scorers": {"clip": None}})
    with pytest.raises(ConfigError, match=r"scorer.scorers.clip must be a scorer config"):
        build_objective({"scorers": {"clip": "yes"}})


def test_build_objective_from_targets_on_fake_scorers():
    cfg = {"scorers": {"a": {"_target_": f"{__name__}.make_fixed", "values": [1.0, 2.0, 3.0]},
                       "b": {"_target_": f"{__name__}.make_fixed", "values": [3.0, 2.0, 1.0], "direction": "minimize"}},
           "holdout": {"h": {"_target_": f"{__name__}.make_fixed", "values": [9.0, 9.0, 9.0]}},
           "weights": {"a": 1.0, "b": 2.0}, "multi": False}
    obj = build_objective(cfg)
    assert [s.name for s in obj.scorers] == ["a", "b"] and [s.name for s in obj.holdout] == ["h"]
    res = obj.evaluate(IMAGES, PROMPTS)
    assert res.values == pytest.approx([2.0 - 2.0 * 2.0]) and res.holdout == {"h": 9.0}


def make_fixed(values: list[float], name: str = "fixed", direction: str = "maximize") -> Fixed:
    """Importable factory so the registry's ``_target_`` path can build fake scorers."""
    return Fixed(name, values, direction)
