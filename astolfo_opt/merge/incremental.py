"""Incremental merges for the trial loop: a recipe that differs from the previous one by k models reads k models.

For a component whose method is a normalised linear form (``weighted_average``: the ensemble, with or without an MBW
anchor; coefficients from the merge-method registry) the merger keeps, per key, the fp32 running sum ``S = Σ wᵢθᵢ``
and the weight total ``W`` of the included members, plus the anchor's tensor. A new recipe changes some (model,
block) weights by Δ: only those models are read, only for keys of those blocks, and ``S += Δ·θ``. The output is
``θ_b = (1-α_b)·anchor + α_b·S/W``, so an α change reads nothing. Other methods (weighted_sum, add_difference, copy:
the pairwise AutoMBW space; TIES, DARE, geometric median) cache their members' tensors, so α and parameter changes
read nothing. Components whose recipe did not change are not emitted at all. Caches live on the merge device (host
RAM or GPU) within ``budget_bytes``; a component that does not fit is merged from scratch. Sums are rebuilt from
scratch every ``refresh_every`` updates, bounding fp32 drift.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

import psutil
import torch

from astolfo_opt.checkpoint.layout import block_of
from astolfo_opt.errors import CheckpointError
from astolfo_opt.merge.execute import MergeSink, _all_finite, add_into, narrow, run_plan, update_and_narrow
from astolfo_opt.merge.kernel import KeyComputer
from astolfo_opt.merge.plan import MergeStats, ModelSet, PlannedTensor, layout_for, parse_dtype, plan_output, resolve_device
from astolfo_opt.merge.recipe import ComponentRecipe, Recipe


@dataclass
class _EnsembleCache:
    weights: dict[tuple[str, str], float] = field(default_factory=dict)  # (model, block) -> weight in S
    sums: dict[str, torch.Tensor] = field(default_factory=dict)
    totals: dict[str, float] = field(default_factory=dict)
    anchor_name: str | None = None
    anchors: dict[str, torch.Tensor | None] = field(default_factory=dict)
    updates: int = 0
    nbytes: int = 0


@dataclass
class _CompState:
    hash: str
    models_key: tuple
    ensemble: _EnsembleCache | None = None


class IncrementalMerger:
    """Merges a sequence of recipes over one pool, doing only the work each new recipe changes (module docstring).

    ``stats.tensors_read`` / ``bytes_read`` / ``models_read`` of each ``merge`` call say what was actually read;
    ``last_changed`` lists the components emitted; ``used_bytes()`` the cache size (within ``budget_bytes``, default
    half of the free host / GPU memory)."""

    def __init__(self, device: str | torch.device = "auto", budget_bytes: int | None = None,
                 out_dtype: str | torch.dtype = torch.float16, threads: int | None = None, refresh_every: int = 64):
        self.device = resolve_device(device)
        self.out_dtype = parse_dtype(out_dtype)
        # An update reads only the changed models and streams the cached fp32 sums once: memory-bound, and on CPU
        # one worker beats two (measured on the 2-core box, 12 full-size inputs, one flip: 1.1-1.4 s with 1 thread,
        # 1.2-2.1 s with 2 - the two compete for the shared cache). CUDA keeps one stream per worker thread.
        self.threads = threads if threads is not None else (1 if self.device.type == "cpu" else None)
        self.refresh_every = refresh_every
        if budget_bytes is None:
            if self.device.type == "cuda":
                free, _ = torch.cuda.mem_get_info(self.device)
                budget_bytes = int(free * 0.5)
            else:
                budget_bytes = int(psutil.virtual_memory().available * 0.5)
        self.budget_bytes = budget_bytes
        self._models: ModelSet | None = None
        self._models_key: tuple | None = None
        self._state: dict[str, _CompState] = {}
        self._raw: dict[tuple[str, str], torch.Tensor] = {}  # (model, key) -> tensor, for non-ensemble methods
        self._raw_bytes = 0
        self.last_changed: list[str] = []

    # -- bookkeeping -----------------------------------------------------------------------------------------
    def _model_set(self, recipe: Recipe) -> ModelSet:
        """One growing set of open readers: trial recipes name different subsets of the pool, and caches are keyed
        by model name, so only a name that now points at another file (or another architecture) starts afresh."""
        if self._models is not None and self._models.serves(recipe.models) and recipe.arch in (None, self._models.arch):
            self._models.extend(recipe.models)
            return self._models
        if self._models is not None:
            self._models.close()
        self._models = None
        self._state.clear()
        self._raw.clear()
        self._raw_bytes = 0
        self._models = ModelSet(recipe.models, recipe.arch)
        self._models_key = tuple(sorted(recipe.models.items()))
        return self._models

    def used_bytes(self) -> int:
        return self._raw_bytes + sum(s.ensemble.nbytes for s in self._state.values() if s.ensemble)

    def close(self) -> None:
        if self._models is not None:
            self._models.close()
        self._models = None
        self._state.clear()
        self._raw.clear()

    # -- the trial-loop entry point --------------------------------------------------------------------------
    def merge(self, recipe: Recipe, sink: MergeSink, *, force: bool = False, progress: bool = False) -> MergeStats:
        t0 = time.perf_counter()
        recipe.validate()
        ms = self._model_set(recipe)
        layout = layout_for(ms)
        comps = layout.components
        changed = [c for c in comps if force or c not in self._state or self._state[c].hash != recipe.component_hash(c)]
        self.last_changed = changed
        plan = plan_output(recipe, ms, layout, self.out_dtype, changed) if changed else []
        kcs = []
        by_comp: dict[str, list[PlannedTensor]] = {}
        for pt in plan:
            by_comp.setdefault(pt.component, []).append(pt)
        computers = {}
        for comp in changed:
            cr = recipe.components.get(comp)
            kc = KeyComputer(recipe, ms, layout, self.device)  # one per component: stats and load hooks stay separate
            kcs.append(kc)
            computers[comp] = self._prepare(comp, cr, recipe, kc, by_comp.get(comp, []))

        def compute(pt: PlannedTensor) -> torch.Tensor:
            t = computers[pt.component](pt)
            if t is None:
                raise CheckpointError(ms.paths[next(iter(ms.paths))], f"no model in the recipe provides {pt.key}",
                                      "add a base model that has it (recipe.base)")
            return t.to(pt.dtype) if t.dtype != pt.dtype else t

        n = run_plan(plan, compute, sink, threads=self.threads, progress=progress, desc="merge (incremental)",
                     device=self.device) if plan else 0
        for comp in changed:
            self._state[comp].hash = recipe.component_hash(comp)
        return MergeStats(models=len(recipe.models), keys=n, seconds=time.perf_counter() - t0,
                          bytes_read=sum(k.bytes_read for k in kcs), tensors_read=sum(k.tensors_read for k in kcs),
                          components=changed, models_read=set().union(*(k.models_read for k in kcs)) if kcs else set())

    # -- per component strategies ----------------------------------------------------------------------------
    def _prepare(self, comp: str, cr: ComponentRecipe | None, recipe: Recipe, kc: KeyComputer, plan: list[PlannedTensor]):
        state = self._state.get(comp)
        if state is None:
            state = self._state[comp] = _CompState(hash="", models_key=self._models_key or ())
        keys = [pt for pt in plan if not pt.key.endswith("position_ids")]
        if cr is not None and cr.spec.linear and keys and cr.form(block_of(kc.models.arch, keys[0].key)).normalise:
            need = sum(_numel(pt.shape) for pt in keys) * 4 * (2 if cr.anchor else 1)
            have = state.ensemble.nbytes if state.ensemble else 0
            if self.used_bytes() - have + need <= self.budget_bytes:
                return self._ensemble(state, cr, recipe, kc, keys)
            state.ensemble = None  # does not fit: from scratch every time
        elif cr is not None:
            return self._cached_members(cr, kc)
        return lambda pt: kc.compute(pt.key, pt.component)

    def _ensemble(self, state: _CompState, cr: ComponentRecipe, recipe: Recipe, kc: KeyComputer, keys: list[PlannedTensor]):
        arch = kc.models.arch
        ens = state.ensemble
        if ens is None or ens.updates >= self.refresh_every:
            ens = state.ensemble = _EnsembleCache()
        new_w = {}
        blocks = {pt.key: block_of(arch, pt.key, recipe.time_embed_block) for pt in keys}
        names = sorted({m.model for m in cr.members} | {m for m, _ in ens.weights})
        forms = {b: cr.form(b) for b in set(blocks.values())}  # the registry's coefficients, per block
        for b, form in forms.items():
            for m, w in form.terms:
                if w:
                    new_w[(m, b)] = w
        delta = {mb: new_w.get(mb, 0.0) - ens.weights.get(mb, 0.0) for mb in set(new_w) | set(ens.weights)}
        delta = {mb: d for mb, d in delta.items() if d != 0.0}
        anchor_changed = cr.anchor != ens.anchor_name
        ens.updates += 1
        ens.weights = new_w
        ens.anchor_name = cr.anchor
        if anchor_changed:
            ens.anchors = {}

        lock = threading.Lock()

        def base_of(key: str) -> torch.Tensor | None:
            t = kc._from_base(key)
            if t is not None and not kc.finite_or_policy(recipe.base, key, t):  # type: ignore[arg-type]
                return None
            return t

        def anchor_of(key: str) -> torch.Tensor | None:
            if key not in ens.anchors:
                anc = kc.load(cr.anchor, key)
                if anc is not None and not kc.finite_or_policy(cr.anchor, key, anc):
                    anc = None
                anc = base_of(key) if anc is None else anc.to(torch.float32)
                with lock:
                    ens.anchors[key] = anc
                    ens.nbytes += anc.numel() * 4 if anc is not None else 0
            return ens.anchors[key]

        def rebuild(key: str, block: str, s: torch.Tensor) -> float:
            """An input held NaN/Inf (seen in the fp32 sum, far cheaper than checking every fp16 input): rebuild this
            key's sum from the current weights, checking each input, so the policy applies exactly as in a
            from-scratch merge (error names the model; drop_model leaves it out of this key)."""
            s.zero_()
            total = 0.0
            for m in names:
                w = new_w.get((m, block), 0.0)
                t = kc.load(m, key, transient=True) if w else None
                if t is None or not kc.finite_or_policy(m, key, t):
                    continue
                add_into(s, t, w)
                total += w
            return total

        def compute(pt: PlannedTensor) -> torch.Tensor:
            key, block = pt.key, blocks[pt.key]
            s = ens.sums.get(key)
            total = ens.totals.get(key, 0.0)
            adds: list[tuple[torch.Tensor, float]] = []
            for m in names:
                d = delta.get((m, block))
                if not d:
                    continue
                t = kc.load(m, key, mapped=True)  # a view of the file: read once, straight into the sum
                if t is None:
                    continue
                if s is None:
                    s = torch.zeros(t.shape, dtype=torch.float32, device=t.device)
                    with lock:
                        ens.nbytes += s.numel() * 4
                adds.append((t, d))
                total += d
            a = forms[block].mix if cr.anchor is not None else 1.0
            if s is not None and abs(total) >= 1e-12:
                anc = anchor_of(key) if a != 1.0 else None
                scale, weight = (a / total, 1.0 - a) if anc is not None else (1.0 / total, 0.0)
                out, finite = update_and_narrow(s, adds, scale, pt.dtype, anc, weight)  # one pass: update + output
                ens.sums[key] = s
                if finite:
                    ens.totals[key] = total
                    return out
                total = rebuild(key, block, s)
            else:
                for t, d in adds:
                    add_into(s, t, d)
                if adds and not _all_finite(s):
                    total = rebuild(key, block, s)
            if s is not None:
                ens.sums[key] = s
            ens.totals[key] = total
            if s is None or abs(total) < 1e-12:
                s, total = base_of(key), 1.0  # pruned in every included member: the base stands in
                if s is None:
                    raise CheckpointError(kc.models.paths[names[0]], f"no member or base provides {key}",
                                          "add a base model that has it (recipe.base)")
            if a != 1.0:
                anc = anchor_of(key)
                if anc is not None:
                    return narrow(torch.mul(s, a / total).add_(anc, alpha=1.0 - a), 1.0, pt.dtype)
            return narrow(s, 1.0 / total, pt.dtype, inplace=False)  # the cached sum stays as it is

        return lambda pt: kc.compute(pt.key, pt.component) if pt.key.endswith("position_ids") else compute(pt)

    def _cached_members(self, cr: ComponentRecipe, kc: KeyComputer):
        """Fixed-slot and non-linear methods (weighted_sum, add_difference, copy, TIES, ...): keep members' tensors
        (within the budget) so α or parameter changes read nothing."""
        raw, merger = self._raw, self
        original_load = kc.load

        def cached_load(model: str, key: str, transient: bool = False, mapped: bool = False) -> torch.Tensor | None:
            if transient or mapped:  # a thread's scratch buffer or a file view: never kept
                return original_load(model, key, transient=transient, mapped=mapped)
            hit = raw.get((model, key))
            if hit is not None:
                return hit
            t = original_load(model, key)
            if t is not None and merger.used_bytes() + t.numel() * t.element_size() <= merger.budget_bytes:
                raw[(model, key)] = t
                merger._raw_bytes += t.numel() * t.element_size()
            return t

        kc.load = cached_load  # type: ignore[method-assign]
        return lambda pt: kc.compute(pt.key, pt.component)


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n
