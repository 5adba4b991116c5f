"""Evaluators: what turns a candidate recipe into objective values, batch by batch.

The study core (objective, pruning, storage, greedy, export bookkeeping) only talks to the :class:`Evaluator`
interface. The package ships one evaluator, :class:`PipelineEvaluator` (IncrementalMerger -> RenderPipeline.swap_sink
-> render_batches -> scorers Objective); tests and benchmarks plug theirs in by dotted path (``evaluator.kind=
benchkit.evaluators.synthetic`` / ``.oracle``: the repository's ``benchkit`` package, not installed with this one).

``evaluate`` is a generator: one :class:`BatchResult` per prompt batch with the *running* value(s) over everything
scored so far, so the objective can ``trial.report`` / ``should_prune`` between batches and a pruned trial stops
rendering at once. Evaluators fill the :class:`TrialContext` with the time split and a hash of the merged tensors
(the export re-merges and must reproduce it).
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from astolfo_opt.checkpoint.layout import MERGE_COMPONENTS, component_of
from astolfo_opt.errors import ConfigError
from astolfo_opt.search.space import Candidate, SearchSpace


@dataclass
class BatchResult:
    """After one batch: ``step`` = images scored so far, ``values`` = running objective value(s)."""

    step: int
    values: list[float]
    #: rows of this batch: {"prompt", "seed", "scores": {scorer: raw}, "values": [...]}
    rows: list[dict[str, Any]] = field(default_factory=list)
    images: list[Any] = field(default_factory=list)
    labels: list[str] = field(default_factory=list)


@dataclass
class TrialContext:
    """Per-trial bookkeeping the evaluator fills in (read by the objective for user attrs and artifacts)."""

    number: int = -1
    timings: dict[str, float] = field(default_factory=lambda: {"merge": 0.0, "render": 0.0, "score": 0.0})
    #: merged-tensor hash per merge component (identical to what an export writes)
    component_hashes: dict[str, str] = field(default_factory=dict)
    #: per component, per MBW block [Σ r·x, Σ|x|] of the merged tensors (tells rounding drift from a different merge)
    fingerprints: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    merge_info: dict[str, Any] = field(default_factory=dict)
    extras: dict[str, Any] = field(default_factory=dict)

    @property
    def tensor_hash(self) -> str | None:
        return combine_hashes(self.component_hashes) if self.component_hashes else None


def combine_hashes(component_hashes: Mapping[str, str]) -> str:
    h = hashlib.sha256()
    for comp in sorted(component_hashes):
        h.update(f"{comp}={component_hashes[comp]};".encode())
    return h.hexdigest()


class Evaluator:
    """Base class. Subclasses set ``names``/``directions``/``n_steps`` and implement :meth:`evaluate`."""

    names: list[str] = ["objective"]
    directions: list[str] = ["maximize"]
    n_steps: int = 1
    scorer_names: list[str] = []
    prompt_set_hash: str | None = None
    prompt_set_name: str | None = None
    #: merge output dtype (export must use the same to reproduce the tensor hash)
    out_dtype: str = "fp16"
    #: which objective the values are (the dashboard shows it per trial): "automatic", or a calibration's label
    scored_with: str = "automatic"
    #: whether ``component_hashes`` are of real merged tensors (export verifies against them); a stand-in that
    #: hashes the recipe instead sets False
    hashes_tensors: bool = True

    def evaluate(self, candidate: Candidate, ctx: TrialContext) -> Iterator[BatchResult]:
        raise NotImplementedError

    def close(self) -> None:
        pass

    def describe(self) -> str:
        return type(self).__name__


# ------------------------------------------------------------------------------------------------ sinks
FINGERPRINT_SAMPLES = 4096


class HashingSink:
    """A merge sink that hashes what it is given per component (key, dtype, shape, bytes in emission order), and keeps
    a numeric fingerprint per component and MBW block (``[Σ r·x, Σ|x|]`` in fp64 over a strided sample of each
    tensor, ``r`` fixed pseudo-random ±1 per key; see :func:`fingerprints_close`).

    Tee it beside the live-pipeline sink during a trial and beside the file writer at export: equal hashes prove the
    exported file holds the tensors that were rendered and scored. The IncrementalMerger updates fp32 running sums,
    so after an incremental update a handful of elements can differ from a fresh merge in the last bit of fp16;
    the fingerprints tell that rounding drift from a different merge.
    Components not emitted by an incremental merge keep their previous hash and fingerprint."""

    def __init__(self, arch: str, previous: Mapping[str, str] | None = None):
        self.arch = arch
        self.hashes: dict[str, str] = dict(previous or {})
        self.fingerprints: dict[str, dict[str, list[float]]] = {}
        self._h: dict[str, Any] = {}
        self._fp: dict[str, dict[str, list[float]]] = {}
        self._keys: dict[str, tuple[str | None, str]] = {}  # key -> (component, MBW block): fixed per study
        self._signs: dict[str, Any] = {}  # key -> its fixed ±1 projection (a few KB each, made once per study)

    def begin(self, plan) -> None:
        self._h = {}
        self._fp = {}

    def consume(self, key: str, tensor) -> None:
        import torch

        from astolfo_opt.checkpoint.layout import block_of

        meta = self._keys.get(key)
        if meta is None:
            meta = self._keys[key] = (component_of(self.arch, key), block_of(self.arch, key))
        comp, block = meta
        if comp not in MERGE_COMPONENTS:
            return
        h = self._h.get(comp)
        if h is None:
            h = self._h[comp] = hashlib.blake2b(digest_size=16)
        t = tensor.detach().to("cpu").contiguous()
        h.update(f"{key}|{str(t.dtype)}|{tuple(t.shape)}|".encode())
        if t.numel():
            h.update(memoryview(t.reshape(-1).view(torch.uint8).numpy()))  # no bytes copy
            if t.is_floating_point():
                flat = t.reshape(-1)
                step = max(1, flat.numel() // FINGERPRINT_SAMPLES)
                d = flat[::step].double()
                signs = self._signs.get(key)
                if signs is None or signs.numel() != d.numel():
                    signs = self._signs[key] = _key_signs(key, d.numel())
                acc = self._fp.setdefault(comp, {}).setdefault(block, [0.0, 0.0])
                acc[0] += float(torch.dot(d, signs))
                acc[1] += float(d.abs().sum())

    def end(self) -> None:
        self.hashes.update({c: h.hexdigest() for c, h in self._h.items()})
        self.fingerprints.update(self._fp)
        self._h = {}
        self._fp = {}


def _key_signs(key: str, n: int):
    """The fixed pseudo-random ±1 vector of ``key`` (seeded by the key name, so every process agrees)."""
    import torch

    g = torch.Generator().manual_seed(int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little") >> 1)
    return torch.randint(0, 2, (n,), generator=g, dtype=torch.int8).double().mul_(2).sub_(1)


def fingerprints_close(a: Mapping[str, Any], b: Mapping[str, Any], rtol: float = 1e-6) -> bool:
    """True when two component fingerprints ({block: [Σ r·x, Σ|x|]}) agree within ``rtol`` of the block's magnitude.

    The signed projection ``Σ r·x`` (fixed pseudo-random ±1 per sampled element) moves by ~``ε·sqrt(n)`` when a merge
    differs by ``ε`` per element, but only by a few ulps when a handful of elements differ by one ulp (incremental
    rounding drift), so drift stays ~1e-7 of ``Σ|x|`` and any real recipe change is orders of magnitude above."""
    if set(a) != set(b):
        return False
    for blk, (pa, ma) in a.items():
        pb, mb = b[blk]
        scale = max(abs(ma), abs(mb), 1e-12)
        if abs(pa - pb) > rtol * scale or abs(ma - mb) > rtol * scale:
            return False
    return True


class TeeSink:
    """Forward every call to several sinks (live pipeline + hasher, file writer + hasher)."""

    def __init__(self, *sinks: Any):
        self.sinks = [s for s in sinks if s is not None]

    def begin(self, plan) -> None:
        for s in self.sinks:
            s.begin(plan)

    def direct_target(self, key: str):
        """The first sink's direct destination (see :meth:`SwapSink.direct_target`); the others still get the tensor."""
        fn = getattr(self.sinks[0], "direct_target", None) if self.sinks else None
        return fn(key) if fn is not None else None

    def mark_written(self, key: str) -> None:
        fn = getattr(self.sinks[0], "mark_written", None) if self.sinks else None
        if fn is not None:
            fn(key)

    def consume(self, key: str, tensor) -> None:
        for s in self.sinks:
            s.consume(key, tensor)

    def end(self) -> None:
        for s in self.sinks:
            s.end()


