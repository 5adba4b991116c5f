"""Evaluators for tests and benchmarks, plugged in by dotted path (``evaluator.kind=benchkit.evaluators.synthetic``).

Not part of the installed package: they stand in for render + score where a study's *machinery* or a search
strategy's *efficiency* is measured. ``synthetic`` is a deterministic preference over models and alphas;
``oracle`` is the weight-space distance to a hidden target merge through the real merge kernel.
"""

from __future__ import annotations

import hashlib
import math
import random
import time
from collections.abc import Iterator, Mapping
from typing import Any

from astolfo_opt.checkpoint.layout import MERGE_COMPONENTS, component_of
from astolfo_opt.errors import ConfigError
from astolfo_opt.search.evaluator import BatchResult, Evaluator, HashingSink, TeeSink, TrialContext, make_merger
from astolfo_opt.search.space import Candidate, SearchSpace, spec_to_recipe


# ------------------------------------------------------------------------------------------------ synthetic
class SyntheticEvaluator(Evaluator):
    """A deterministic stand-in for render + score, for tests of the study machinery.

    A hidden preference (from ``seed``) picks the "good" models per component and a good MBW alpha; the value of a
    candidate is how well it matches, plus optional per-batch noise. ``n_steps`` batches are reported so pruners
    have intermediate values; ``sleep`` seconds per batch make trials slow enough to kill in tests."""

    def __init__(self, space: SearchSpace, n_steps: int = 4, noise: float = 0.0, seed: int = 0, sleep: float = 0.0,
                 multi: bool = False):
        self.space = space
        self.n_steps = int(n_steps)
        self.noise = float(noise)
        self.sleep = float(sleep)
        self.multi = multi
        rng = random.Random(seed)
        self.good = {c: {g.rep for g in gs if rng.random() < 0.5} or {gs[0].rep} for c, gs in space.groups.items()}
        self.good_alpha = rng.uniform(0.3, 0.9)
        self.names = ["match", "alpha"] if multi else ["objective"]
        self.directions = ["maximize"] * len(self.names)
        self.scorer_names = ["synthetic"]
        self.prompt_set_hash = "synthetic"
        self.hashes_tensors = False  # its component hashes are of the recipe: export has nothing to verify
        self.seed = seed

    def true_values(self, spec: Mapping[str, Any]) -> list[float]:
        match, alpha_err = [], []
        for comp, c in spec["components"].items():
            members = {m["model"] for m in c["members"]}
            good = self.good.get(comp, set())
            if good:
                match.append(len(members & good) / len(members | good))
            for a in (c.get("alpha") or {}).values():
                alpha_err.append(abs(a - self.good_alpha))
        m = sum(match) / max(len(match), 1)
        a = 1.0 - (sum(alpha_err) / len(alpha_err) if alpha_err else 0.0)
        return [m, a] if self.multi else [m + 0.25 * a]

    def evaluate(self, candidate: Candidate, ctx: TrialContext) -> Iterator[BatchResult]:
        truth = self.true_values(candidate.spec)
        ctx.component_hashes = {c: hashlib.blake2b(repr(sorted(v.items())).encode(), digest_size=16).hexdigest()
                                for c, v in candidate.spec["components"].items()}
        rng = random.Random(f"{self.seed}|{candidate.hash}")
        sums = [0.0] * len(truth)
        for step in range(1, self.n_steps + 1):
            if self.sleep:
                time.sleep(self.sleep)
            vals = [t + (rng.gauss(0, self.noise) if self.noise else 0.0) for t in truth]
            sums = [s + v for s, v in zip(sums, vals, strict=True)]
            ctx.timings["score"] += 1e-6
            yield BatchResult(step, [s / step for s in sums], rows=[{"prompt": f"p{step}", "seed": step, "scores": {"synthetic": vals[0]},
                                                                      "values": vals}])


# ------------------------------------------------------------------------------------------------ oracle
class _DistanceSink:
    """Accumulates ``sum (θ - θ*)²`` per component against target tensors (fp32), for the oracle evaluator."""

    def __init__(self, arch: str, target: Mapping[str, Any]):
        self.arch = arch
        self.target = target
        self.dist2: dict[str, float] = {}
        self._cur: dict[str, float] = {}

    def begin(self, plan) -> None:
        self._cur = {}

    def consume(self, key: str, tensor) -> None:
        comp = component_of(self.arch, key)
        ref = self.target.get(key)
        if comp not in MERGE_COMPONENTS or ref is None or not tensor.is_floating_point():
            return
        d = (tensor.detach().float().cpu() - ref).pow(2).sum().item()
        self._cur[comp] = self._cur.get(comp, 0.0) + d

    def end(self) -> None:
        self.dist2.update(self._cur)


