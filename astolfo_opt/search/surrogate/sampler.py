"""The Optuna sampler: staged start-up, then MAP / Thompson proposals of the score model, projected; falls back to the
staged plan (with a WARNING and the reason on the trial) where the weight space cannot map the study."""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import optuna
from optuna.distributions import BaseDistribution
from optuna.samplers import BaseSampler
from optuna.trial import FrozenTrial, TrialState

from astolfo_opt.errors import AstolfoError, ConfigError
from astolfo_opt.merge.methods import get_method
from astolfo_opt.search.space import METHOD
from astolfo_opt.search.strategies import PROPOSAL_ATTR, Params, StagedSampler, _key, start_params, trial_value
from astolfo_opt.search.surrogate.geometry import WEIGHT_SPACE_PREFIXES, ParamMap, Unsupported, WeightSpace, weight_space_from_files
from astolfo_opt.search.surrogate.model import RadialSurrogate
from astolfo_opt.search.surrogate.projector import Projector

log = logging.getLogger("astolfo_opt.search")


#: the trial attribute naming why the staged plan (or the misfit fallback) proposed instead
FALLBACK_ATTR = "sampler_fallback"


#: how a misfit hand-over's reason starts (the trials carry it; :meth:`SurrogateSampler._handed_over` reads it)
MISFIT = "the score model does not explain the best trial"


class Misfit(Exception):
    """The fitted score model does not explain the study's best trial: its proposals would follow a wrong model."""


def _finished(study: optuna.Study, dists: Mapping[str, BaseDistribution], sign: float,
              where: Callable[[FrozenTrial], bool] | None = None) -> tuple[list[tuple[FrozenTrial, float]], set[tuple]]:
    """(trial, maximised value) of every finished trial that has the parameters ``dists`` (and satisfies ``where``;
    a pruned one with its last running mean, as ``staged`` does) and the keys over ``dists`` of every point already
    proposed (finished, failed or in flight)."""
    done: list[tuple[FrozenTrial, float]] = []
    seen: set[tuple] = set()
    for t in study.get_trials(deepcopy=False):
        if not set(dists) <= set(t.params) or (where is not None and not where(t)):
            continue
        seen.add(_key({n: t.params[n] for n in dists}))
        v = trial_value(t, sign)
        if v is not None:
            done.append((t, v))
    return done, seen


def _spec_of(t: FrozenTrial) -> dict[str, Any] | None:
    raw = t.user_attrs.get("recipe")
    if not isinstance(raw, str):
        return None
    try:
        spec = json.loads(raw)
    except ValueError:
        return None
    return spec if isinstance(spec, dict) else None


