"""A simulated reviewer for tests and ``bench_review.py``: a hidden taste that clicks through optuna-dashboard's API.

The taste is the world's judge, seen through a weighting of its attributes that the automatic objective (CLIP tower +
aesthetic head) does not know: ``taste(trial) = weighted mean over the study's images of sum_a h_a * [attribute a
drawn as asked]``, with ``h`` normalised to sum 1. ``h = (1, 1, 1)`` is "draws what it is asked", ``(0.1, 0.8, 0.1)``
a person who mostly cares about shapes; a focus counts the images of one colour or background 5x (a mixer who makes
a model for blue things). Each candidate's images are the trial's own (its recipe merged into a resident
pipeline on the world's base and rendered on the study's prompts and seeds, bit for bit what the grid shows).

The reviewer answers one round at a time the way a person would through the page: it reads which grids the page
shows (``Review.on_screen``, the dashboard's study API), and posts "this one is worst" (``ChooseWorst``) through the
same endpoint the page posts to. When every grid on screen is equally good to it, it skips one, as a person would.
"""

from __future__ import annotations

import json
import random
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any


class JudgedTrials:
    """The judge's per-image rows for a study's trials on a world, rendered once per trial and shared by every taste."""

    def __init__(self, world: str | Path, study: Any):
        from astolfo_opt.render.prompts import load_prompt_set
        from astolfo_opt.world.check import WorldEval

        self.ev = WorldEval(world)
        self.study = study
        self.prompts = load_prompt_set(Path(world) / "prompts.yaml").prompts
        self.cache: dict[int, list[dict[str, Any]]] = {}

    def rows(self, number: int) -> list[dict[str, Any]]:
        if number not in self.cache:
            from astolfo_opt.search.space import spec_to_recipe
            from astolfo_opt.world.judge import judge

            self.ev.load(spec_to_recipe(json.loads(self.study.trials[number].user_attrs["recipe"])))
            self.cache[number] = judge(self.ev.judge_net, self.ev.render(self.prompts), [p.prompt for p in self.prompts])["rows"]
        return self.cache[number]


class WorldTaste:
    """taste(trial number): the judge's rows through hidden attribute weights and an optional focus."""

    def __init__(self, judged: JudgedTrials, weights: Mapping[str, float], focus: Mapping[str, Any] | None = None):
        self.judged = judged
        total = sum(weights.values())
        self.h = {a: float(w) / total for a, w in weights.items()}
        self.focus = dict(focus or {})  # {"attribute": "colour", "value": "blue", "factor": 5}: those images count 5x

    def __call__(self, number: int) -> float:
        rows = self.judged.rows(number)
        weights = [self._weight(r["prompt"]) for r in rows]
        return sum(w * sum(self.h[a] * r["correct"][a] for a in self.h) for w, r in zip(weights, rows, strict=True)) / sum(weights)

    def _weight(self, prompt: str) -> float:
        if not self.focus:
            return 1.0
        from astolfo_opt.world.concepts import parse_prompt

        c = parse_prompt(prompt)
        return float(self.focus["factor"]) if c is not None and c.attributes()[self.focus["attribute"]] == self.focus["value"] else 1.0


def answer_round(review: Any, taste: Any, rng: random.Random, tie: float = 1e-9) -> str:
    """One round through the page's API: mark the worst shown grid (a tie for worst is broken at random, as a person
    forced to click one would), or skip one when the taste cannot tell any of them apart."""
    review.refill()
    shown = review.on_screen()
    values = {s["number"]: taste(s["source_trial"]) for s in shown}
    low = min(values.values())
    if max(values.values()) - low <= tie:
        victim = max(shown, key=lambda s: s["number"])  # the newest: it has been compared least
        review.api.skip(review.study_id, victim["trial_id"])
        return "skip"
    worst = rng.choice(sorted(n for n, v in values.items() if v - low <= tie))
    review.api.choose_worst(review.study_id, list(values), worst)
    return "worst"


def rounds_to_beat(review: Any, taste: Any, max_rounds: int = 60, seed: int = 0) -> dict[str, Any]:
    """Answer until the calibrated top-1 beats the automatic top-1 on the taste. Returns the rounds used (``None`` when
    it never did, or when the automatic top-1 is already the taste's best candidate), with the figures."""
    auto = review.candidates[0].number
    best = max(taste(c.number) for c in review.candidates)
    out: dict[str, Any] = {"auto_top": auto, "auto_taste": taste(auto), "best_taste": best, "rounds": None, "skips": 0,
                           "candidates": len(review.candidates)}
    if taste(auto) >= best:
        out["reason"] = "the automatic top-1 is already the taste's best candidate"
        return out
    rng = random.Random(seed)
    for r in range(1, max_rounds + 1):
        out["skips"] += answer_round(review, taste, rng) == "skip"
        top = review.ranking(review.calibrate())[0]
        if taste(top) > taste(auto):
            out.update(rounds=r, calibrated_top=top, calibrated_taste=taste(top))
            return out
    out["reason"] = f"not within {max_rounds} rounds"
    return out


def tastes() -> dict[str, dict[str, Any]]:
    """The hidden tastes, fixed before any measurement (none is picked or tuned on results): the judge as is; each
    attribute emphasised (0.8 against 0.1 and 0.1); each colour and each background counted 5x (a mixer who makes a
    model for blue things, or for white backgrounds)."""
    from astolfo_opt.world.concepts import ATTRIBUTES

    even = dict.fromkeys(ATTRIBUTES, 1.0)
    out: dict[str, dict[str, Any]] = {"judge": {"weights": even}}
    for a in ATTRIBUTES:
        out[f"{a}s"] = {"weights": {b: (0.8 if b == a else 0.1) for b in ATTRIBUTES}}
    for a in ("colour", "background"):
        for v in ATTRIBUTES[a]:
            out[v] = {"weights": even, "focus": {"attribute": a, "value": v, "factor": 5}}
    return out


def median(xs: Sequence[float]) -> float:
    s = sorted(xs)
    n = len(s)
    return s[n // 2] if n % 2 else 0.5 * (s[n // 2 - 1] + s[n // 2])