class OracleEvaluator(Evaluator):
    """Weight-space oracle for search-efficiency benchmarks: ``s = 1 - |θ - θ*| / |θ_uniform - θ*|``.

    ``target`` is a recipe spec (θ* = its merge); θ_uniform is the space's uniform-average warm start. Merges go
    through the real kernel (IncrementalMerger, so unchanged components are not re-merged) into a sink that measures
    the distance; there is no rendering, so thousands of trials are cheap and the optimum is known (s = 1)."""

    def __init__(self, space: SearchSpace, target: Mapping[str, Any] | Candidate, device: str = "auto", out_dtype: str = "fp32"):
        import torch

        from astolfo_opt.merge.kernel import merge
        from astolfo_opt.merge.sinks import CollectSink

        self.space = space
        self.arch = space.pool.arch
        self.out_dtype = out_dtype
        dt = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[out_dtype]
        target_spec = target.spec if isinstance(target, Candidate) else dict(target)
        self.target_spec = target_spec
        comps = list(space.components)
        t_sink = CollectSink()
        merge(spec_to_recipe(target_spec), t_sink, device=device, out_dtype=torch.float32, components=comps)
        self.target = {k: v.float().cpu() for k, v in t_sink.tensors.items()}
        uni = space.candidate(space.uniform_params())
        d = _DistanceSink(self.arch, self.target)
        merge(uni.recipe(), d, device=device, out_dtype=dt, components=comps)
        self.norm = math.sqrt(sum(d.dist2.values())) or 1.0
        self.merger = make_merger(device, dt)
        self.dist = _DistanceSink(self.arch, self.target)
        self.hasher = HashingSink(self.arch)
        self.names = ["oracle"]
        self.directions = ["maximize"]
        self.scorer_names = ["oracle"]
        self.prompt_set_hash = None

    def evaluate(self, candidate: Candidate, ctx: TrialContext) -> Iterator[BatchResult]:
        t0 = time.perf_counter()
        stats = self.merger.merge(candidate.recipe(), TeeSink(self.dist, self.hasher))
        ctx.timings["merge"] += time.perf_counter() - t0
        ctx.merge_info = {"changed": list(getattr(self.merger, "last_changed", [])), "bytes_read": getattr(stats, "bytes_read", None)}
        ctx.component_hashes = dict(self.hasher.hashes)
        ctx.fingerprints = dict(self.hasher.fingerprints)
        t1 = time.perf_counter()
        s = 1.0 - math.sqrt(sum(self.dist.dist2.get(c, 0.0) for c in self.space.components)) / self.norm
        ctx.timings["score"] += time.perf_counter() - t1
        yield BatchResult(1, [s], rows=[{"prompt": "oracle", "seed": 0, "scores": {"oracle": s}, "values": [s]}])



def synthetic(space: SearchSpace, cfg: Mapping[str, Any]) -> SyntheticEvaluator:
    """``evaluator.kind=benchkit.evaluators.synthetic`` (options ``evaluator.n_steps / noise / sleep / multi``)."""
    ev = dict(cfg.get("evaluator") or {})
    return SyntheticEvaluator(space, n_steps=int(ev.get("n_steps", 4)), noise=float(ev.get("noise", 0.0)),
                              seed=int(cfg.get("seed", 0)), sleep=float(ev.get("sleep", 0.0)), multi=bool(ev.get("multi", False)))


def oracle(space: SearchSpace, cfg: Mapping[str, Any]) -> OracleEvaluator:
    """``evaluator.kind=benchkit.evaluators.oracle`` with ``evaluator.target``: params of the hidden optimum."""
    ev = dict(cfg.get("evaluator") or {})
    target = ev.get("target")
    if not target:
        raise ConfigError("evaluator.kind=benchkit.evaluators.oracle needs evaluator.target: a params mapping of the space")
    return OracleEvaluator(space, space.candidate({**space.uniform_params(), **dict(target)}), device=str(cfg.get("device", "auto")),
                           out_dtype=str(ev.get("out_dtype", "fp32")))
