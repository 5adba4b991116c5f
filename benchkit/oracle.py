"""Weight-space oracle for search benchmarks (issue 8): a hidden target merge and ``s = 1 - |θ - θ*| / |θ_u - θ*|``.

Why an oracle: the real objective (render + CLIP score) is slow and its optimum unknown, so it cannot tell whether a
search strategy is *efficient*. Here the optimum is a known recipe θ* drawn from a seed, ``s`` is 0 at the
workflow's starting point (θ_u, the uniform average of every model) and 1 at the target, and the optimiser only sees
``s + N(0, σ²)`` - the benchmark then reports the true ``s``.

Three ways to get ``s`` of a recipe spec (same number up to float rounding; tests check they agree):

- ``gram`` (default for benchmarks): every recipe the search spaces make is, per (component, MBW block), a linear
  combination of the models' deltas from the base: ``θ_b - base_b = Σ_i c_i(b) (M_i - base)_b``. So
  ``|θ - θ*|² = Σ_b Δc_bᵀ G_b Δc_b`` with ``G_b`` the Gram matrix of the deltas inside block ``b`` - one streaming
  pass over the files, then microseconds per trial, exact in fp64. This is what makes thousands of benchmark trials
  affordable on a laptop.
- ``reference``: a plain torch merge of the recipe (fp32, all tensors in memory) - the validation of ``gram``.
- ``kernel``: the real streaming merge kernel (``astolfo_opt.merge``: IncrementalMerger into a distance sink) through
  :class:`benchkit.evaluators.OracleEvaluator`.

:class:`NoisyOracleEvaluator` plugs an oracle into the search core's :class:`Evaluator` interface (so strategies run
through the real study / objective / sampler code) and can emit ``n_steps`` per-prompt proxy scores - a noisy,
rank-preserving function of ``s`` - so pruners have intermediate values (``--mode pruning``).
"""

from __future__ import annotations

import json
import math
import random
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from astolfo_opt.checkpoint.io import open_checkpoint
from astolfo_opt.checkpoint.layout import block_of, canonical_key, component_of
from astolfo_opt.errors import ConfigError
from astolfo_opt.search.evaluator import BatchResult, Evaluator, TrialContext
from astolfo_opt.search.space import BoolParam, Candidate, SearchSpace
from astolfo_opt.search.surrogate.geometry import coefficients

BACKENDS = ("gram", "reference", "kernel")


# ------------------------------------------------------------------------------------------------ pool + target
def make_bench_pool(folder: str | Path, n_models: int, seed: int = 0, n_outliers: int | None = None,
                    outlier_scale: float = 10.0):
    """A tiny real-layout SD1 pool: ``base`` + ``n_models`` finetunes with independent deltas of varied spread, the last
    ``n_outliers`` (default 1 below 8 models, else 2) with a ``outlier_scale``× spread - the far-off model a real pool
    often has. Returns ``(factory Pool, outlier names)``. Files are reused when already present (deterministic)."""
    from astolfo_opt.checkpoint.writer import atomic_write_text
    from astolfo_opt.testing.factory import Pool as FactoryPool
    from astolfo_opt.testing.factory import make_pool

    if n_models < 3:
        raise ConfigError(f"--models {n_models}: the benchmark needs at least 3 models (2 inliers + an outlier)")
    n_out = (1 if n_models < 8 else 2) if n_outliers is None else int(n_outliers)
    rng = random.Random(f"pool|{seed}")
    spreads = [round(rng.uniform(0.03, 0.08), 4) for _ in range(n_models)]
    for i in range(n_models - n_out, n_models):
        spreads[i] = round(spreads[i] * outlier_scale, 4)
    folder = Path(folder)
    stamp = folder / "bench_pool.json"
    want = json.dumps({"n": n_models, "seed": seed, "spreads": spreads})
    files = [folder / "base.safetensors", *(folder / f"m{i:02d}.safetensors" for i in range(n_models))]
    if stamp.is_file() and stamp.read_text() == want and all(f.is_file() for f in files):
        pool = FactoryPool(base=files[0], models=files[1:], folder=folder)
    else:
        pool = make_pool(folder, n=n_models, arch="sd1", size="tiny", seed=seed, spreads=spreads, dtype="fp16")
        atomic_write_text(stamp, want)
    outliers = [p.stem for p in pool.models[n_models - n_out:]]
    return pool, outliers


