"""A calibrated objective: the automatic scorers' per-prompt scores, re-weighted by a few human choices.

Why per prompt and per scorer: the study already records, for every trial, each scorer's raw score on each prompt
(``per_prompt`` rows). A person who marks the worst of a few grids tells us which of those numbers they agree with:
"the aesthetic head likes this tidy grid, but it drew the wrong thing" moves weight from ``aesthetic`` to ``clip``;
"I care about the blue prompts" moves weight to the blue prompts' rows. So the calibrated objective keeps the form of
the automatic one (:class:`scorers.objectives.Objective`, single objective)::

    value = mean over rows r of  sum_k W[prompt_r, k] * sign_k * norm_k(raw_rk)

with one weight per (prompt, scorer) where the automatic objective has one per scorer. Rows whose prompt the
calibration has not seen use the scorer's mean calibrated weight.

The weights are the MAP of a Bradley-Terry model over the reviewed trials, ``P(a beats b) = sigmoid(s * (v_a - v_b))``,
with a Gaussian prior on each weight's relative change from the automatic weight (strength ``prior``) and weights kept
>= 0: with no answers the calibrated ranking is the automatic one, and every answer moves it only as far as the
evidence asks. ``s`` makes one standard deviation of the candidates' automatic values worth odds of e:1, so the
fit means the same on every objective scale.

Re-scoring needs no rendering: a finished study's trials are re-scored from their stored rows
(:func:`rescore_rows`), which is how ``search objective.calibration=FILE`` continues a study.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from astolfo_opt.errors import ConfigError

FORMAT = "astolfo-opt/calibration-v1"
DEFAULT_PRIOR = 0.1


@dataclass(frozen=True)
class ObjectiveForm:
    """What a single-objective study optimised: scorer order, weights, directions and normalisations (the study's
    ``objective`` user attribute), i.e. the prior of a calibration."""

    scorers: tuple[str, ...]
    weights: dict[str, float]
    signs: dict[str, float]
    normalisation: dict[str, dict[str, Any]]

    @classmethod
    def of_objective(cls, objective: Any) -> ObjectiveForm:
        """From a built :class:`scorers.objectives.Objective`."""
        names = tuple(s.name for s in objective.scorers)
        return cls(names, {n: float(objective.weights[n]) for n in names},
                   {s.name: (-1.0 if s.direction == "minimize" else 1.0) for s in objective.scorers},
                   {n: asdict(objective.normalisation[n]) for n in names})

    @classmethod
    def of_study(cls, attrs: Mapping[str, Any], study: str) -> ObjectiveForm:
        """From a study's ``objective`` user attribute; one line naming what is missing otherwise."""
        obj = attrs.get("objective") or {}
        if len(obj.get("names") or []) != 1:
            raise ConfigError(f"study {study!r} is {'multi-objective' if obj.get('names') else 'not an astolfo-opt study'}: "
                              "review calibrates one combined objective (search with scorer.multi=false)")
        if "weights" not in obj or "normalisation" not in obj:
            raise ConfigError(f"study {study!r} does not record its objective's weights (made before review existed): "
                              "run a new study to review it")
        return cls(tuple(obj["scorers"]), {k: float(v) for k, v in obj["weights"].items()},
                   {k: float(v) for k, v in obj.get("signs", dict.fromkeys(obj["scorers"], 1.0)).items()},
                   dict(obj["normalisation"]))

    def as_attr(self) -> dict[str, Any]:
        return {"scorers": list(self.scorers), "weights": self.weights, "signs": self.signs, "normalisation": self.normalisation}

    def norm(self, scorer: str, raw: float) -> float:
        from scorers.objectives import Normalisation

        return self.signs[scorer] * Normalisation.parse(self.normalisation.get(scorer), scorer).apply(float(raw))


def prompt_features(rows: Sequence[Mapping[str, Any]], form: ObjectiveForm) -> dict[str, dict[str, float]]:
    """Per prompt, per scorer: the mean signed, normalised score over the rows (seeds) of that prompt."""
    acc: dict[str, dict[str, list[float]]] = {}
    for r in rows:
        per = acc.setdefault(str(r["prompt"]), {k: [] for k in form.scorers})
        for k in form.scorers:
            if k in r["scores"]:
                per[k].append(form.norm(k, r["scores"][k]))
    return {p: {k: (sum(v) / len(v) if v else 0.0) for k, v in per.items()} for p, per in acc.items()}