class SurrogateSampler(BaseSampler):
    """Optuna sampler proposing the recipe nearest to a Thompson draw / the MAP estimate of the best merge θ° under the
    :class:`RadialSurrogate` fitted to all finished trials (see module doc).

    Schedule: the first ``n_startup`` finished trials come from :class:`StagedSampler` (the uniform average, the
    study's warm starts, then staged's whole-model flips, which tell the far-off models apart: trials that contain a
    far-off model say little about the rest, so the surrogate starts once they are known). Then every ``map_every``-th
    proposal is the MAP point (exploitation - what the best-so-far curve is made of) and the others are Thompson
    draws from the Laplace posterior (``thompson_scale`` times its spread: exploration where the fit is unsure). A
    draw that lands on an already proposed recipe is redrawn wider; after ``max_draws`` the staged plan proposes.

    The model is checked before each proposal: when the study's best trial lies more than ``misfit_sigmas`` robust
    noise sds (from the residuals' median absolute deviation) above the model's value there, the objective is not
    shaped like a cone in the Gram metric (on the trained world, merges with an outlier score far below what their
    weight-space distance says, so no centre fits the base alone and its neighbours at once), and ``misfit_fallback``
    (Optuna's GP on the parameters, or TPE) proposes from then on; the trials record why, and a WARNING says so once.

    ``weight_space`` can be given (tests, benchmarks that already hold the Gram matrices); otherwise it comes from the
    pool files named by the study (the ``pool`` study attribute the search writes, else the models of the trials'
    recipes) through :func:`weight_space_from_files` - one pass over the files, then cached."""

    def __init__(self, seed: int | None = None, *, n_startup: int = 16, map_every: int = 2, thompson_scale: float = 1.0,
                 max_draws: int = 6, fit_power: bool = False, prior_sd_weight: float = 0.5, prior_sd_alpha: float = 0.1,
                 prior_sd_shared_alpha: float = 0.5, misfit_sigmas: float = 3.0, misfit_fallback: str = "gp",
                 device: str = "cpu", weight_space: WeightSpace | None = None, staged: Mapping[str, Any] | None = None):
        self.seed = seed
        self.n_startup = max(int(n_startup), 2)
        self.map_every = max(int(map_every), 1)
        self.thompson_scale = max(float(thompson_scale), 1e-3)
        self.max_draws = max(int(max_draws), 1)
        self.fit_power = bool(fit_power)
        self.prior_sd_weight, self.prior_sd_alpha = float(prior_sd_weight), float(prior_sd_alpha)
        self.prior_sd_shared_alpha = float(prior_sd_shared_alpha)
        self.misfit_sigmas = float(misfit_sigmas or 0.0)
        if misfit_fallback not in ("gp", "tpe"):
            raise ConfigError(f"sampler.misfit_fallback={misfit_fallback!r}: use gp or tpe")
        self.misfit_fallback = str(misfit_fallback)
        self._misfit_sampler: BaseSampler | None = None
        self.device = str(device)
        self.weight_space = weight_space
        self._staged = StagedSampler(seed=seed, **dict(staged or {}))
        # pure-function caches (same inputs -> same objects): keep proposals fast, never change what is proposed
        self._maps: dict[tuple, tuple[ParamMap, Projector]] = {}
        self._warned: set[str] = set()
        #: why the last proposal came from the staged plan (None: the surrogate proposed it); for logs and tests
        self.last_fallback: str | None = None
        #: ``exploit`` (the MAP point), ``explore`` (a Thompson draw) or ``staged`` (startup / fallback)
        self.last_kind: str = "staged"

    def reseed_rng(self) -> None:
        self._staged.reseed_rng()

    def infer_relative_search_space(self, study: optuna.Study, trial: FrozenTrial) -> dict[str, BaseDistribution]:
        if len(study.directions) > 1:
            raise ConfigError("sampler=surrogate is single-objective; use sampler=nsga2 or sampler=tpe for multi-objective scorers")
        return self._staged.infer_relative_search_space(study, trial)

    def sample_relative(self, study: optuna.Study, trial: FrozenTrial, search_space: dict[str, BaseDistribution]) -> dict[str, Any]:
        if not search_space:
            return {}
        handed = self._handed_over(study)
        if handed is not None:
            params = self._misfit(study, trial, search_space, handed)
        else:
            try:
                params = self.propose(study, search_space)
            except Misfit as e:
                params = self._misfit(study, trial, search_space, str(e))
        # which kind of proposal this is, for the dashboard and for pruner=incumbent's ``spare_exploit``
        study._storage.set_trial_user_attr(trial._trial_id, PROPOSAL_ATTR, self.last_kind)
        if self.last_fallback is not None:  # why the staged plan proposed this one, on the trial for the dashboard
            study._storage.set_trial_user_attr(trial._trial_id, FALLBACK_ATTR, self.last_fallback)
        return params

    def sample_independent(self, study: optuna.Study, trial: FrozenTrial, param_name: str,
                           param_distribution: BaseDistribution) -> Any:
        # first trial of a fresh study (nothing to infer from yet): the uniform-average start point
        return start_params({param_name: param_distribution})[param_name]

    # ---- proposal -----------------------------------------------------------------------------------------------
    @staticmethod
    def _handed_over(study: optuna.Study) -> str | None:
        """The reason of the study's first misfit hand-over, if there was one. The hand-over is for good: a later fit
        that happens to explain the best trial (a model with many trials near it can) is still the wrong shape, and
        going back and forth wastes the trials each side spends re-learning. Read from the trials, so a resumed study
        or another worker decides the same."""
        for t in sorted(study.get_trials(deepcopy=False), key=lambda t: t.number):
            why = t.user_attrs.get(FALLBACK_ATTR)
            if isinstance(why, str) and why.startswith(MISFIT):
                return f"since trial {t.number}: {why}"
        return None

    def _misfit(self, study: optuna.Study, trial: FrozenTrial, search_space: dict[str, BaseDistribution], why: str) -> Params:
        """The misfit fallback's proposal (the kind ``misfit``; the reason on the trial, a WARNING once)."""
        self.last_fallback, self.last_kind = why, "misfit"
        if "misfit" not in self._warned:
            self._warned.add("misfit")
            log.warning("sampler=surrogate: %s; sampler=%s proposes from here on", why, self.misfit_fallback)
        if self._misfit_sampler is None:  # exactly as sampler=gp / sampler=tpe with the shipped defaults
            from astolfo_opt.search.study import make_sampler

            self._misfit_sampler = make_sampler({"name": self.misfit_fallback}, self.seed, multi=False, constraints=False)
        inner = self._misfit_sampler
        # as Optuna drives a sampler: infer first (TPE's grouped decomposition is built there), then the relative
        # point (TPE keeps the part of our space its groups cover), its own independent draw for the rest (its startup)
        inner.infer_relative_search_space(study, trial)
        rel = inner.sample_relative(study, trial, search_space)
        params = {n: rel[n] if n in rel else inner.sample_independent(study, trial, n, d) for n, d in search_space.items()}
        _, seen = _finished(study, search_space, 1.0)
        if _key(params) in seen:  # Optuna's GP may propose a known point again: a trial spent on nothing new
            staged = self._staged.propose(study, search_space)
            self.last_kind = "staged"
            return staged
        return params

    def _fallback(self, study: optuna.Study, dists: Mapping[str, BaseDistribution], why: str) -> Params:
        self.last_fallback = why
        self.last_kind = "staged"
        if why not in self._warned and not why.startswith("startup"):
            self._warned.add(why)
            log.warning("sampler=surrogate: %s; the staged plan proposes instead", why)
        return self._staged.propose(study, dists)

    def propose(self, study: optuna.Study, dists: Mapping[str, BaseDistribution]) -> Params:
        """The next point: staged during startup / for unsupported spaces, else MAP or a Thompson draw, projected.

        With merge methods in the space (``method.<comp>``), the weight-space model covers linear methods only: while
        the incumbent merges every component with a linear method, the surrogate proposes over the trials that used
        those same methods and keeps them; otherwise (and to sweep the methods) the staged plan proposes."""
        sign = 1.0 if study.direction == optuna.study.StudyDirection.MAXIMIZE else -1.0
        methods = [n for n in dists if n.startswith(METHOD)]
        if not methods:
            return self._propose(study, dists, dists, sign)
        done, _ = _finished(study, {n: dists[n] for n in methods}, sign)
        if len(done) < self.n_startup:
            return self._fallback(study, dists, f"startup ({len(done)} of {self.n_startup} trials)")
        inc = max(done, key=lambda tv: tv[1])[0]
        chosen = {n: inc.params[n] for n in methods}
        odd = next((m for m in chosen.values() if not get_method(str(m)).linear), None)
        if odd is not None:
            return self._fallback(study, dists, f"the incumbent merges with {odd}, which is not linear: the weight-space "
                                                "surrogate covers linear methods only")
        sub = {n: d for n, d in dists.items() if n.startswith(WEIGHT_SPACE_PREFIXES)}
        params = self._propose(study, sub, dists, sign, where=lambda t: all(t.params.get(n) == v for n, v in chosen.items()))
        return {**params, **{n: v for n, v in chosen.items() if n not in params}}

    def _propose(self, study: optuna.Study, dists: Mapping[str, BaseDistribution], full: Mapping[str, BaseDistribution],
                 sign: float, where: Callable[[FrozenTrial], bool] | None = None) -> Params:
        """The surrogate's point over ``dists`` from the finished trials satisfying ``where``; the staged plan over
        ``full`` when it cannot."""
        done, seen = _finished(study, dists, sign, where)
        if len(done) < self.n_startup:
            return self._fallback(study, full, f"startup ({len(done)} of {self.n_startup} trials)")
        try:
            pm, proj = self._map(study, dists, done)
            U, y, wts, best = self._data(pm, done)
        except Unsupported as e:
            return self._fallback(study, full, str(e))
        sur = RadialSurrogate(pm, s_w=self.prior_sd_weight, tau=self.prior_sd_alpha, fit_power=self.fit_power,
                              mu_sd=self.prior_sd_shared_alpha)
        try:
            sur.fit(U, y, weights=wts, starts=[sur.x_from_params(best), sur.prior_mean()])
        except (ValueError, np.linalg.LinAlgError, FloatingPointError) as e:  # degenerate data: never stop a study
            return self._fallback(study, full, f"surrogate fit failed ({type(e).__name__}: {e})")
        if self.misfit_sigmas > 0 and dists == full:  # with method categoricals the staged plan keeps proposing
            self._check_fit(sur, U, y)
        # the draw depends only on the seed and the number of finished trials: the same study state -> the same point
        rng = np.random.default_rng(int.from_bytes(hashlib.sha256(f"surrogate|{self.seed}|{len(done)}".encode()).digest()[:8], "big"))
        scale = 0.0 if (len(done) - self.n_startup) % self.map_every == 0 else self.thompson_scale
        for _draw in range(self.max_draws):
            uc, _ = sur.centre(sur.sample(rng, scale))
            params, _ = proj.project(uc, start=best)
            params = {n: params.get(n, best[n]) for n in dists}
            if _key(params) not in seen:
                self.last_fallback = None
                self.last_kind = "exploit" if scale == 0.0 else "explore"
                return params
            scale = max(scale, self.thompson_scale) * 1.5  # that recipe is known already: look a little wider
        return self._fallback(study, full, "every draw landed on a known recipe")

    def _check_fit(self, sur: RadialSurrogate, U: np.ndarray, y: np.ndarray) -> None:
        """Raise :class:`Misfit` when the best trial lies more than ``misfit_sigmas`` noise sds above the fitted model.
        The sd is the residuals' median absolute deviation (x 1.4826), not the fit's σ: one trial the model cannot
        explain inflates σ by itself and would hide its own misfit; floored at the fit's prior noise level."""
        resid = y - sur.predict(sur.x, U)[0]
        i = int(np.argmax(y))
        sd = max(1.4826 * float(np.median(np.abs(resid - np.median(resid)))), sur.sig0 * float(y.max() - y.min()), 1e-12)
        if resid[i] > self.misfit_sigmas * sd:
            raise Misfit(f"{MISFIT} (observed {y[i]:.4g}, model {y[i] - resid[i]:.4g}: "
                         f"{resid[i] / sd:.1f} noise sds above it, threshold {self.misfit_sigmas:g})")

    def _data(self, pm: ParamMap, done: Sequence[tuple[FrozenTrial, float]]
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray, Params]:
        """Coordinates of every finished trial's merge (from its recorded recipe - repairs included - else from its
        params), maximised values, their fit weights and the best trial's params. A trial pruned after ``k`` of the
        ``K`` prompt batches a finished trial reports has a running mean ``K/k`` times noisier in variance, so its
        residual is weighted by ``sqrt(k/K)`` (every finished trial: 1)."""
        full = max((len(t.intermediate_values) for t, _ in done if t.state == TrialState.COMPLETE), default=0) or 1
        rows, ys, wts = [], [], []
        for t, v in done:
            spec = _spec_of(t)
            u = pm.ws.coords(spec) if spec is not None else pm.coords(t.params)
            if u is None or not math.isfinite(v):
                continue
            k = len(t.intermediate_values) if t.state == TrialState.PRUNED else full
            rows.append(u)
            ys.append(v)
            wts.append(math.sqrt(min(max(k, 1), full) / full))
        if len(rows) < 2:
            raise Unsupported("fewer than two finished trials with a usable merge")
        best = max(done, key=lambda tv: tv[1])[0].params
        return np.stack(rows), np.asarray(ys), np.asarray(wts), dict(best)

    def _map(self, study: optuna.Study, dists: Mapping[str, BaseDistribution], done: Sequence[tuple[FrozenTrial, float]]
             ) -> tuple[ParamMap, Projector]:
        """The weight space, the params -> coordinates map and the projector of this study (cached)."""
        odd = next((n for n in dists if not n.startswith(WEIGHT_SPACE_PREFIXES)), None)
        if odd is not None:  # before reading any file: this family has no weight-space map
            raise Unsupported(f"parameter {odd} (only inc.* / alpha.* spaces have a weight-space map)")
        specs = [(t, s) for t, _ in done if (s := _spec_of(t)) is not None]
        if not specs:
            raise Unsupported("the trials carry no recipe (not run through the search objective)")
        # the reference recipe: the one with the most members (the uniform average when it was evaluated)
        ref_t, ref_spec = max(specs, key=lambda ts: (len(ts[1].get("models") or {}), -ts[0].number))
        ws = self.weight_space or self._weight_space(study, specs)
        min_models = int((study.user_attrs.get("space") or {}).get("min_models", 1))
        key = (id(ws), tuple(sorted(dists)), min_models, json.dumps({c: {k: v for k, v in e.items() if k not in ("members", "alpha")}
                                                                      for c, e in (ref_spec.get("components") or {}).items()},
                                                                     sort_keys=True))
        if key not in self._maps:
            pm = ParamMap(ws, dists, ref_spec, min_models=min_models)
            self._maps[key] = (pm, Projector(pm))
        pm, proj = self._maps[key]
        # the map must reproduce the recipes the space built (a few trials are enough to catch a different family)
        for t, spec in [(ref_t, ref_spec), *specs[:3]]:
            u = pm.coords(t.params)
            if u is not None and t.user_attrs.get("constraint", 0.0) == 0.0:
                ws_u = ws.coords(spec)
                if not np.allclose(u, ws_u, atol=1e-6):
                    raise Unsupported(f"trial {t.number}: its params do not map to its recorded recipe")
        return pm, proj

    def _weight_space(self, study: optuna.Study, specs: Sequence[tuple[FrozenTrial, dict[str, Any]]]) -> WeightSpace:
        pool = study.user_attrs.get("pool") or {}
        paths: dict[str, str] = dict(pool.get("models") or {})
        base = pool.get("base")
        for _, s in specs:
            for n, pth in (s.get("models") or {}).items():
                paths.setdefault(n, pth)
        ref_spec = specs[0][1]
        base = base or ref_spec.get("base")
        comps = list(dict.fromkeys(c for _, s in specs for c in (s.get("components") or {})))
        if len(paths) < 2 or not comps:
            raise Unsupported("the study names fewer than two pool files")
        try:
            return weight_space_from_files(paths, base, comps, ref_spec.get("time_embed_block"), device=self.device)
        except (AstolfoError, OSError, KeyError, ValueError) as e:
            raise Unsupported(f"cannot read the pool's weight space ({e})") from None


def make_surrogate_sampler(seed: int | None = None, **opts: Any) -> SurrogateSampler:
    """``sampler=surrogate`` from its config options (unknown keys are a one-line ConfigError)."""
    allowed = {"n_startup", "map_every", "thompson_scale", "max_draws", "fit_power", "prior_sd_weight", "prior_sd_alpha",
               "prior_sd_shared_alpha", "misfit_sigmas", "misfit_fallback", "device", "staged"}
    bad = sorted(set(opts) - allowed)
    if bad:
        raise ConfigError(f"sampler.{bad[0]} is not an option of sampler=surrogate (options: {', '.join(sorted(allowed))})")
    return SurrogateSampler(seed=seed, **opts)

