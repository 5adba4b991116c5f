"""``astolfo-opt world check``: the properties that make the world a fair test of a merge search, measured.

Thresholds are fixed here, before measuring (:data:`THRESHOLDS`); the check reports every number, not only pass or
fail. Chance for the judge (every attribute right) is 1/48.

1. ``base_accuracy``: the base draws the world's prompts far above chance.
2. ``finetune_gain`` / ``finetune_forgets``: every finetune beats the base on its own concepts (its colour and shape,
   on every background, 12 seeds each) and loses to the base on the colour it forgot.
3. ``uniform_vs_good``: the uniform merge of every usable model (outliers, the pruned file and the copied text
   encoder included; the NaN file is not usable) is worse than the merge of base + finetunes, and
   ``drop_outliers`` (the uniform merge minus the outliers) is better than the uniform merge.
4. ``spearman``: across random inclusion recipes the objective (CLIP + aesthetic, as the study computes it) and
   judge accuracy on the same renders rank-correlate; the recipes where they disagree most are listed.
5. ``deterministic``: rendering a merge twice (with another merge swapped in between) gives identical bytes.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from astolfo_opt.merge.recipe import ComponentRecipe, Member, Recipe
from astolfo_opt.render.prompts import Prompt
from astolfo_opt.render.settings import RenderSettings
from astolfo_opt.world import concepts as C
from astolfo_opt.world.build import RENDER, load_world, study_concepts, world_scorer_config

THRESHOLDS = {"base_accuracy": 0.25, "finetune_gain": 0.05, "finetune_forgets": 0.10, "uniform_vs_good": 0.10,
              "drop_outliers": 0.05, "spearman": 0.5, "recipes": 30}
EVAL_SEED0 = 9000


@dataclass
class Property:
    name: str
    value: float
    threshold: float
    passed: bool
    detail: dict[str, Any] = field(default_factory=dict)


class WorldEval:
    """A resident pipeline on the world's base, the judge and the study objective: merge, render, judge, score."""

    def __init__(self, out: str | Path, device: str = "cpu"):
        from astolfo_opt.render.pipeline import build_pipeline
        from astolfo_opt.world.judge import load_judge
        from scorers.registry import build_objective

        self.out = Path(out)
        self.doc = load_world(self.out)
        self.pool = {Path(rel).stem: str(self.out / rel) for rel, info in self.doc["files"].items() if rel.startswith("pool/")}
        self.pipe = build_pipeline(self.pool["base"], device=device)
        self.judge_net = load_judge(self.out / "judge" / "judge.safetensors")
        self.objective = build_objective(world_scorer_config(self.out))
        self.settings = RenderSettings(**RENDER, batch_size=16)
        self.device = device

    @property
    def usable(self) -> list[str]:
        return [n for n in self.pool if self.doc["faults"].get(n) != "nan"]

    def roles(self) -> dict[str, str]:
        return {Path(rel).stem: info.get("role", "") for rel, info in self.doc["files"].items() if rel.startswith("pool/")}

    def recipe(self, unet: list[str], te0: list[str] | None = None) -> Recipe:
        te0 = unet if te0 is None else te0
        comps = {"unet": ComponentRecipe("weighted_average", [Member(m) for m in unet]),
                 "te0": ComponentRecipe("weighted_average", [Member(m) for m in te0]),
                 "vae": ComponentRecipe("copy", [Member("base")])}
        return Recipe(models=dict(self.pool), components=comps, base="base", arch="sd1")

    def load(self, recipe: Recipe) -> None:
        from astolfo_opt.merge.kernel import merge

        merge(recipe, self.pipe.swap_sink(), device=self.device, out_dtype="fp16")

    def render(self, prompts: list[Prompt]):
        return self.pipe.render(prompts, self.settings)

    def accuracy(self, recipe: Recipe, prompts: list[Prompt]) -> float:
        from astolfo_opt.world.judge import judge

        self.load(recipe)
        return judge(self.judge_net, self.render(prompts), [p.prompt for p in prompts])["accuracy"]

    def score(self, recipe: Recipe, prompts: list[Prompt]) -> tuple[float, float, dict[str, float]]:
        """(objective, judge accuracy, per-scorer means) on the same renders."""
        from astolfo_opt.world.judge import judge

        self.load(recipe)
        images = self.render(prompts)
        texts = [p.prompt for p in prompts]
        res = self.objective.evaluate(images, texts)
        per = {k: sum(v) / len(v) for k, v in res.per_scorer.items()}
        return res.value, judge(self.judge_net, images, texts)["accuracy"], per


def prompts_for(concepts: list[C.Concept], seeds: int = 1, seed0: int = EVAL_SEED0) -> list[Prompt]:
    return [Prompt(c.prompt, "", seed0 + 10 * i + j) for i, c in enumerate(concepts) for j in range(seeds)]


