"""``staged``: a structure-aware coordinate search packaged as an Optuna sampler - the start and the fallback of the
default ``surrogate`` sampler (:mod:`astolfo_opt.search.surrogate`), and ``sampler=staged`` on its own.

Why not plain TPE / CMA-ES / GP: in the merge spaces most of the value sits in the *per-model inclusion bits*, which are
roughly separable (a far-off model hurts whatever else is in, and is far in every component), while the MBW alphas are
a smooth, low-signal refinement. Model-based samplers spend their first 10-20 trials on random points and then learn
slowly in 40-50 dimensions; the seeds' manual procedure (greedy forward selection) pays a whole sweep of the pool per
accepted change and never touches alpha. On the weight-space oracle (experiments/bench_search.py, N=12, T=60, σ=0.02,
5 seeds x 3) ``staged`` ends at median s 0.827 (CMA-ES 0.809, TPE 0.782, greedy 0.771, random 0.748) and reaches 0.80
by trial 39; without noise 0.90 by trial 44. The weight-space surrogate, which runs this plan for its first 16 trials,
ends at 0.895 (experiments/README_bench_search.md).

Plan (each stage continues from the incumbent = best observed point so far):

1. the uniform average (everything in, alpha = high), the workflow's usual starting point;
2. flip each *model* (its bits in every component at once) from there, then all improving flips together - the
   far-off models leave in ~one trial per model; outlier-size wins are frozen afterwards;
3. one shared value per continuous family (``alpha.*``, ``pair.*``): a small grid and a least-squares parabola whose
   argmax (one more trial) becomes the incumbent - a fit over several noisy trials beats their noisy argmax;
4. per-component first-improvement sweeps over the bits with a bracketed alpha re-fit after each; every
   ``fit_every`` trials the best point of an additive ridge surrogate over all trials since stage 2 (noise averages
   across many trials instead of trusting one noisy comparison);
5. (1+1) local search (Gaussian alpha steps, occasionally one bit), still with the surrogate's point.

The sampler is stateless: every call replays the deterministic plan against the study's finished trials (matched by
their parameters; a pruned trial counts with its last running value), so a resumed study continues where it stopped
and enqueued warm starts are recognised. Points another worker is evaluating are skipped as if failed; with several
workers the plan stays valid but loses some first-improvement efficiency. Single objective only.
"""

from __future__ import annotations

import math
import random
from collections.abc import Generator, Iterable, Mapping, Sequence
from typing import Any

import optuna
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.pruners import BasePruner
from optuna.samplers import BaseSampler, RandomSampler
from optuna.trial import FrozenTrial, TrialState

from astolfo_opt.errors import ConfigError
from astolfo_opt.search.space import active_point

Params = dict[str, Any]
Plan = Generator[Params, float | None, None]

#: trial user attribute in which a sampler names the kind of proposal (``surrogate``: ``exploit`` = its MAP point,
#: ``explore`` = a Thompson draw, ``staged``); ``pruner=incumbent`` with ``spare_exploit`` reads it
PROPOSAL_ATTR = "proposal"

#: continuous parameter families that share one value in the *line* stage
LINE_PREFIXES = ("alpha.", "pair.")


def trial_value(t: FrozenTrial, sign: float) -> float | None:
    """The maximised value a trial counts for in the samplers' fits: a complete trial's value, a pruned trial's last
    running mean (a noisier but unbiased estimate, still useful), ``None`` for anything else."""
    if t.state == TrialState.COMPLETE and t.values:
        return sign * float(t.values[0])
    if t.state == TrialState.PRUNED and t.intermediate_values:
        return sign * float(t.intermediate_values[max(t.intermediate_values)])
    return None


def _key(params: Mapping[str, Any]) -> tuple:
    """A hashable identity of a point: numbers rounded (float noise of a replay is the same point), choices as is."""
    return tuple(sorted((k, round(float(v), 9) if isinstance(v, int | float) else repr(v)) for k, v in params.items()))


def _is_bit(d: BaseDistribution) -> bool:
    return isinstance(d, IntDistribution) and d.low == 0 and d.high == 1


def _is_choice(d: BaseDistribution) -> bool:
    """A categorical parameter (e.g. a merge method): swept choice by choice like a bit, never line-searched."""
    return isinstance(d, CategoricalDistribution)