def make_merger(device: str, out_dtype):
    """The IncrementalMerger: only the components whose recipe changed are merged again."""
    from astolfo_opt.merge.incremental import IncrementalMerger

    return IncrementalMerger(device=device, out_dtype=out_dtype)


# ------------------------------------------------------------------------------------------------ real pipeline
class PipelineEvaluator(Evaluator):
    """The real thing: IncrementalMerger -> RenderPipeline.swap_sink (tee'd with a hasher) -> render_batches ->
    scorers Objective. The pipeline is built once from the base model; each trial only swaps the merged tensors of
    the components that changed, so a trial's cost is render + score plus a partial merge."""

    def __init__(self, space: SearchSpace, render_cfg: Mapping[str, Any], scorer_cfg: Mapping[str, Any], *,
                 device: str = "auto", variant: str | None = None, out_dtype: str = "fp16", hash_tensors: bool = True,
                 dtype: str | None = None):
        import torch

        from astolfo_opt.render.pipeline import build_pipeline
        from astolfo_opt.render.prompts import load_prompt_set
        from astolfo_opt.render.settings import RenderSettings
        from scorers.registry import build_objective

        self.space = space
        pool = space.pool
        self.objective = build_objective(scorer_cfg, key="scorer")
        self.names = list(self.objective.names)
        self.directions = list(self.objective.directions)
        self.scorer_names = [s.name for s in self.objective.scorers]
        rc = dict(render_cfg)
        ps = rc.get("prompt_set")
        if not ps:
            raise ConfigError("render.prompt_set is required (a YAML prompt set path or a shipped set name)")
        self.prompt_set = load_prompt_set(_resolve_prompt_set(ps))
        n = rc.get("n_prompts")
        self.prompts = list(self.prompt_set.prompts)[: int(n)] if n else list(self.prompt_set.prompts)
        self.prompt_set_hash = self.prompt_set.hash
        self.prompt_set_name = self.prompt_set.name
        # A held-out prompt set, rendered only for trials that finish (never for pruned ones) and scored beside the
        # objective, never optimised: a merge that games the scorer on the search prompts shows up as a gap here.
        hps = rc.get("heldout_prompt_set")
        self.heldout = list(load_prompt_set(_resolve_prompt_set(hps)).prompts) if hps else []
        if self.heldout and rc.get("heldout_n_prompts"):
            self.heldout = self.heldout[: int(rc["heldout_n_prompts"])]
        fields = {k: rc[k] for k in ("width", "height", "steps", "guidance_scale", "guidance_rescale", "scheduler", "clip_skip",
                                                "batch_size") if k in rc}
        self.settings = RenderSettings(**fields)
        bs = max(int(getattr(self.settings, "batch_size", 1) or 1), 1)
        self.n_steps = math.ceil(len(self.prompts) / bs)
        self.out_dtype = out_dtype
        dt = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[out_dtype]
        base = pool.base or pool.names[0]
        t0 = time.perf_counter()
        self.pipe = build_pipeline(pool.paths[base], variant=variant or pool.variant, device=device,
                                   dtype=(None if dtype in (None, "auto") else {"fp32": torch.float32, "fp16": torch.float16,
                                                                                  "bf16": torch.bfloat16}[dtype]))
        self.build_seconds = time.perf_counter() - t0
        #: the render variant the base file picked (or pool.variant): sdxl-v for a v-prediction SDXL pool
        self.variant = self.pipe.variant
        self.merger = make_merger(device, dt)
        self.hasher = HashingSink(pool.arch) if hash_tensors else None

    def describe(self) -> str:
        return (f"pipeline ({self.variant}): {len(self.prompts)} prompts ({self.prompt_set_name}) in {self.n_steps} batches; "
                f"objective {self.names} {self.directions}")

    def evaluate(self, candidate: Candidate, ctx: TrialContext) -> Iterator[BatchResult]:
        t0 = time.perf_counter()
        stats = self.merger.merge(candidate.recipe(), TeeSink(self.pipe.swap_sink(), self.hasher))
        ctx.timings["merge"] += time.perf_counter() - t0
        ctx.merge_info = {"changed": list(getattr(self.merger, "last_changed", [])),
                          "bytes_read": getattr(stats, "bytes_read", None)}
        if self.hasher is not None:
            ctx.component_hashes = dict(self.hasher.hashes)
            ctx.fingerprints = dict(self.hasher.fingerprints)
        n_obj = len(self.names)
        sums, count = [0.0] * n_obj, 0
        holdout: dict[str, list[float]] = {}  # holdout scorer -> [sum, count] over the search prompts' images
        t_r = time.perf_counter()
        for batch in self.pipe.render_batches(self.prompts, self.settings):
            t_s = time.perf_counter()
            ctx.timings["render"] += t_s - t_r
            images = [img for _, img in batch]
            texts = [p.prompt for p, _ in batch]
            res = self.objective.evaluate(images, texts)
            ctx.timings["score"] += time.perf_counter() - t_s
            for name, v in res.holdout.items():
                acc = holdout.setdefault(name, [0.0, 0])
                acc[0] += float(v) * len(batch)
                acc[1] += len(batch)
            if holdout:
                ctx.extras["holdout"] = {k: a / n for k, (a, n) in holdout.items() if n}
            rows = []
            for i, (p, _) in enumerate(batch):
                vals = res.per_image[i] if res.per_image else res.values
                rows.append({"prompt": p.prompt, "seed": p.seed, "scores": {k: v[i] for k, v in res.per_scorer.items()},
                             "values": list(vals)})
                sums = [s + float(v) for s, v in zip(sums, vals, strict=True)]
            count += len(batch)
            yield BatchResult(count, [s / count for s in sums], rows=rows, images=images,
                              labels=[f"{p.prompt[:40]} | s{p.seed}" for p, _ in batch])
            t_r = time.perf_counter()
        if self.heldout:  # reached only when the trial was not pruned (the objective stops iterating on a prune)
            ctx.extras.setdefault("holdout", {}).update(self.heldout_check())
            ctx.timings["render"] += time.perf_counter() - t_r

    def heldout_check(self) -> dict[str, float]:
        """Render the held-out prompt set with the current weights and score it (``heldout_prompts/<objective>``)."""
        images, texts = [], []
        for batch in self.pipe.render_batches(self.heldout, self.settings):
            images += [img for _, img in batch]
            texts += [p.prompt for p, _ in batch]
        res = self.objective.evaluate(images[:1], texts[:1], holdout_images=images, holdout_prompts=texts)
        return {k: float(v) for k, v in res.holdout.items() if k.startswith("heldout_prompts/")}