def check_world(out: str | Path, *, recipes: int = THRESHOLDS["recipes"], seed: int = 0, log=print) -> list[Property]:
    ev = WorldEval(out)
    doc = ev.doc
    train, _ = C.split_heldout(C.all_concepts())
    props: list[Property] = []
    eval_all = prompts_for(train)
    base_acc = ev.accuracy(ev.recipe(["base"]), eval_all)
    props.append(Property("base_accuracy", base_acc, THRESHOLDS["base_accuracy"], base_acc >= THRESHOLDS["base_accuracy"],
                          {"images": len(eval_all), "chance": 1 / 48}))
    log(f"base judge accuracy {base_acc:.2f} over {len(eval_all)} training prompts (chance {1 / 48:.2f})")
    roles = ev.roles()
    fts = [n for n, r in roles.items() if r == "finetune"]
    gains, losses, rows = [], [], {}
    for name in fts:
        info = doc["files"][f"pool/{name}.safetensors"]
        own = prompts_for([c for c in train if c.colour == info["colour"] and c.shape == info["shape"]], 12, EVAL_SEED0 + 1)
        forgot = prompts_for([c for c in train if c.colour == info["forgets"]], 2, EVAL_SEED0 + 2)
        b_own, b_forgot = ev.accuracy(ev.recipe(["base"]), own), ev.accuracy(ev.recipe(["base"]), forgot)
        f_own, f_forgot = ev.accuracy(ev.recipe([name]), own), ev.accuracy(ev.recipe([name]), forgot)
        gains.append(f_own - b_own)
        losses.append(b_forgot - f_forgot)
        rows[name] = {"own": f"{info['colour']} {info['shape']}", "forgets": info["forgets"], "base_own": b_own, "own_acc": f_own,
                      "base_forgotten": b_forgot, "forgotten_acc": f_forgot, "text_encoder_trained": info["train_text"]}
        log(f"{name}: own concepts ({info['colour']} {info['shape']}) {b_own:.2f} -> {f_own:.2f}; "
            f"forgotten {info['forgets']} {b_forgot:.2f} -> {f_forgot:.2f}")
    props.append(Property("finetune_gain", min(gains), THRESHOLDS["finetune_gain"], min(gains) >= THRESHOLDS["finetune_gain"], rows))
    props.append(Property("finetune_forgets", min(losses), THRESHOLDS["finetune_forgets"],
                          min(losses) >= THRESHOLDS["finetune_forgets"], {}))
    usable = ev.usable
    outliers = list(doc["outliers"])
    good = ["base", *fts]
    uni = ev.accuracy(ev.recipe(usable), eval_all)
    good_acc = ev.accuracy(ev.recipe(good), eval_all)
    no_out = ev.accuracy(ev.recipe([m for m in usable if m not in outliers]), eval_all)
    detail = {"uniform": uni, "good_subset": good_acc, "uniform_without_outliers": no_out, "usable": usable, "good": good}
    props.append(Property("uniform_vs_good", good_acc - uni, THRESHOLDS["uniform_vs_good"],
                          good_acc - uni >= THRESHOLDS["uniform_vs_good"], detail))
    props.append(Property("drop_outliers", no_out - uni, THRESHOLDS["drop_outliers"], no_out - uni >= THRESHOLDS["drop_outliers"], {}))
    log(f"uniform merge of {len(usable)} usable models {uni:.2f}; base + finetunes {good_acc:.2f}; uniform without outliers {no_out:.2f}")
    rng = random.Random(seed)
    study = prompts_for(study_concepts(train), 2, EVAL_SEED0 + 3)
    pts = []
    for _ in range(recipes):
        pick = lambda: [m for m in usable if rng.random() < 0.5] or [rng.choice(usable)]  # noqa: E731
        u, t = pick(), pick()
        obj, acc, per = ev.score(ev.recipe(u, t), study)
        pts.append({"unet": u, "te0": t, "objective": obj, "judge": acc, **per})
    from scipy.stats import rankdata, spearmanr

    obj, acc = [p["objective"] for p in pts], [p["judge"] for p in pts]
    rho = float(spearmanr(obj, acc).statistic)
    gap = abs(rankdata(obj) - rankdata(acc))  # average ranks for ties, as Spearman's rho uses them
    worst = [pts[i] for i in sorted(range(len(pts)), key=lambda i: -gap[i])[:3]]
    props.append(Property("spearman", rho, THRESHOLDS["spearman"], rho >= THRESHOLDS["spearman"],
                          {"recipes": pts, "disagree_most": worst}))
    log(f"objective vs judge over {recipes} random recipes: Spearman {rho:.2f}")
    rec = ev.recipe(good)
    ev.load(rec)
    a = [im.tobytes() for im in ev.render(study[:6])]
    ev.load(ev.recipe(usable))
    ev.render(study[:2])
    ev.load(rec)
    b = [im.tobytes() for im in ev.render(study[:6])]
    props.append(Property("deterministic", float(a == b), 1.0, a == b, {"images": len(a)}))
    return props