@dataclass(frozen=True)
class Calibration:
    """Weights per (prompt, scorer) over a study's automatic objective (see the module docstring)."""

    form: ObjectiveForm
    prompt_weights: dict[str, dict[str, float]]
    #: where it came from: study, storage, answers, candidates, prior strength
    source: dict[str, Any] = field(default_factory=dict)

    @property
    def weights(self) -> dict[str, float]:
        """Per scorer, the mean calibrated weight over the prompts (also the weight of prompts not reviewed)."""
        n = max(len(self.prompt_weights), 1)
        return {k: sum(w[k] for w in self.prompt_weights.values()) / n if self.prompt_weights else self.form.weights[k]
                for k in self.form.scorers}

    @property
    def hash(self) -> str:
        doc = json.dumps({"form": self.form.as_attr(), "prompt_weights": self.prompt_weights}, sort_keys=True)
        return hashlib.sha256(doc.encode()).hexdigest()

    @property
    def label(self) -> str:
        """How the dashboard names a trial scored with it."""
        return f"calibrated {self.hash[:8]} ({self.source.get('answers', 0)} answers)"

    def row_value(self, row: Mapping[str, Any]) -> float:
        w = self.weights_of(str(row["prompt"]))
        return sum(w[k] * self.form.norm(k, row["scores"][k]) for k in self.form.scorers)

    def value(self, rows: Sequence[Mapping[str, Any]]) -> float:
        vals = [self.row_value(r) for r in rows]
        return sum(vals) / len(vals) if vals else float("nan")

    def check_scorers(self, scorers: Sequence[str]) -> None:
        if tuple(scorers) != self.form.scorers:
            raise ConfigError(f"calibration {self.source.get('file', '')} was fitted on scorers {list(self.form.scorers)}, "
                              f"the objective has {list(scorers)}: use the scorer config the reviewed study used")

    def to_json(self) -> dict[str, Any]:
        return {"format": FORMAT, "hash": self.hash, "weights": self.weights, "form": self.form.as_attr(),
                "prompt_weights": self.prompt_weights, "source": self.source}

    def save(self, path: str | Path) -> Path:
        from astolfo_opt.checkpoint.writer import atomic_write_text

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(self.to_json(), indent=1, sort_keys=True) + "\n")
        return path

    @classmethod
    def from_json(cls, doc: Mapping[str, Any]) -> Calibration:
        """Inverse of :meth:`to_json` (``ValueError`` / ``KeyError`` / ``TypeError`` on a malformed document)."""
        if doc.get("format") != FORMAT:
            raise ValueError(f"format {doc.get('format')!r}, expected {FORMAT}")
        f = doc["form"]
        form = ObjectiveForm(tuple(f["scorers"]), f["weights"], f["signs"], f["normalisation"])
        pw = {str(p_): {k: float(w[k]) for k in form.scorers} for p_, w in doc["prompt_weights"].items()}
        return cls(form, pw, dict(doc.get("source", {})))

    @classmethod
    def load(cls, path: str | Path) -> Calibration:
        p = Path(str(path)).expanduser()
        if not p.is_file():
            raise ConfigError(f"calibration file not found: {p} (write one with `astolfo-opt review`; key objective.calibration)")
        try:
            cal = cls.from_json(json.loads(p.read_text()))
        except (ValueError, KeyError, TypeError) as e:
            raise ConfigError(f"calibration file {p} is not an astolfo-opt calibration ({e}); write it with `astolfo-opt review`") from None
        cal.source["file"] = str(p)
        return cal

    def weights_of(self, prompt: str) -> dict[str, float]:
        return self.prompt_weights.get(prompt) or self.weights

    def features_value(self, features: Mapping[str, Mapping[str, float]]) -> float:
        """The calibrated value of a trial from its :func:`prompt_features` (each prompt counted once)."""
        vals = [sum(self.weights_of(p)[k] * v for k, v in fk.items()) for p, fk in features.items()]
        return sum(vals) / len(vals) if vals else float("nan")


def fit(form: ObjectiveForm, features: Mapping[int, Mapping[str, Mapping[str, float]]], pairs: Sequence[tuple[int, int]], *,
        prior: float = DEFAULT_PRIOR, base: Calibration | None = None, source: Mapping[str, Any] | None = None) -> Calibration:
    """MAP Bradley-Terry weights from ``pairs`` of (better, worse) trial numbers whose ``features`` (from
    :func:`prompt_features`) are known. Prompts are those every candidate has. The prior is centred at the automatic
    weights, or at ``base`` (the calibration a calibrated study was scored with, when it is reviewed again)."""
    import numpy as np
    from scipy.optimize import minimize

    if not features:
        raise ConfigError("no candidates to calibrate on")
    prompts = sorted(set.intersection(*(set(f) for f in features.values())))
    if not prompts:
        raise ConfigError("the candidates share no prompt: review trials scored on the same prompt set")
    ks = form.scorers
    numbers = sorted(features)
    idx = {n: i for i, n in enumerate(numbers)}
    x = np.array([[features[n][p][k] for p in prompts for k in ks] for n in numbers], dtype=np.float64) / len(prompts)
    w0 = np.array([(base.weights_of(p) if base else form.weights)[k] for p in prompts for k in ks], dtype=np.float64)
    v0 = x @ w0
    scale = 1.0 / max(float(np.std(v0)), 1e-6)
    used = [(idx[b], idx[w]) for b, w in pairs if b in idx and w in idx and b != w]
    src = {**dict(source or {}), "prior": prior, "pairs": len(used), "candidates": numbers, "prompts": len(prompts)}
    if not used:
        return Calibration(form, {p: {k: float(w0[i * len(ks) + j]) for j, k in enumerate(ks)} for i, p in enumerate(prompts)}, src)
    d = np.array([x[b] - x[w] for b, w in used]) * scale
    # the prior is on relative change: doubling one (prompt, scorer) weight costs prior/2 nats, as does dropping it;
    # weights stay >= 0 (a person says how much each scorer matters, not that drawing the prompt is bad)
    ref = np.maximum(np.abs(w0), 1e-3)

    def loss(w: np.ndarray) -> tuple[float, np.ndarray]:
        z = d @ w
        nll = np.logaddexp(0.0, -z).sum()
        g = -(d * (1.0 / (1.0 + np.exp(z)))[:, None]).sum(0)
        r = (w - w0) / ref
        return float(nll + 0.5 * prior * (r @ r)), g + prior * r / ref

    res = minimize(loss, w0, jac=True, method="L-BFGS-B", bounds=[(0.0, None)] * len(w0))
    w = res.x.reshape(len(prompts), len(ks))
    return Calibration(form, {p: {k: float(w[i, j]) for j, k in enumerate(ks)} for i, p in enumerate(prompts)}, src)


