"""The streaming merge kernel: one pass over the output layout, one key at a time.

For each output key only the tensors that key needs are read (``pread`` into private buffers, so file pages never
pile up in RSS), repaired (EMA dropped, ``position_ids`` reset, conv/linear ``proj_in`` reshaped, pruned keys filled
from the base), and combined by the component's merge method from the registry (:mod:`astolfo_opt.merge.methods`):
a linear method's coefficients are accumulated in fp32 (or fp64) *in place* - ``acc.add_(t, alpha=w)`` promotes
fp16/bf16 inputs without a temporary - and a non-linear one (TIES, DARE, geometric median) is called on the key's
members. Each key's arithmetic is sequential in recipe member order, so results do not depend on thread count.
Planning is :mod:`.plan`, threads and sinks :mod:`.execute`.

On CUDA the same plan runs with pinned host staging buffers: worker threads read into pinned memory, the main
thread issues non-blocking host-to-device copies on a side stream and accumulates on the GPU, so transfers overlap
arithmetic; tensors reach the sink on the GPU (the renderer's swap copies them device-to-device).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Iterable, Iterator

import torch

from astolfo_opt.checkpoint.io import FP8_DTYPES
from astolfo_opt.checkpoint.layout import (
    MERGE_COMPONENTS,
    PASSTHROUGH_COMPONENTS,
    Layout,
    block_of,
)
from astolfo_opt.checkpoint.prediction import MARKER_KEYS
from astolfo_opt.errors import CheckpointError, ConfigError, NonFiniteError
from astolfo_opt.merge.execute import (
    MergeSink,
    _all_finite,
    _itemsize,
    _numel,
    add_into,
    narrow,
    run_plan,
    scratch,
)
from astolfo_opt.merge.methods import Inputs, Linear, MergeMethod
from astolfo_opt.merge.plan import (
    MergeStats,
    ModelSet,
    PlannedTensor,
    check_prediction,
    layout_for,
    parse_dtype,
    passthrough_source,
    plan_output,
    resolve_device,
)
from astolfo_opt.merge.recipe import ComponentRecipe, Recipe

log = logging.getLogger(__name__)



def _upcast_fp8(t: torch.Tensor, acc: torch.dtype) -> torch.Tensor:
    """fp8 tensors (F8_E4M3 / F8_E5M2 files) widened to the accumulation dtype on read: exact, and every later
    operation (accumulate, finite checks, anchors) then sees an ordinary float tensor."""
    return t.to(acc) if t.dtype in FP8_DTYPES else t


class KeyComputer:
    """Computes one output tensor of a recipe. Shared by the full merge and the incremental merger."""

    def __init__(self, recipe: Recipe, models: ModelSet, layout: Layout, device: torch.device,
                 accumulate: torch.dtype = torch.float32):
        self.recipe, self.models, self.layout, self.device, self.acc_dtype = recipe, models, layout, device, accumulate
        self.bytes_read = 0
        self.tensors_read = 0
        self.models_read: set[str] = set()
        self._local = threading.local()
        self._lock = threading.Lock()
        #: read transient (summed-at-once) tensors through the file mapping instead of pread (see :meth:`load`)
        self.map_transient = False

    def _count(self, model: str, nbytes: int) -> None:
        with self._lock:  # worker threads read concurrently; tests assert exact read counts
            self.bytes_read += nbytes
            self.tensors_read += 1
            self.models_read.add(model)

    # -- reading with repairs ------------------------------------------------------------------------------------
    def load(self, model: str, key: str, transient: bool = False, mapped: bool = False) -> torch.Tensor | None:
        """The model's tensor for ``key`` on the compute device, shape-repaired; None if the model lacks it.

        ``transient=True`` (CPU) reads into this thread's reusable buffer: valid only until the thread's next
        transient load, so the caller must consume it at once. Fresh multi-MB allocations page-fault on every use
        (measured ~3x the cost of the widening copy itself), so the hot loop avoids them.
        ``mapped=True`` (CPU, safetensors) returns a read-only view of the file mapping: no copy at all, for the
        incremental merger's few-model updates. With ``map_transient`` set (the full CPU merge), transient loads are
        mapped views too, recorded per thread and unmapped by :meth:`release_mapped` once the key is done, so the
        copy is saved and mapped pages of dozens of files still never pile up in the resident set."""
        if not self.models.has(model, key):
            return None
        if self.device.type == "cuda":
            return _upcast_fp8(self._load_cuda(model, key), self.acc_dtype)
        t = self._mapped_view(model, key) if transient and self.map_transient and self.models.mappable(model) else None
        if t is None and mapped and self.models.mappable(model):
            t = self.models.view(model, key)
        elif t is None and transient:
            info = self.models.info(model, key)
            buf = scratch("read", info.nbytes, self.device)
            out = buf[: info.nbytes].view(info.dtype).view(info.shape) if info.nbytes and info.shape else None
            t = self.models.read(model, key, out)
        elif t is None:
            t = self.models.read(model, key)
        self._count(model, t.numel() * t.element_size())
        want = self.layout.expected_shape(key)
        if want is not None and tuple(t.shape) != want:
            if t.numel() != _numel(want):
                raise CheckpointError(self.models.paths[model], f"tensor {key} has shape {tuple(t.shape)}, expected {want}",
                                      "the file is of another model size or damaged: exclude it")
            t = t.reshape(want)  # 1x1 conv <-> Linear proj_in / proj_out, VAE attention forms
        if self.device.type != "cpu":
            t = t.to(self.device, non_blocking=True)
        return _upcast_fp8(t, self.acc_dtype)

    def _mapped_view(self, model: str, key: str) -> torch.Tensor | None:
        """A view of ``key`` in ``model``'s file mapping, recorded for :meth:`release_mapped`; None when the file
        cannot be mapped (an address-space limit, ``ulimit -v``, smaller than the pool): then this merge reads with
        ``pread`` from here on, as it did before mapped reads."""
        try:
            t = self.models.view(model, key)
        except OSError as e:
            log.info("merge: cannot map %s (%s); reading with pread instead", self.models.paths[model], e)
            self.map_transient = False
            return None
        held = getattr(self._local, "mapped", None)
        if held is None:
            held = self._local.mapped = []
        held.append((model, key))
        return t

    def release_mapped(self) -> None:
        """Unmap the pages this thread's mapped transient loads touched (their key is computed)."""
        held = getattr(self._local, "mapped", None)
        while held:
            self.models.release(*held.pop())

    def _load_cuda(self, model: str, key: str) -> torch.Tensor:
        """Read into this thread's pinned staging buffer, then copy host-to-device without blocking the host."""
        info = self.models.info(model, key)
        local = self._local
        buf = getattr(local, "pinned", None)
        if buf is None or buf.numel() < info.nbytes:
            buf = local.pinned = torch.empty(max(info.nbytes, 64 << 20), dtype=torch.uint8, pin_memory=True)
        ev = getattr(local, "copied", None)
        if ev is not None:
            ev.synchronize()  # the previous copy out of this buffer has finished
        staged = buf[: info.nbytes].view(info.dtype).view(info.shape) if info.nbytes else torch.empty(info.shape, dtype=info.dtype)
        self.models.read(model, key, staged)
        self._count(model, info.nbytes)
        g = staged.to(self.device, non_blocking=True)
        local.copied = torch.cuda.Event()
        local.copied.record()
        want = self.layout.expected_shape(key)
        if want is not None and tuple(g.shape) != want:
            if g.numel() != _numel(want):
                raise CheckpointError(self.models.paths[model], f"tensor {key} has shape {tuple(g.shape)}, expected {want}")
            g = g.reshape(want)
        return g

    def finite_or_policy(self, model: str, key: str, t: torch.Tensor) -> bool:
        if _all_finite(t):  # one cheap reduction; the elementwise mask only when something is off
            return True
        bad = int((~torch.isfinite(t)).sum())
        if not bad:
            return True
        if self.recipe.nan_policy == "error":
            raise NonFiniteError(model, key, bad)
        log.warning("nan_policy=drop_model: %s dropped for %s (%d NaN/Inf values)", model, key, bad)
        return False

    # -- arithmetic ----------------------------------------------------------------------------------------------
    def compute(self, key: str, comp: str, out_dtype: torch.dtype | None = None) -> torch.Tensor | None:
        """The result for ``key`` (None: no source has it), in ``out_dtype`` when given (the last pass writes it
        directly), else in the accumulation dtype. ``position_ids`` are rebuilt, never averaged."""
        e = self.layout.entries.get(key)
        if key.endswith("position_ids"):
            shape = e.shape if e else (1, 77)
            return torch.arange(shape[-1], dtype=torch.int64, device=self.device).reshape(shape)
        if comp in PASSTHROUGH_COMPONENTS:
            src = passthrough_source(self.recipe, self.models, key)
            if src is None:
                return None
            if key in MARKER_KEYS:  # content-free: the key's presence is the statement, whatever the source stored
                return torch.zeros(e.shape if e else (0,), dtype=self.models.info(src, key).dtype, device=self.device)
            return self.load(src, key)
        cr = self.recipe.components.get(comp)
        block = block_of(self.models.arch, key, self.recipe.time_embed_block)
        skip: frozenset[str] = frozenset()
        out = self._combine(cr, key, block, skip, out_dtype)
        if out is None or _all_finite(out):
            return out
        # Something was NaN/Inf. Checking the result instead of every input saves a pass per input on the
        # (overwhelmingly common) healthy path; only now is each source checked, to name it and apply the policy.
        skip = self._nonfinite_sources(cr, key)
        if not skip:
            raise NonFiniteError("the merge result", key, int((~torch.isfinite(out)).sum()))  # overflow, not an input
        out = self._combine(cr, key, block, skip, out_dtype)
        if out is not None and not _all_finite(out):
            raise NonFiniteError("the merge result", key, int((~torch.isfinite(out)).sum()))
        return out

    def _nonfinite_sources(self, cr: ComponentRecipe | None, key: str) -> frozenset[str]:
        """Models whose tensor for ``key`` holds NaN/Inf; raises under ``nan_policy: error`` (naming the model)."""
        names = list(dict.fromkeys([*(cr.involved() if cr else []), *([self.recipe.base] if self.recipe.base else [])]))
        bad = set()
        for m in names:
            t = self.load(m, key)
            if t is not None and not self.finite_or_policy(m, key, t):
                bad.add(m)
        return frozenset(bad)

    def _from_base(self, key: str, skip: frozenset[str] = frozenset()) -> torch.Tensor | None:
        if self.recipe.base is None or self.recipe.base in skip:
            return None
        t = self.load(self.recipe.base, key)
        return None if t is None else t.to(self.acc_dtype)

    def _finish(self, acc: torch.Tensor, scale: float, out_dtype: torch.dtype | None) -> torch.Tensor:
        """``acc * scale`` in ``out_dtype``: one pass that scales and narrows (no fp32 temporary)."""
        if out_dtype is None or out_dtype == acc.dtype or not out_dtype.is_floating_point:
            return acc.mul_(scale) if scale != 1.0 else acc
        return narrow(acc, scale, out_dtype)

    def normalised_sum(self, form: Linear, key: str, skip: frozenset[str] = frozenset(),
                       reuse: bool = False) -> tuple[torch.Tensor | None, float]:
        """``(Σ wᵢθᵢ / w₀, Σ wᵢ / w₀)`` over the terms that have ``key``: the first term seeds the accumulator with a
        plain widening copy (no zero fill, no multiply), later ones are added in place with ``α = wᵢ/w₀``."""
        acc, total, w0 = None, 0.0, 1.0
        for model, w in form.terms:
            if w == 0.0 or model in skip:
                continue
            t = self.load(model, key, transient=True)
            if t is None:
                continue  # pruned member: dropped for this key, the others renormalised
            if acc is None:
                w0 = w
                if reuse:  # the caller narrows the result into a new tensor: the accumulator never escapes
                    n = t.numel() * _itemsize(self.acc_dtype)
                    acc = scratch("acc", n, t.device)[:n].view(self.acc_dtype).view(t.shape).copy_(t) if t.dim() else \
                        torch.empty(t.shape, dtype=self.acc_dtype, device=t.device).copy_(t)
                else:
                    acc = torch.empty(t.shape, dtype=self.acc_dtype, device=t.device).copy_(t)
            else:
                add_into(acc, t, w / w0)
            total += w / w0
        return acc, total

    def _combine(self, cr: ComponentRecipe | None, key: str, block: str, skip: frozenset[str],
                 out_dtype: torch.dtype | None) -> torch.Tensor | None:
        if cr is None:
            base = self._from_base(key, skip)
            return None if base is None else self._finish(base, 1.0, out_dtype)
        method = cr.spec
        if not method.linear:
            return self._tensor_method(method, cr, key, block, skip, out_dtype)
        form = cr.form(block)
        if form.normalise:
            reuse = out_dtype is not None and out_dtype != self.acc_dtype and out_dtype.is_floating_point
            acc, total = self.normalised_sum(form, key, skip, reuse)
            if acc is None or total == 0.0:
                acc, total = self._from_base(key, skip), 1.0  # pruned in every member: the base stands in
                if acc is None:
                    return None
            a = form.mix if form.anchor is not None else 1.0
            if a != 1.0:
                anchor = None if form.anchor in skip else self.load(form.anchor, key)
                if anchor is None:
                    anchor = self._from_base(key, skip)
                if anchor is not None:
                    return self._finish(add_into(acc.mul_(a / total), anchor, 1.0 - a), 1.0, out_dtype)
            return self._finish(acc, 1.0 / total, out_dtype)
        ts = []
        for model, w in form.terms:
            if model in skip:  # a fixed slot (A, B, C) has no substitute: say which model to repair
                bad = self.load(model, key)
                raise NonFiniteError(model, key, int((~torch.isfinite(bad)).sum()) if bad is not None else 0)
            t = self.load(model, key)
            if t is None:
                t = self._from_base(key, skip)
                if t is None:
                    return None
            ts.append((t, w))
        (first, c0), rest = ts[0], ts[1:]
        if not rest:
            out = first.to(self.acc_dtype) if c0 == 1.0 else first.to(self.acc_dtype, copy=True).mul_(c0)
        else:
            out = first.to(self.acc_dtype, copy=True)
            if c0 != 1.0:
                out.mul_(c0)
            for t, w in rest:
                add_into(out, t, w)
        return self._finish(out, 1.0, out_dtype)

    def _tensor_method(self, method: MergeMethod, cr: ComponentRecipe, key: str, block: str, skip: frozenset[str],
                       out_dtype: torch.dtype | None) -> torch.Tensor | None:
        """A non-linear method on this key: members that lack the key (pruned) or were dropped by the NaN policy are
        left out; with none left the base stands in. A method that needs a base takes the anchor (else the recipe's
        base); where that lacks the key, the members' plain mean stands in for this key."""
        present = [(x.model, cr.weight_for(x.model, block)) for x in cr.members
                   if x.model not in skip and self.models.has(x.model, key)]
        if not present:
            base = self._from_base(key, skip)
            return None if base is None else self._finish(base, 1.0, out_dtype)
        ref = None
        if method.needs_base:
            name = cr.anchor or self.recipe.base
            if name in skip:
                bad = self.load(name, key)  # type: ignore[arg-type]
                raise NonFiniteError(name, key, int((~torch.isfinite(bad)).sum()) if bad is not None else 0)  # type: ignore[arg-type]
            ref = self.load(name, key) if name else None  # type: ignore[arg-type]
            if ref is None:
                log.debug("%s: %s lacks %s; the members' mean stands in", cr.method, name, key)
                form = Linear(tuple((m, 1.0) for m, _ in present), normalise=True)
                acc, total = self.normalised_sum(form, key, skip)
                return self._finish(acc, 1.0 / total, out_dtype)  # type: ignore[arg-type]
            ref = ref.to(self.acc_dtype)
            if not _all_finite(ref):
                raise NonFiniteError(name, key, int((~torch.isfinite(ref)).sum()))  # type: ignore[arg-type]
        members = _LoadedMembers(self, [m for m, _ in present], key)
        try:
            out = method.apply(Inputs(members, ref, [w for _, w in present], cr.alpha_for(block), cr.params))
        except _Dropped as e:  # a member held NaN/Inf and the policy drops it: again without it
            return self._tensor_method(method, cr, key, block, skip | {e.model}, out_dtype)
        return self._finish(out, 1.0, out_dtype)


