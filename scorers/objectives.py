"""Turn per-image scores from several scorers into the value(s) the search optimises.

Normalisation (per scorer, applied to its raw per-image scores before weighting):

* ``none``: the raw score.
* ``zscore``: ``(s - mean) / std`` with a *fixed* reference ``mean`` / ``std`` given in the config (e.g. measured on
  the base model's images). Fixed, not per-batch, so a value means the same thing in every trial.
* ``minmax``: ``(s - low) / (high - low)`` with given bounds; not clipped, so scores outside the bounds stay visible.

Single objective (``multi=False``): ``value = sum_k w_k * sign_k * norm_k(s_k)``, averaged over the images, with
``sign_k = -1`` for a ``minimize`` scorer, so the combined objective is always ``maximize``.

Multi-objective (``multi=True``): one value per scorer, ``norm_k(s_k)`` averaged over images (weights are ignored,
normalisation keeps each scorer's own direction), for Optuna's multi-objective samplers; ``Objective.directions``
lists the directions in the same order.

Held-out check: ``holdout`` scorers are scored on the same images and reported in ``ObjectiveResult.holdout`` (by
name) but never enter ``values``; a held-out prompt set rendered by the caller can be passed to
:meth:`Objective.evaluate` as ``holdout_images`` / ``holdout_prompts`` and its objective value(s) and holdout-scorer
means are reported there too (keys prefixed ``heldout_prompts/``). A winner that games one scorer shows up as a
gap between the objective and these numbers.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from astolfo_opt.errors import ConfigError
from scorers.base import Scorer, TowerScorer, check_batch, finite_mean

if TYPE_CHECKING:
    from PIL import Image

NORMALISATIONS = ("none", "zscore", "minmax")


@dataclass(frozen=True)
class Normalisation:
    """How one scorer's raw scores are brought to a common scale (see the module docstring)."""

    kind: str = "none"
    mean: float = 0.0
    std: float = 1.0
    low: float = 0.0
    high: float = 1.0

    @classmethod
    def parse(cls, spec: Any, key: str) -> Normalisation:
        """Accept ``"none"``, a :class:`Normalisation`, or a mapping ``{kind: zscore, mean: .., std: ..}``."""
        if spec is None:
            return cls()
        if isinstance(spec, Normalisation):
            norm = spec
        elif isinstance(spec, str):
            norm = cls(kind=spec)
        elif isinstance(spec, Mapping):
            extra = sorted(set(spec) - {"kind", "mean", "std", "low", "high"})
            if extra:
                raise ConfigError(f"{key}: unknown normalisation keys {extra}; use kind, mean, std (zscore) or low, high (minmax)")
            kind = spec.get("kind", "none")
            needed = {"zscore": ("mean", "std"), "minmax": ("low", "high")}.get(kind, ())
            lacking = [k for k in needed if spec.get(k) is None]
            if lacking:
                raise ConfigError(f"{key}: {kind} normalisation needs {', '.join(lacking)} (fixed reference values)")
            try:
                norm = cls(kind=kind, **{k: float(v) for k, v in spec.items() if k != "kind"})
            except (TypeError, ValueError) as e:
                raise ConfigError(f"{key}: normalisation values must be numbers ({e})") from None
        else:
            raise ConfigError(f"{key}: normalisation must be none, zscore or minmax (got {spec!r})")
        if norm.kind not in NORMALISATIONS:
            raise ConfigError(f"{key}: normalisation kind {norm.kind!r}; use one of {', '.join(NORMALISATIONS)}")
        if norm.kind == "zscore" and not (norm.std > 0 and math.isfinite(norm.std)):
            raise ConfigError(f"{key}: zscore std must be a positive number (got {norm.std})")
        if norm.kind == "minmax" and not (norm.high > norm.low):
            raise ConfigError(f"{key}: minmax needs high > low (got low={norm.low}, high={norm.high})")
        return norm

    def apply(self, value: float) -> float:
        if self.kind == "zscore":
            return (value - self.mean) / self.std
        if self.kind == "minmax":
            return (value - self.low) / (self.high - self.low)
        return value


@dataclass
class ObjectiveResult:
    """``values``: the objective value(s), one per entry of ``Objective.names`` (mean over the images).
    ``per_scorer``: raw per-image scores by scorer name; ``normalised``: the same after normalisation;
    ``per_image``: ``[image][objective]`` values (what ``values`` averages); ``holdout``: held-out check numbers
    (empty when none configured)."""

    values: list[float]
    per_scorer: dict[str, list[float]]
    normalised: dict[str, list[float]] = field(default_factory=dict)
    per_image: list[list[float]] = field(default_factory=list)
    holdout: dict[str, float] = field(default_factory=dict)

    @property
    def value(self) -> float:
        """The single objective value (``values[0]``); an error in multi-objective mode would hide the others."""
        if len(self.values) != 1:
            raise ConfigError(f"objective has {len(self.values)} values (multi-objective); use .values")
        return self.values[0]


def score_all(scorers: Sequence[Scorer], images: Sequence[Image.Image], prompts: Sequence[str]) -> dict[str, list[float]]:
    """Raw per-image scores of each scorer, encoding every image once per distinct CLIP tower: tower scorers get the
    shared embeddings through ``score_embeddings``; any other scorer is called with the images."""
    check_batch(images, prompts)
    prompts = list(prompts)
    embeds: dict[int, torch.Tensor] = {}
    out: dict[str, list[float]] = {}
    for s in scorers:
        if isinstance(s, TowerScorer):
            tid = id(s.tower)
            if tid not in embeds:
                embeds[tid] = s.tower.encode_images(images)
            scores = s.score_embeddings(embeds[tid], prompts) if images else []
        else:
            scores = list(s.score(images, prompts))
        if len(scores) != len(images):
            raise ConfigError(f"scorer {s.name} returned {len(scores)} scores for {len(images)} images")
        out[s.name] = [float(v) for v in scores]
    return out