def draw_target(space: SearchSpace, seed: int, outliers: Sequence[str] = (), p_include: float = 0.5,
                alpha_range: tuple[float, float] = (0.2, 1.0), stream: str = "target") -> dict[str, Any]:
    """Hidden target params: per component each non-outlier finetune in with ``p_include`` (at least 2; the base never:
    it is the MBW anchor), MBW ``α_b ~ U(alpha_range)`` per block. Deterministic in ``seed`` (and ``stream``: another
    stream draws an independent target from the same seed, e.g. the second optimum of a two-cone oracle)."""
    rng = random.Random(f"{stream}|{seed}")
    params: dict[str, Any] = {}
    base = space.pool.base
    for comp in space.components:
        groups = space.groups[comp]
        if len(groups) == 1:
            continue
        eligible = [g for g in groups if base not in g.models and not (set(g.models) & set(outliers))]
        chosen = {g.key for g in eligible if rng.random() < p_include}
        while len(chosen) < min(2, len(eligible)):
            chosen.add(rng.choice(eligible).key)
        for g in groups:
            params[f"inc.{comp}.{g.key}"] = int(g.key in chosen)
    for p in space.params:
        if p.name.startswith("alpha."):
            params[p.name] = rng.uniform(*alpha_range)
        elif p.name not in params:
            params[p.name] = 1 if isinstance(p, BoolParam) else p.high
    return params


def space_from_bench_pool(pool, space_cfg: Mapping[str, Any] | None = None) -> SearchSpace:
    """The search core's ``SearchSpace`` over a factory pool (``inclusion_mbw`` shipped config unless given)."""
    from astolfo_opt.search.pool import resolve_pool

    cfg = dict(space_cfg) if space_cfg is not None else load_conf("space", "inclusion_mbw")
    spool = resolve_pool({"files": [str(p) for p in pool.all], "base": str(pool.base)},
                         cache_file=Path(pool.folder) / "pool_facts.json")
    return SearchSpace(spool, cfg)


def load_conf(group: str, name: str) -> dict[str, Any]:
    """A shipped ``conf/<group>/<name>.yaml`` as a plain dict (the benchmark runs what ``astolfo-opt search`` runs)."""
    import yaml

    path = Path(__file__).resolve().parents[1] / "conf" / group / f"{name}.yaml"
    if not path.is_file():
        raise ConfigError(f"no shipped config conf/{group}/{name}.yaml")
    return dict(yaml.safe_load(path.read_text()) or {})


# ------------------------------------------------------------------------------------------------ coefficients
def _component_blocks(arch: str, keys: Sequence[str], components: Sequence[str], time_embed_block: str):
    """canonical key -> (component, block) for the float tensors the oracle measures."""
    out = {}
    for k in keys:
        comp = component_of(arch, k)
        if comp in components:
            out[k] = (comp, block_of(arch, k, time_embed_block=time_embed_block) or "BASE")
    return out