def _clip(d: BaseDistribution, v: float) -> float:
    lo, hi = float(d.low), float(d.high)  # type: ignore[attr-defined]
    v = min(max(v, lo), hi)
    step = getattr(d, "step", None)
    if step:
        v = lo + round((v - lo) / step) * step
        v = min(max(v, lo), hi)
    return int(round(v)) if isinstance(d, IntDistribution) else float(v)


def start_params(dists: Mapping[str, BaseDistribution]) -> Params:
    """The uniform average: every bit on, weights / alphas at their high end, pairwise alphas in the middle."""
    out: Params = {}
    for n, d in dists.items():
        if isinstance(d, CategoricalDistribution):
            out[n] = d.choices[0]  # the first choice is the default (e.g. weighted_average)
        elif isinstance(d, IntDistribution):
            out[n] = d.high
        elif n.startswith("pair."):
            out[n] = _clip(d, (d.low + d.high) / 2)  # type: ignore[attr-defined]
        else:
            out[n] = float(d.high)  # type: ignore[attr-defined]
    return out


def _parabola_argmax(xs: Sequence[float], ys: Sequence[float], lo: float, hi: float) -> float:
    """argmax on [lo, hi] of the least-squares parabola through (xs, ys); the best x when the fit is not concave."""
    n = len(xs)
    if n < 3:
        return xs[max(range(n), key=lambda i: ys[i])]
    # normal equations for y = a x^2 + b x + c
    sx = [sum(x**k for x in xs) for k in range(5)]
    sy = [sum(y * x**k for x, y in zip(xs, ys, strict=True)) for k in range(3)]
    m = [[sx[4], sx[3], sx[2]], [sx[3], sx[2], sx[1]], [sx[2], sx[1], sx[0]]]
    try:
        a, b, _ = _solve3(m, [sy[2], sy[1], sy[0]])
    except ZeroDivisionError:
        return xs[max(range(n), key=lambda i: ys[i])]
    if a >= 0:  # not concave: trust the data
        return xs[max(range(n), key=lambda i: ys[i])]
    return min(max(-b / (2 * a), lo), hi)


def _solve3(m: list[list[float]], v: list[float]) -> list[float]:
    a = [row[:] + [v[i]] for i, row in enumerate(m)]
    for c in range(3):
        p = max(range(c, 3), key=lambda r: abs(a[r][c]))
        if abs(a[p][c]) < 1e-15:
            raise ZeroDivisionError
        a[c], a[p] = a[p], a[c]
        for r in range(3):
            if r != c:
                f = a[r][c] / a[c][c]
                a[r] = [x - f * y for x, y in zip(a[r], a[c], strict=True)]
    return [a[i][3] / a[i][i] for i in range(3)]


def _ridge_effects(rows: list[tuple[list[float], float]], lam: float = 1e-2) -> list[float] | None:
    """Least-squares (ridge) coefficients of ``y ≈ b + Σ βᵢ xᵢ`` over ``rows`` (features centred; ``b`` dropped)."""
    import numpy as np

    if len(rows) < 4:
        return None
    x = np.array([r[0] for r in rows], dtype=float)
    y = np.array([r[1] for r in rows], dtype=float)
    x = x - x.mean(0)
    y = y - y.mean()
    a = x.T @ x + lam * np.eye(x.shape[1])
    return [float(v) for v in np.linalg.solve(a, x.T @ y)]