def rescore_rows(cal: Calibration, rows: Sequence[Mapping[str, Any]], steps: Iterable[int] = ()) -> tuple[float, dict[int, float]]:
    """(final value, running value at each of ``steps``) of a trial's stored rows under a calibration: the values a
    calibrated evaluator would have reported, without rendering again."""
    vals = [cal.row_value(r) for r in rows]

    def mean(k: int) -> float:
        return sum(vals[:k]) / k if k else float("nan")

    return mean(len(vals)), {int(s): mean(int(s)) for s in steps if 0 < int(s) <= len(vals)}


class CalibratedEvaluator:
    """Wraps an evaluator whose batches carry per-prompt rows and reports the calibrated objective instead of the
    automatic one (``rows`` keep the automatic ``values`` and gain ``calibrated``)."""

    def __init__(self, inner: Any, cal: Calibration):
        cal.check_scorers(inner.scorer_names)
        if len(inner.names) != 1:
            raise ConfigError("objective.calibration needs a single objective (scorer.multi=false)")
        self.inner = inner
        self.cal = cal
        self.names = [f"objective[{cal.hash[:8]}]"]
        self.directions = ["maximize"]
        self.scored_with = cal.label

    def __getattr__(self, name: str) -> Any:  # n_steps, scorer_names, prompt_set_hash, out_dtype, variant, ...
        return getattr(self.inner, name)

    def evaluate(self, candidate: Any, ctx: Any) -> Iterator[Any]:
        seen: list[Mapping[str, Any]] = []
        for batch in self.inner.evaluate(candidate, ctx):
            for r in batch.rows:
                r["calibrated"] = self.cal.row_value(r)
            seen += batch.rows
            batch.values = [sum(r["calibrated"] for r in seen) / len(seen)] if seen else batch.values
            yield batch

    def describe(self) -> str:
        return f"{self.inner.describe()}; scored with the {self.cal.label} objective"

    def close(self) -> None:
        self.inner.close()


def stored_rows(study: Any, trial: Any) -> list[dict[str, Any]]:
    """A trial's per-prompt rows; a cached duplicate (``cached_from``) has those of the trial it reused."""
    src = trial.user_attrs.get("cached_from")
    if src is not None:
        trial = study.trials[int(src)]
    return list(trial.user_attrs.get("per_prompt") or [])


def copy_rescored(src: Any, dst: Any, cal: Calibration) -> int:
    """Copy ``src``'s finished trials into ``dst`` with their values re-scored under ``cal`` from the stored rows
    (intermediate values too, so pruners compare like with like). Params, distributions, user attributes and the
    artifact links travel; ``rescored_from`` names the original trial and value. Returns how many were copied."""
    import optuna
    from optuna.trial import TrialState

    n = 0
    for t in src.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)):
        rows = stored_rows(src, t)
        if not rows:
            continue
        value, inter = rescore_rows(cal, rows, t.intermediate_values)
        if t.state == TrialState.COMPLETE and not math.isfinite(value):
            continue
        attrs = {**t.user_attrs, "per_prompt": rows, "scored_with": cal.label,  # numbers differ in dst: rows travel
                 "rescored_from": {"study": src.study_name, "number": t.number, "value": t.value}}
        attrs.pop("cached_from", None)
        dst.add_trial(optuna.trial.create_trial(
            state=t.state, params=t.params, distributions=t.distributions,
            value=value if t.state == TrialState.COMPLETE else None, intermediate_values=inter,
            user_attrs=attrs, system_attrs=dict(t.system_attrs)))
        n += 1
    return n