# ------------------------------------------------------------------------------------------------ oracles
class GramOracle:
    """Exact ``s`` from per-block Gram matrices of the models' deltas from the base (see module doc)."""

    def __init__(self, space: SearchSpace, target_spec: Mapping[str, Any], time_embed_block: str | None = None):
        pool = space.pool
        if not pool.base:
            raise ConfigError("the oracle measures deltas from the base: the pool needs a base")
        self.names = list(pool.names)
        self.base = pool.base
        self.components = list(space.components)
        self.teb = time_embed_block or space.time_embed_block
        self.grams: dict[tuple[str, str], torch.Tensor] = {}
        readers = {n: open_checkpoint(p) for n, p in pool.paths.items()}
        try:
            raw = {n: {canonical_key(pool.arch, k): k for k in r.keys()} for n, r in readers.items()}  # noqa: SIM118 (reader, not dict)
            keys = [k for k in raw[self.base] if all(k in raw[n] for n in self.names)]
            where = _component_blocks(pool.arch, keys, self.components, self.teb)
            for key, cb in where.items():
                b = readers[self.base].get(raw[self.base][key])
                if not b.is_floating_point():
                    continue
                b = b.to(torch.float64).reshape(-1)
                d = torch.stack([readers[n].get(raw[n][key]).to(torch.float64).reshape(-1) - b for n in self.names])
                g = d @ d.T
                self.grams[cb] = self.grams[cb] + g if cb in self.grams else g
        finally:
            for r in readers.values():
                r.close()
        self.uniform_spec = space.candidate(space.uniform_params()).spec
        self.retarget(target_spec)

    def retarget(self, target_spec: Mapping[str, Any], block_weights: Mapping[tuple[str, str], float] | None = None) -> GramOracle:
        """Measure against ``target_spec`` (normalised again at the uniform average); ``block_weights`` scales each
        (component, block) Gram matrix - a metric the searcher does not know. Returns self."""
        if block_weights is not None:
            self.grams = {cb: g * float(block_weights[cb]) for cb, g in self.grams.items()}
        self.target_spec = dict(target_spec)
        self._target_c = {cb: torch.tensor(coefficients(self.target_spec, self.names, *cb), dtype=torch.float64) for cb in self.grams}
        self.norm = 1.0
        self.norm = self.distance(self.uniform_spec) or 1.0
        return self

    def distance(self, spec: Mapping[str, Any]) -> float:
        tot = 0.0
        for cb, g in self.grams.items():
            dc = torch.tensor(coefficients(spec, self.names, *cb), dtype=torch.float64) - self._target_c[cb]
            tot += float(dc @ g @ dc)
        return math.sqrt(max(tot, 0.0))

    def value(self, spec: Mapping[str, Any]) -> float:
        return 1.0 - self.distance(spec) / self.norm