def staged_plan(dists: Mapping[str, BaseDistribution], seed: int | None = None, *, line_points: Sequence[float] = (0.75, 0.5, 0.25),
                local_sigma: float = 0.1, local_flip: float = 0.3, rounds: int = 4, freeze: float = 5.0, model_first: bool = True,
                fit_every: int = 8) -> Plan:
    """The deterministic proposal sequence (see module doc). Yields params; is sent the observed value (``None`` =
    failed / pruned, never better). Values are *maximised* (the sampler negates minimised objectives)."""
    rng = random.Random(f"staged|{seed}")
    bits = [n for n, d in dists.items() if _is_bit(d)]
    choices = [n for n, d in dists.items() if _is_choice(d)]
    families = {p: [n for n in dists if n.startswith(p) and not _is_bit(dists[n]) and not _is_choice(dists[n])] for p in LINE_PREFIXES}
    families = {p: ns for p, ns in families.items() if ns}
    conts = [n for n, d in dists.items() if not _is_bit(d) and not _is_choice(d)]
    region: list[tuple[Params, float]] = []  # evaluated points since the far-off models were settled
    in_region = False

    def ask(p: Params):
        val = yield dict(p)
        if in_region and val is not None:
            region.append((dict(p), val))
        return val

    inc = start_params(dists)
    v = yield from ask(inc)
    best = -math.inf if v is None else v

    def flipped(p: Params, names: Sequence[str]) -> Params:
        q = dict(p)
        for n in names:
            q[n] = 1 - int(q[n])
        return q

    def features(p: Params) -> list[float]:
        f = [float(p[n]) for n in bits]
        for names in families.values():
            m = sum(float(p[n]) for n in names) / len(names)
            f += [m, m * m]
        return f

    def model_point():
        """Bits set by the sign of their fitted effect over the region (noise averages out across trials); the shared
        alpha at the fitted parabola's top. ``None`` when the region is too small or the point is the incumbent."""
        beta = _ridge_effects([(features(p), y) for p, y in region])
        if beta is None:
            return None
        q = dict(inc)
        varied = {n for n in bits if len({p[n] for p, _ in region}) > 1}
        for i, n in enumerate(bits):
            if n in varied and n not in frozen:
                q[n] = int(beta[i] > 0)
        k = len(bits)
        for names in families.values():
            g1, g2 = beta[k], beta[k + 1]
            k += 2
            d0 = dists[names[0]]
            if g2 < 0:
                x = _clip(d0, -g1 / (2 * g2))
                q.update({n: x for n in names})
        return None if _key(q) == _key(inc) else q

    def line(refine: bool):
        """Shared value per continuous family: grid (or a bracket around the current value), parabola fit, one trial."""
        nonlocal inc, best
        for _prefix, names in families.items():
            d0 = dists[names[0]]
            lo, hi = float(d0.low), float(d0.high)  # type: ignore[attr-defined]
            cur = sum(float(inc[n]) for n in names) / len(names)
            xs, ys = [cur], [best]
            pts = [cur - 0.2 * (hi - lo), cur + 0.2 * (hi - lo)] if refine else [lo + f * (hi - lo) for f in line_points]
            for x in pts:
                x = _clip(d0, x)
                if any(abs(x - e) < 1e-9 for e in xs):
                    continue
                p = dict(inc)
                p.update({n: x for n in names})
                val = yield from ask(p)
                if val is not None:
                    xs.append(x)
                    ys.append(val)
            xf = _clip(d0, _parabola_argmax(xs, ys, lo, hi))
            p = dict(inc)
            p.update({n: xf for n in names})
            val = yield from ask(p)
            # the fitted point is trusted over a noisy argmax unless it is clearly worse than the best observed
            spread = (max(ys) - min(ys)) if len(ys) > 1 else 0.0
            if val is not None and val >= max(ys) - 0.25 * spread:
                inc, best = dict(p), val
            elif max(ys) > best:
                i = max(range(len(ys)), key=lambda j: ys[j])
                inc = dict(inc)
                inc.update({n: xs[i] for n in names})
                best = ys[i]

    def try_model():
        nonlocal inc, best
        q = model_point()
        if q is not None:
            val = yield from ask(q)
            if val is not None and val > best:
                inc, best = q, val

    def sweep_choices():
        """Each other choice of each categorical (a merge method), first improvement kept; True if one was."""
        nonlocal inc, best
        accepted = False
        for n in choices:
            for c in dists[n].choices:  # type: ignore[attr-defined]
                if c == inc[n]:
                    continue
                p = {**inc, n: c}
                val = yield from ask(p)
                if val is not None and val > best:
                    inc, best, accepted = p, val, True
                    break
        return accepted

    # round 0: flip whole models (a far-off model is far in every component: one trial per model), then all
    # improving flips together; outlier-size wins are frozen. Rounds 1+: per-component bits, first improvement,
    # and every ``fit_every`` trials the additive surrogate's best point.
    frozen: set[str] = set()
    by_model: dict[str, list[str]] = {}
    for n in bits:  # inc.<component>.<model>: one model's bits across components
        by_model.setdefault(n.split(".", 2)[-1], []).append(n)
    units0 = [tuple(ns) for ns in by_model.values()] if model_first else [(n,) for n in bits]
    vals: dict[str, float] = {}
    for unit in units0:
        val = yield from ask(flipped(inc, unit))
        if val is not None:
            vals["|".join(unit)] = val
    if vals and freeze:
        xs = sorted(vals.values())
        med = xs[len(xs) // 2]
        mad = sorted(abs(x - med) for x in xs)[len(xs) // 2] or 1e-12
        frozen |= {b for u, x in vals.items() if x - med > freeze * 1.4826 * mad and x > best for b in u.split("|")}
    good = sorted((u for u in vals if vals[u] > best), key=lambda u: -vals[u])
    if good:
        top = good[0]
        both = [b for u in good for b in u.split("|")]
        if len(good) > 1:
            vc = yield from ask(flipped(inc, both))
            if vc is not None and vc >= vals[top]:
                inc, best = flipped(inc, both), vc
            else:
                inc, best = flipped(inc, top.split("|")), vals[top]
        else:
            inc, best = flipped(inc, both), vals[top]
    yield from sweep_choices()  # a merge method changes every block at once: decided with the models, before lines
    in_region = True
    region.append((dict(inc), best))
    yield from line(refine=False)
    since_fit = 0
    for _r in range(1, rounds):
        accepted = False
        for n in bits:
            if n in frozen:
                continue
            val = yield from ask(flipped(inc, [n]))
            if val is not None and val > best:
                inc, best, accepted = flipped(inc, [n]), val, True
            since_fit += 1
            if fit_every and since_fit >= fit_every:
                since_fit = 0
                yield from try_model()
        accepted = (yield from sweep_choices()) or accepted
        yield from line(refine=True)
        if not accepted:
            break
    # local (1+1) search, with the surrogate's point every ``fit_every`` trials
    while True:
        p = dict(inc)
        for n in conts:
            d = dists[n]
            width = float(d.high) - float(d.low)  # type: ignore[attr-defined]
            p[n] = _clip(d, float(p[n]) + rng.gauss(0.0, local_sigma * width))
        if bits and rng.random() < local_flip:
            p = flipped(p, [rng.choice([b for b in bits if b not in frozen] or bits)])
        if choices and rng.random() < local_flip:
            n = rng.choice(choices)
            p[n] = rng.choice([c for c in dists[n].choices if c != p[n]] or [p[n]])  # type: ignore[attr-defined]
        val = yield from ask(p)
        if val is not None and val > best:
            inc, best = p, val
        since_fit += 1
        if fit_every and since_fit >= fit_every:
            since_fit = 0
            yield from try_model()


class StagedSampler(BaseSampler):
    """Optuna sampler running :func:`staged_plan` (replayed from the study's trials at every call)."""

    def __init__(self, seed: int | None = None, *, line_points: Sequence[float] = (0.75, 0.5, 0.25), local_sigma: float = 0.1,
                 local_flip: float = 0.3, max_repeats: int = 50, rounds: int = 4, freeze: float = 5.0,
                 model_first: bool = True, fit_every: int = 8):
        self.seed = seed
        self.line_points = tuple(float(x) for x in line_points)
        self.local_sigma = float(local_sigma)
        self.local_flip = float(local_flip)
        self.max_repeats = int(max_repeats)
        self.rounds, self.freeze, self.model_first, self.fit_every = int(rounds), float(freeze), bool(model_first), int(fit_every)
        self._fallback = RandomSampler(seed=seed)

    def reseed_rng(self) -> None:
        self._fallback.reseed_rng()

    def infer_relative_search_space(self, study: optuna.Study, trial: FrozenTrial) -> dict[str, BaseDistribution]:
        if len(study.directions) > 1:
            raise ConfigError("sampler=staged is single-objective; use sampler=tpe or nsga2 for multi-objective scorers")
        dists: dict[str, BaseDistribution] = {}
        for t in study.get_trials(deepcopy=False):
            for n, d in t.distributions.items():
                dists.setdefault(n, d)
        return dict(sorted(dists.items()))

    def sample_relative(self, study: optuna.Study, trial: FrozenTrial, search_space: dict[str, BaseDistribution]) -> dict[str, Any]:
        if not search_space:
            return {}
        return self.propose(study, search_space)

    def propose(self, study: optuna.Study, dists: Mapping[str, BaseDistribution]) -> Params:
        sign = 1.0 if study.direction == optuna.study.StudyDirection.MAXIMIZE else -1.0
        done: dict[tuple, float | None] = {}
        busy: set[tuple] = set()
        for t in study.get_trials(deepcopy=False):
            if not set(t.params) <= set(dists):  # another space; a conditional parameter may be missing, not extra
                continue
            k = _key(active_point(t.params))
            v = trial_value(t, sign)
            if v is not None:
                done[k] = v if done.get(k) is None else max(done[k], v)  # type: ignore[type-var]
            elif t.state in (TrialState.PRUNED, TrialState.FAIL):
                done.setdefault(k, None)
            elif t.state in (TrialState.RUNNING, TrialState.WAITING):
                busy.add(k)
        plan = staged_plan(dists, self.seed, line_points=self.line_points, local_sigma=self.local_sigma, local_flip=self.local_flip,
                           rounds=self.rounds, freeze=self.freeze, model_first=self.model_first, fit_every=self.fit_every)
        p = next(plan)
        seen = 0
        replays = 0
        while True:
            k = _key(active_point(p))
            if k in done:
                replays += 1
                if replays > len(done) + 2000:  # the local stage keeps landing on known points (tiny discrete space)
                    return self._random_point(dists, len(done))
                p = plan.send(done[k])
                continue
            if k in busy and seen < self.max_repeats:  # another worker evaluates it: move on as if it failed
                seen += 1
                p = plan.send(None)
                continue
            return {n: p[n] for n in dists}

    def _random_point(self, dists: Mapping[str, BaseDistribution], salt: int) -> Params:
        rng = random.Random(f"staged-random|{self.seed}|{salt}")
        return {n: (rng.choice(d.choices) if isinstance(d, CategoricalDistribution)
                    else rng.randint(d.low, d.high) if isinstance(d, IntDistribution)  # type: ignore[attr-defined]
                    else _clip(d, rng.uniform(d.low, d.high)))  # type: ignore[attr-defined]
                for n, d in dists.items()}

    def sample_independent(self, study: optuna.Study, trial: FrozenTrial, param_name: str,
                           param_distribution: BaseDistribution) -> Any:
        # first trial of a fresh study (nothing to infer from yet): the uniform-average start point
        return start_params({param_name: param_distribution})[param_name]


def _batch_means(running: Mapping[int, float]) -> list[tuple[float, int]]:
    """``(mean, images)`` of each batch, from the running means a trial reported at steps = images scored so far."""
    out, j, mj = [], 0, 0.0
    for step, m in sorted(running.items()):
        out.append(((step * m - j * mj) / (step - j), step - j))
        j, mj = step, m
    return out


class IncumbentPruner(BasePruner):
    """Stop a trial once its running mean is confidently below the best finished trial.

    Why not median / successive halving: those compare with *typical* trials, so near the end of a search (when most
    proposals are small steps around a good incumbent) they stop trials that could still win, and the final best
    drops. A trial that cannot beat the incumbent is useless to a hill-climbing strategy whatever the others did, so
    this pruner asks one question after each prompt batch: with ``k`` images scored so far (the evaluator's step), is
    ``mean_k + z·sd/√k`` below the best finished value? ``sd`` is the per-image spread, pooled over finished trials
    from their batch means: a batch of ``n`` images between steps ``j`` and ``k = j + n`` has the mean
    ``(k·m_k - j·m_j) / n`` and the variance ``sd²/n``. (Steps count images, not batches: with several prompts per
    pipeline call - the shipped renders - reading them as batch numbers mixes batch sums into the spread.)

    Options for model-based samplers, both off because neither helped on the search benchmark
    (experiments/README_bench_search.md): ``spare_exploit`` never stops a trial the sampler tagged
    ``proposal: exploit`` (the surrogate's MAP point); ``incumbent_noise`` adds the incumbent's own variance
    (``sd²/K``) to the margin, since the best finished value is a noisy mean too.

    ``paired``: every trial renders the same prompts with the same seeds, so most of the per-prompt spread is the
    prompts' difficulty, shared by all merges, not noise. The paired test compares the trial with the incumbent *on
    the images both have*: ``mean_k - inc_k + z·sd_d/√k < 0``, where ``inc_k`` is the incumbent's running mean at the
    same step and ``sd_d`` the per-image spread of the differences to the incumbent, pooled over the finished trials.
    It removes the bias of comparing the first prompts with the whole set and is much sharper (in one trained-world
    study, base alone against its best neighbour: per-prompt sd 0.16, sd of the paired differences 0.017). Falls back
    to the plain test when the incumbent did not report that step (another batch size)."""

    def __init__(self, z: float = 2.0, n_startup_trials: int = 3, n_warmup_steps: int = 1, min_sd: float = 1e-6,
                 spare_exploit: bool = False, incumbent_noise: bool = False, paired: bool = False):
        self.z = float(z)
        self.n_startup_trials = int(n_startup_trials)
        self.n_warmup_steps = int(n_warmup_steps)
        self.min_sd = float(min_sd)
        self.spare_exploit = bool(spare_exploit)
        self.incumbent_noise = bool(incumbent_noise)
        self.paired = bool(paired)

    def prune(self, study: optuna.Study, trial: FrozenTrial) -> bool:
        iv = trial.intermediate_values
        if not iv or len(iv) <= self.n_warmup_steps:
            return False
        if self.spare_exploit and self._proposal(study, trial) == "exploit":
            return False
        done = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)) if t.values]
        if len(done) < self.n_startup_trials:
            return False
        sign = 1.0 if study.direction == optuna.study.StudyDirection.MAXIMIZE else -1.0
        inc = max(done, key=lambda t: sign * float(t.values[0]))
        best = sign * float(inc.values[0])
        k = max(iv)
        if self.paired and k in inc.intermediate_values:
            # per finished trial, its batch means minus the incumbent's on the same images
            ref, same = _batch_means(inc.intermediate_values), inc.intermediate_values.keys()
            sd_d = self._pooled_sd([(b - bi, n) for (b, n), (bi, _) in zip(_batch_means(t.intermediate_values), ref, strict=True)]
                                   for t in done if t.number != inc.number and t.intermediate_values.keys() == same)
            if sd_d is not None:
                diff = sign * (float(iv[k]) - float(inc.intermediate_values[k]))
                return diff + self.z * sd_d / math.sqrt(k) < 0
        sd = self._pooled_sd(_batch_means(t.intermediate_values) for t in done)
        if sd is None:
            return False
        var = sd * sd / k
        if self.incumbent_noise:
            var += sd * sd / max(max(inc.intermediate_values, default=1), 1)  # the incumbent's own mean over its K images
        return sign * float(iv[k]) + self.z * math.sqrt(var) < best

    def _pooled_sd(self, series: Iterable[list[tuple[float, int]]]) -> float | None:
        """Per-image sd pooled over trials' batch means: a batch of ``n`` images has variance ``sd²/n`` around its
        trial's mean, so each ``n·(b - mean)²`` estimates ``sd²``; None with fewer than 2 degrees of freedom."""
        sq, dof = 0.0, 0
        for batches in series:
            if len(batches) < 2:
                continue
            mu = sum(b * n for b, n in batches) / sum(n for _, n in batches)
            sq += sum(n * (b - mu) ** 2 for b, n in batches)
            dof += len(batches) - 1
        return max(math.sqrt(sq / dof), self.min_sd) if dof >= 2 else None

    @staticmethod
    def _proposal(study: optuna.Study, trial: FrozenTrial) -> str | None:
        """The sampler's tag of this trial. Read from the storage: the sampler writes it there, and the trial Optuna
        hands to a pruner is a cached copy that only tracks what the objective itself set."""
        got = trial.user_attrs.get(PROPOSAL_ATTR)
        if got is None:
            got = study._storage.get_trial_user_attrs(trial._trial_id).get(PROPOSAL_ATTR)
        return got