def _resolve_prompt_set(ps: str | Path) -> Path:
    p = Path(str(ps)).expanduser()
    if p.is_file():
        return p
    from importlib import resources

    shipped = resources.files("astolfo_opt.render").joinpath("prompt_sets", f"{ps}.yaml")
    if shipped.is_file():
        return Path(str(shipped))
    raise ConfigError(f"prompt set {ps!r} not found: give a YAML path or a shipped set name (render.prompt_set=...)")


def build_evaluator(kind: str, space: SearchSpace, cfg: Mapping[str, Any]) -> Evaluator:
    """The evaluator of ``evaluator.kind``: ``pipeline``, or a dotted path ``module.factory`` to a callable
    ``factory(space, cfg) -> Evaluator`` (``cfg``: the resolved top-level config; its options under ``evaluator.*``)."""
    ev = dict(cfg.get("evaluator") or {})
    if kind == "pipeline":
        return PipelineEvaluator(space, cfg.get("render") or {}, cfg.get("scorer") or {}, device=str(cfg.get("device", "auto")),
                                 variant=(cfg.get("pool") or {}).get("variant"), out_dtype=str(ev.get("out_dtype", "fp16")),
                                 hash_tensors=bool(ev.get("hash_tensors", True)), dtype=ev.get("dtype"))
    if "." not in kind:
        raise ConfigError(f"evaluator.kind={kind!r} is unknown; use pipeline or a dotted path module.factory")
    import importlib

    module, _, attr = kind.rpartition(".")
    try:
        factory = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"evaluator.kind={kind}: cannot load it ({type(e).__name__}: {e}); benchkit evaluators need "
                          "the repository root on the Python path") from None
    return factory(space, cfg)


def as_list(x: float | Sequence[float]) -> list[float]:
    return [float(x)] if isinstance(x, int | float) else [float(v) for v in x]