class _Dropped(Exception):
    """A member's tensor held NaN/Inf and ``nan_policy: drop_model`` leaves it out of this key."""

    def __init__(self, model: str):
        super().__init__(model)
        self.model = model


class _LoadedMembers:
    """The :class:`~astolfo_opt.merge.methods.registry.Members` of one key: each access reads the file again (into
    a fresh tensor in the accumulation dtype), so a two-pass method holds one member at a time. Each tensor is checked
    for NaN/Inf as it is read (one reduction): a non-linear method can hide a NaN (TIES' masks multiply it by zero,
    its mean maps 0/0 to 0), so the result check that the linear path relies on would not see it."""

    def __init__(self, kc: KeyComputer, names: list[str], key: str):
        self.kc, self.names, self.key = kc, names, key

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, i: int) -> torch.Tensor:
        name = self.names[i]
        t = self.kc.load(name, self.key).to(self.kc.acc_dtype)  # type: ignore[union-attr]
        if not self.kc.finite_or_policy(name, self.key, t):  # raises under nan_policy: error
            raise _Dropped(name)
        return t

    def __iter__(self) -> Iterator[torch.Tensor]:
        return (self[i] for i in range(len(self.names)))


def merge(recipe: Recipe, sink: MergeSink, *, device: str | torch.device = "auto", out_dtype: str | torch.dtype = torch.float16,
          accumulate_dtype: str | torch.dtype = torch.float32, components: Iterable[str] | None = None,
          threads: int | None = None, progress: bool = False, models: ModelSet | None = None) -> MergeStats:
    """Merge ``recipe`` into ``sink`` in one streaming pass (see module docstring)."""
    t0 = time.perf_counter()
    recipe.validate()
    dev = resolve_device(device)
    out_dt, acc_dt = parse_dtype(out_dtype), parse_dtype(accumulate_dtype)
    own = models is None
    ms = models or ModelSet(recipe.models, recipe.arch)
    try:
        layout = layout_for(ms)
        check_prediction(recipe, ms)
        comps = list(components) if components is not None else None
        if comps is not None:
            bad = [c for c in comps if c not in MERGE_COMPONENTS]
            if bad:
                raise ConfigError(f"unknown component(s) {bad}; use {', '.join(MERGE_COMPONENTS)}")
        plan = plan_output(recipe, ms, layout, out_dt, comps)
        kc = KeyComputer(recipe, ms, layout, dev, acc_dt)
        kc.map_transient = dev.type == "cpu" and os.environ.get("ASTOLFO_MERGE_PREAD") != "1"

        def compute(pt: PlannedTensor) -> torch.Tensor:
            if dev.type == "cuda":  # one stream per worker thread: one key's copy overlaps another's arithmetic
                stream = getattr(kc._local, "stream", None) or torch.cuda.Stream(device=dev)
                kc._local.stream = stream
                with torch.cuda.stream(stream):
                    t = kc.compute(pt.key, pt.component, pt.dtype)
                    t = t.to(pt.dtype) if t is not None and t.dtype != pt.dtype else t
                stream.synchronize()
            else:
                try:
                    t = kc.compute(pt.key, pt.component, pt.dtype)
                finally:
                    kc.release_mapped()
            if t is None:
                raise CheckpointError(ms.paths[next(iter(ms.paths))], f"no model in the recipe provides {pt.key}",
                                      "add a base model that has it (recipe.base)")
            return t.to(pt.dtype) if t.dtype != pt.dtype else t

        n = run_plan(plan, compute, sink, threads=threads, progress=progress, device=dev)
        comps_done = sorted({pt.component for pt in plan} & set(MERGE_COMPONENTS))
        return MergeStats(models=len(ms.paths), keys=n, seconds=time.perf_counter() - t0, bytes_read=kc.bytes_read,
                          tensors_read=kc.tensors_read, components=comps_done, models_read=kc.models_read)
    finally:
        if own:
            ms.close()


__all__ = ["KeyComputer", "merge"]