def make_staged_sampler(seed: int | None = None, **opts: Any) -> StagedSampler:
    """``sampler=staged`` from its config options (unknown keys are a one-line ConfigError)."""
    allowed = {"line_points", "local_sigma", "local_flip", "max_repeats", "rounds", "freeze", "model_first", "fit_every"}
    bad = sorted(set(opts) - allowed)
    if bad:
        raise ConfigError(f"sampler.{bad[0]} is not an option of sampler=staged (options: {', '.join(sorted(allowed))})")
    return StagedSampler(seed=seed, **opts)


def make_incumbent_pruner(**opts: Any) -> IncumbentPruner:
    """``pruner=incumbent``, meant for ``sampler=staged`` (with the default surrogate it cost final value)."""
    allowed = {"z", "n_startup_trials", "n_warmup_steps", "spare_exploit", "incumbent_noise", "paired"}
    bad = sorted(set(opts) - allowed)
    if bad:
        raise ConfigError(f"pruner.{bad[0]} is not an option of pruner=incumbent (options: {', '.join(sorted(allowed))})")
    return IncumbentPruner(**opts)


__all__ = ["PROPOSAL_ATTR", "IncumbentPruner", "StagedSampler", "make_incumbent_pruner", "make_staged_sampler", "staged_plan",
           "start_params", "trial_value", "FloatDistribution"]