class ReferenceOracle:
    """``s`` by a plain fp32 torch merge of every tensor (all in memory): slow, obviously right; validates GramOracle."""

    def __init__(self, space: SearchSpace, target_spec: Mapping[str, Any], time_embed_block: str | None = None):
        pool = space.pool
        self.names = list(pool.names)
        self.teb = time_embed_block or space.time_embed_block
        self.tensors: dict[str, torch.Tensor] = {}  # key -> [n_models, numel] fp32
        self.where: dict[str, tuple[str, str]] = {}
        readers = {n: open_checkpoint(p) for n, p in pool.paths.items()}
        try:
            raw = {n: {canonical_key(pool.arch, k): k for k in r.keys()} for n, r in readers.items()}  # noqa: SIM118 (reader, not dict)
            keys = [k for k in raw[pool.base or self.names[0]] if all(k in raw[n] for n in self.names)]
            for key, cb in _component_blocks(pool.arch, keys, list(space.components), self.teb).items():
                ts = [readers[n].get(raw[n][key]) for n in self.names]
                if not ts[0].is_floating_point():
                    continue
                self.tensors[key] = torch.stack([t.to(torch.float32).reshape(-1) for t in ts])
                self.where[key] = cb
        finally:
            for r in readers.values():
                r.close()
        self.target = self.merge(target_spec)
        self.norm = 1.0
        self.norm = self.distance(space.candidate(space.uniform_params()).spec) or 1.0

    def merge(self, spec: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        cache: dict[tuple[str, str], torch.Tensor] = {}
        out = {}
        for key, stack in self.tensors.items():
            cb = self.where[key]
            if cb not in cache:
                cache[cb] = torch.tensor(coefficients(spec, self.names, *cb), dtype=torch.float32)
            out[key] = cache[cb] @ stack
        return out

    def distance(self, spec: Mapping[str, Any]) -> float:
        m = self.merge(spec)
        return math.sqrt(sum(float((m[k].double() - self.target[k].double()).pow(2).sum()) for k in m))

    def value(self, spec: Mapping[str, Any]) -> float:
        return 1.0 - self.distance(spec) / self.norm


class KernelOracle:
    """``s`` through the real merge kernel: benchkit.evaluators.OracleEvaluator (IncrementalMerger -> distance sink)."""

    def __init__(self, space: SearchSpace, target_spec: Mapping[str, Any], device: str = "cpu"):
        from benchkit.evaluators import OracleEvaluator

        self.ev = OracleEvaluator(space, dict(target_spec), device=device, out_dtype="fp32")
        self.space = space

    def value(self, spec: Mapping[str, Any]) -> float:
        cand = Candidate({}, dict(spec))
        last = None
        for batch in self.ev.evaluate(cand, TrialContext()):
            last = batch.values[0]
        return float(last)  # type: ignore[arg-type]


#: oracles that each break one assumption of the surrogate's model ``s = a - b·‖θ - θ*‖`` in the pool's Gram metric
#: (issue 15); ``original`` is the model itself. ``r = ‖θ - θ*‖ / ‖θ_u - θ*‖`` (0 at the target, 1 at the uniform average).
MISMATCHES = {
    "original": "s = 1 - r: the cone the surrogate models",
    "block_sensitivity": "hidden per-(component, block) sensitivities, log-uniform in [0.1, 10], scale the Gram metric",
    "quadratic": "quadratic link: s = 1 - r^2 (flat at the optimum, steep far away)",
    "saturating": "saturating link: s = 1 - (1 - e^(-2r)) / (1 - e^(-2)) (steep at the optimum, flat far away)",
    "two_optima": "the max of two cones: s = max(1 - r1, 0.9 - r2) around two independent targets (the second 0.1 lower)",
    "rank_only": "s = 1 - r, but the searcher sees w(s + noise) for a random monotone piecewise-linear w whose slopes "
                 "span three decades: only the order of observations carries information",
}
SECOND_OPTIMUM = 0.9


class MismatchedOracle:
    """The true ``s`` of a recipe under one of :data:`MISMATCHES`, plus ``observe``: what the searcher is shown of a
    noisy value (the identity except for ``rank_only``). Seeded: the same seed gives the same hidden sensitivities,
    second target and warp."""

    def __init__(self, space: SearchSpace, target_spec: Mapping[str, Any], kind: str, seed: int,
                 outliers: Sequence[str] = ()):
        if kind not in MISMATCHES:
            raise ConfigError(f"oracle mismatch {kind!r} is unknown; use one of {', '.join(MISMATCHES)}")
        self.kind = kind
        self.gram = GramOracle(space, target_spec)
        self.second: GramOracle | None = None
        rng = random.Random(f"mismatch|{kind}|{seed}")
        if kind == "block_sensitivity":
            self.block_weights = {cb: 10 ** rng.uniform(-1.0, 1.0) for cb in sorted(self.gram.grams)}
            self.gram.retarget(target_spec, self.block_weights)
        elif kind == "two_optima":
            import copy

            second = space.candidate(draw_target(space, seed, outliers, stream="second-target")).spec
            self.second = copy.copy(self.gram).retarget(second)
        elif kind == "rank_only":
            knots = [-1.5 + 2.75 * i / 8 for i in range(9)]  # s + noise spans about [-1.5, 1.25]
            rises = [10 ** rng.uniform(-1.5, 1.5) for _ in range(8)]
            ys = [0.0]
            for r in rises:
                ys.append(ys[-1] + r / sum(rises))
            self._warp = (knots, ys)

    def value(self, spec: Mapping[str, Any]) -> float:
        r = self.gram.distance(spec) / self.gram.norm
        if self.kind == "quadratic":
            return 1.0 - r * r
        if self.kind == "saturating":
            return 1.0 - (1.0 - math.exp(-2.0 * r)) / (1.0 - math.exp(-2.0))
        if self.second is not None:
            return max(1.0 - r, SECOND_OPTIMUM - self.second.distance(spec) / self.second.norm)
        return 1.0 - r

    def observe(self, y: float) -> float:
        """What the searcher sees of the noisy value ``y``: monotone, so the best observation stays the best."""
        if self.kind != "rank_only":
            return y
        xs, ys = self._warp
        i = min(max(sum(x <= y for x in xs) - 1, 0), len(xs) - 2)
        slope = (ys[i + 1] - ys[i]) / (xs[i + 1] - xs[i])
        return ys[i] + slope * (y - xs[i])  # the end pieces extend linearly past the knots


def make_oracle(backend: str, space: SearchSpace, target_spec: Mapping[str, Any], device: str = "cpu"):
    if backend == "gram":
        return GramOracle(space, target_spec)
    if backend == "reference":
        return ReferenceOracle(space, target_spec)
    if backend == "kernel":
        return KernelOracle(space, target_spec, device=device)
    raise ConfigError(f"oracle backend {backend!r} is unknown; use one of {', '.join(BACKENDS)}")


class CachedOracle:
    """Memoises ``value`` by recipe hash (duplicates and re-scoring of the study's trials are free)."""

    def __init__(self, oracle):
        self.oracle = oracle
        self.cache: dict[str, float] = {}
        self.observe = getattr(oracle, "observe", None)

    def value(self, spec: Mapping[str, Any]) -> float:
        from astolfo_opt.search.space import spec_hash

        h = spec_hash(spec)
        if h not in self.cache:
            self.cache[h] = float(self.oracle.value(spec))
        return self.cache[h]


# ------------------------------------------------------------------------------------------------ evaluator
class NoisyOracleEvaluator(Evaluator):
    """What the optimiser sees: ``s + N(0, σ²)`` (``n_steps == 1``), or with ``n_steps > 1`` a per-prompt proxy score
    ``s + N(0, σ_p²)`` per step whose running mean the objective reports, so pruners can stop bad trials early.

    ``step_seconds`` is the simulated render cost of one step (the pruning benchmark's clock); noise is seeded by
    ``(seed, evaluation index)`` so a run is reproducible. ``true_values`` records the exact ``s`` per evaluation."""

    def __init__(self, oracle, *, noise: float = 0.02, seed: int = 0, n_steps: int = 1, prompt_noise: float | None = None,
                 step_seconds: float = 0.0, render=None):
        self.oracle = oracle
        self.noise = float(noise)
        self.seed = seed
        self.n_steps = int(n_steps)
        # per-prompt noise so that the mean over n_steps prompts has std ``noise``
        self.prompt_noise = float(prompt_noise) if prompt_noise is not None else self.noise * math.sqrt(self.n_steps)
        self.step_seconds = float(step_seconds)
        self.render = render
        self.names = ["oracle"]
        self.directions = ["maximize"]
        self.scorer_names = ["oracle_proxy"]
        self.prompt_set_hash = f"oracle-steps{self.n_steps}"
        self.out_dtype = "fp32"
        self.calls = 0
        self.steps_run = 0
        self.render_seconds = 0.0
        self.true_values: list[float] = []

    def evaluate(self, candidate: Candidate, ctx: TrialContext) -> Iterator[BatchResult]:
        t0 = time.perf_counter()
        s = float(self.oracle.value(candidate.spec))
        ctx.timings["merge"] += time.perf_counter() - t0
        self.true_values.append(s)
        rng = random.Random(f"noise|{self.seed}|{self.calls}")
        self.calls += 1
        ctx.extras["true_s"] = s
        shown = getattr(self.oracle, "observe", None) or (lambda y: y)
        if self.n_steps == 1:
            v = shown(s + (rng.gauss(0.0, self.noise) if self.noise else 0.0))
            yield BatchResult(1, [v], rows=[{"prompt": "oracle", "seed": 0, "scores": {"oracle_proxy": v}, "values": [v]}])
            return
        total = 0.0
        for step in range(1, self.n_steps + 1):
            t1 = time.perf_counter()
            if self.render is not None:
                self.render(step)
            elif self.step_seconds:
                time.sleep(self.step_seconds)
            dt = time.perf_counter() - t1
            self.render_seconds += dt
            ctx.timings["render"] += dt
            self.steps_run += 1
            v = shown(s + (rng.gauss(0.0, self.prompt_noise) if self.prompt_noise else 0.0))
            total += v
            yield BatchResult(step, [total / step], rows=[{"prompt": f"p{step}", "seed": step, "scores": {"oracle_proxy": v},
                                                            "values": [v]}])