class Objective:
    """Weighted / normalised combination of scorers, or several objectives for multi-objective search."""

    def __init__(self, scorers: Sequence[Scorer], weights: Mapping[str, float] | Sequence[float] | None = None,
                 normalisation: Mapping[str, Any] | str | None = None, multi: bool = False,
                 holdout: Sequence[Scorer] | None = None, name: str = "objective"):
        self.scorers = list(scorers)
        if not self.scorers:
            raise ConfigError("an objective needs at least one scorer")
        names = [s.name for s in self.scorers]
        self.holdout = list(holdout or [])
        all_names = names + [s.name for s in self.holdout]
        dupes = sorted({n for n in all_names if all_names.count(n) > 1})
        if dupes:
            raise ConfigError(f"scorer names must be unique across scorers and holdout (duplicated: {dupes}); set name:")
        for s in self.scorers + self.holdout:
            if s.direction not in ("maximize", "minimize"):
                raise ConfigError(f"scorer {s.name}: direction {s.direction!r}; use maximize or minimize")
        self.multi = bool(multi)
        self.name = name
        self.weights = self._parse_weights(weights, names)
        if isinstance(normalisation, str | Normalisation):
            normalisation = {n: normalisation for n in names}
        normalisation = dict(normalisation or {})
        unknown = sorted(set(normalisation) - set(names))
        if unknown:
            raise ConfigError(f"normalisation for unknown scorers {unknown}; scorers are {names}")
        self.normalisation = {n: Normalisation.parse(normalisation.get(n), f"normalisation.{n}") for n in names}

    @staticmethod
    def _parse_weights(weights: Mapping[str, float] | Sequence[float] | None, names: list[str]) -> dict[str, float]:
        if weights is None:
            return dict.fromkeys(names, 1.0)
        if isinstance(weights, Mapping):
            unknown = sorted(set(weights) - set(names))
            if unknown:
                raise ConfigError(f"weights for unknown scorers {unknown}; scorers are {names}")
            out = {n: weights.get(n, 1.0) for n in names}
        else:
            if len(weights) != len(names):
                raise ConfigError(f"{len(weights)} weights for {len(names)} scorers {names}")
            out = dict(zip(names, weights, strict=True))
        try:
            out = {n: float(w) for n, w in out.items()}
        except (TypeError, ValueError):
            raise ConfigError(f"weights must be numbers (got {out})") from None
        bad = [n for n, w in out.items() if not math.isfinite(w)]
        if bad:
            raise ConfigError(f"weights must be finite (scorers {bad})")
        return out

    @property
    def names(self) -> list[str]:
        """Objective names, aligned with ``ObjectiveResult.values`` and :attr:`directions`."""
        return [s.name for s in self.scorers] if self.multi else [self.name]

    @property
    def directions(self) -> list[str]:
        """Optuna study directions, aligned with :attr:`names` (single objective: always ``maximize``)."""
        return [s.direction for s in self.scorers] if self.multi else ["maximize"]

    def _combine(self, raw: dict[str, list[float]], n_images: int) -> tuple[dict[str, list[float]], list[list[float]]]:
        normed = {s.name: [self.normalisation[s.name].apply(v) for v in raw[s.name]] for s in self.scorers}
        if self.multi:
            per_image = [[normed[s.name][i] for s in self.scorers] for i in range(n_images)]
        else:
            sign = {s.name: (-1.0 if s.direction == "minimize" else 1.0) for s in self.scorers}
            per_image = [[sum(self.weights[s.name] * sign[s.name] * normed[s.name][i] for s in self.scorers)]
                         for i in range(n_images)]
        return normed, per_image

    def evaluate(self, images: Sequence[Image.Image], prompts: Sequence[str], *,
                 holdout_images: Sequence[Image.Image] | None = None,
                 holdout_prompts: Sequence[str] | None = None) -> ObjectiveResult:
        """Score a batch; values are means over the images (NaN if any image scored NaN, so breakage is visible)."""
        check_batch(images, prompts)
        raw = score_all(self.scorers + self.holdout, images, prompts)
        main_raw = {s.name: raw[s.name] for s in self.scorers}
        normed, per_image = self._combine(main_raw, len(images))
        n_obj = len(self.names)
        values = [finite_mean([row[j] for row in per_image]) for j in range(n_obj)]
        holdout = {s.name: finite_mean(raw[s.name]) for s in self.holdout}
        if holdout_images is not None or holdout_prompts is not None:
            if holdout_images is None or holdout_prompts is None:
                raise ConfigError("give both holdout_images and holdout_prompts for the held-out prompt check")
            check_batch(holdout_images, holdout_prompts)
            h_raw = score_all(self.scorers + self.holdout, holdout_images, holdout_prompts)
            _, h_rows = self._combine({s.name: h_raw[s.name] for s in self.scorers}, len(holdout_images))
            for j, obj_name in enumerate(self.names):
                holdout[f"heldout_prompts/{obj_name}"] = finite_mean([row[j] for row in h_rows])
            for s in self.scorers + self.holdout:  # raw per-scorer means too: which scorer moved
                holdout[f"heldout_prompts/{s.name}"] = finite_mean(h_raw[s.name])
        return ObjectiveResult(values=values, per_scorer=main_raw, normalised=normed, per_image=per_image, holdout=holdout)

    def __repr__(self) -> str:
        return (f"Objective(names={self.names}, directions={self.directions}, weights={self.weights}, "
                f"holdout={[s.name for s in self.holdout]})")
