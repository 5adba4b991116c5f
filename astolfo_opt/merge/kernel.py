"""The streaming merge kernel: one pass over the output layout, one key at a time.

For each output key only the tensors that key needs are read (``pread`` into private buffers, so file pages never
pile up in RSS), repaired (EMA dropped, ``position_ids`` reset, conv/linear ``proj_in`` reshaped, pruned keys filled
from the base), accumulated in fp32 (or fp64) *in place* — ``acc.add_(t, alpha=w)`` promotes fp16/bf16 inputs
without a temporary — and handed to a sink in layout order. Keys are computed by a small thread pool with a bounded
look-ahead (torch releases the GIL in its kernels), which overlaps reading and arithmetic and keeps peak memory at a
few tensors. Each key's arithmetic is sequential in recipe member order, so results do not depend on thread count.

On CUDA the same plan runs with pinned host staging buffers: worker threads read into pinned memory, the main
thread issues non-blocking host-to-device copies on a side stream and accumulates on the GPU, so transfers overlap
arithmetic; tensors reach the sink on the GPU (the renderer's swap copies them device-to-device).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch

from astolfo_opt.checkpoint.io import FP8_DTYPES, CheckpointReader, open_checkpoint
from astolfo_opt.checkpoint.layout import (
    MERGE_COMPONENTS,
    PASSTHROUGH_COMPONENTS,
    Layout,
    LayoutEntry,
    block_of,
    canonical_key,
    component_of,
    detect_architecture,
    detect_size,
    get_layout,
)
from astolfo_opt.checkpoint.prediction import MARKER_KEYS, Prediction, effective_prediction, pool_prediction, prediction_of
from astolfo_opt.errors import CheckpointError, ConfigError, NonFiniteError
from astolfo_opt.merge.methods import Inputs, Linear, MergeMethod
from astolfo_opt.merge.recipe import ComponentRecipe, Recipe

log = logging.getLogger(__name__)
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32, "fp64": torch.float64,
          "fp8_e4m3": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}


@dataclass(frozen=True)
class PlannedTensor:
    key: str
    component: str
    dtype: torch.dtype
    shape: tuple[int, ...]


class MergeSink(Protocol):
    def begin(self, plan: list[PlannedTensor]) -> None: ...

    def consume(self, key: str, tensor: torch.Tensor) -> None: ...

    def end(self) -> None: ...


@dataclass
class MergeStats:
    models: int = 0
    keys: int = 0
    seconds: float = 0.0
    bytes_read: int = 0
    tensors_read: int = 0
    components: list[str] = field(default_factory=list)
    models_read: set[str] = field(default_factory=set)

    def summary(self) -> str:
        return (f"merged {self.keys} keys from {self.models} models in {self.seconds:.2f} s "
                f"({self.bytes_read / 1e9:.2f} GB read)")


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        d = torch.device(device)
    except (RuntimeError, TypeError):
        d = None
    if d is None or d.type not in ("cpu", "cuda"):
        raise ConfigError(f"device={device!r} is not supported: use auto, cpu or cuda (cuda:N)")
    if d.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device=cuda was requested but CUDA is not available (use device=auto or cpu)")
    return d


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ConfigError(f"dtype={dtype!r} must be one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


class ModelSet:
    """Open readers for a recipe's models with a canonical-key index each (opened once, reused by every merge)."""

    def __init__(self, models: dict[str, str], arch: str | None = None):
        self.paths: dict[str, Path] = {}
        self.readers: dict[str, CheckpointReader] = {}
        self.index: dict[str, dict[str, str]] = {}  # model -> canonical -> raw key
        self.arch = arch
        self.extend(models)

    def extend(self, models: dict[str, str]) -> None:
        """Open the readers of ``models`` not open yet (the trial loop's recipes name different subsets of one pool:
        each file's header is parsed once per study, not once per trial)."""
        archs = {}
        try:
            for name, path in models.items():
                if name in self.readers:
                    continue
                path = Path(path)
                r = open_checkpoint(path)
                self.paths[name], self.readers[name] = path, r
                a = detect_architecture(r.keys())
                if a is None:
                    raise CheckpointError(path, "not a Stable Diffusion checkpoint (no UNet / text encoder keys found)")
                archs[name] = a
                self.index[name] = {canonical_key(a, k): k for k in r.keys()}  # noqa: SIM118 - readers are not iterable
        except BaseException:
            self.close()
            raise
        found = sorted(set(archs.values()))
        if self.arch is None and len(found) > 1:
            mixed = ", ".join(f"{n}={a}" for n, a in archs.items())
            self.close()
            raise ConfigError(f"the models mix architectures ({mixed}); merge only models of one architecture")
        if self.arch is None and found:
            self.arch = found[0]
        for name, a in archs.items():
            if a != self.arch:
                self.close()
                raise CheckpointError(self.paths[name], f"is {a}, the merge is {self.arch}")

    def prediction(self, model: str) -> Prediction:
        """What ``model``'s file states about its prediction type (headers only)."""
        return prediction_of(self.readers[model])

    def serves(self, models: dict[str, str]) -> bool:
        """True when no name of ``models`` is open with another file (then :meth:`extend` can reuse this set)."""
        return all(n not in self.paths or self.paths[n] == Path(p) for n, p in models.items())

    def has(self, model: str, key: str) -> bool:
        return key in self.index[model]

    def info(self, model: str, key: str):
        return self.readers[model].info(self.index[model][key])

    def read(self, model: str, key: str, out: torch.Tensor | None = None) -> torch.Tensor:
        return self.readers[model].read(self.index[model][key], out)

    def mappable(self, model: str) -> bool:
        return self.readers[model].format == "safetensors"

    def view(self, model: str, key: str) -> torch.Tensor:
        """A read-only view into the file mapping (never write to it)."""
        return self.readers[model].get(self.index[model][key])

    def close(self) -> None:
        for r in self.readers.values():
            r.close()


def layout_for(models: ModelSet) -> Layout:
    """The shipped layout for the first model's size; for a size we do not ship (a custom-width model), a layout
    built from the union of the canonical keys the models hold (all optional: each key is emitted when a source of
    its component has it), with the first holder's shapes."""
    first_name = next(iter(models.readers))
    first = models.readers[first_name]
    shapes = {c: first.info(raw).shape for c, raw in models.index[first_name].items()}
    size = detect_size(models.arch, shapes)
    if size is not None:
        return get_layout(models.arch, size)
    order = [*MERGE_COMPONENTS, *PASSTHROUGH_COMPONENTS]
    seen: dict[str, LayoutEntry] = {}
    for name, index in models.index.items():
        for key, raw in index.items():
            comp = component_of(models.arch, key)
            if key in seen or comp not in order:
                continue
            info = models.readers[name].info(raw)
            seen[key] = LayoutEntry(key, tuple(info.shape), str(info.dtype).removeprefix("torch."), True, comp,
                                    block_of(models.arch, key))
    entries = sorted(seen.values(), key=lambda e: order.index(e.component))  # stable: file order within a component
    log.warning("%s: UNet widths match no shipped %s layout; merging the union of the models' keys", first.path, models.arch)
    return Layout(models.arch, "custom", entries)


def plan_output(recipe: Recipe, models: ModelSet, layout: Layout, out_dtype: torch.dtype,
                components: Iterable[str] | None = None) -> list[PlannedTensor]:
    """Output keys in layout order: required keys, plus optional ones some source has; pass-through from the base."""
    wanted = set(components) if components is not None else None
    plan = []
    for key, e in layout.entries.items():
        comp = e.component
        if comp == "ema":
            continue  # EMA copies are dropped: the merge is of the live weights
        if comp in PASSTHROUGH_COMPONENTS:
            src = None if wanted is not None else passthrough_source(recipe, models, key)
            if src is not None:
                plan.append(PlannedTensor(key, comp, models.info(src, key).dtype, e.shape))
            continue
        if wanted is not None and comp not in wanted:
            continue
        sources = _sources(recipe, comp)
        if not sources:
            continue  # not in the recipe and no base to copy it from: the output has no such component
        if e.optional and not any(models.has(m, key) for m in sources):
            continue
        if key.endswith("position_ids"):
            plan.append(PlannedTensor(key, comp, torch.int64, e.shape))
            continue
        plan.append(PlannedTensor(key, comp, out_dtype, e.shape))
    return plan


def passthrough_source(recipe: Recipe, models: ModelSet, key: str) -> str | None:
    """The model whose ``key`` is copied unchanged (schedule buffers, markers): the base. A prediction marker
    (``v_pred`` / ``ztsnr``) also comes from any model that has it when the base does not (``merge --average`` of
    v-pred files has no base): dropping it would turn v-prediction weights into a file every tool samples as epsilon.
    The pool check (:func:`check_prediction`) has already refused a pool where only some models carry it."""
    if recipe.base is not None and models.has(recipe.base, key):
        return recipe.base
    if key in MARKER_KEYS:
        return next((m for m in recipe.models if models.has(m, key)), None)
    return None


def check_prediction(recipe: Recipe, models: ModelSet, allow: str = "allow_mixed_prediction: true (recipe) or "
                     "--allow-mixed-prediction") -> str | None:
    """The recipe's one prediction type (v_prediction / epsilon / None: unknown); a pool that mixes them is a
    one-line :class:`ConfigError` unless ``recipe.allow_mixed_prediction`` (then a warning)."""
    types = {n: effective_prediction(models.arch, models.prediction(n).type) for n in recipe.models}
    try:
        return pool_prediction(types, allow)
    except ConfigError as e:
        if not recipe.allow_mixed_prediction:
            raise
        log.warning("%s (merging anyway: allow_mixed_prediction is set)", e)
        return None


def _upcast_fp8(t: torch.Tensor, acc: torch.dtype) -> torch.Tensor:
    """fp8 tensors (F8_E4M3 / F8_E5M2 files) widened to the accumulation dtype on read: exact, and every later
    operation (accumulate, finite checks, anchors) then sees an ordinary float tensor."""
    return t.to(acc) if t.dtype in FP8_DTYPES else t


def _sources(recipe: Recipe, comp: str) -> list[str]:
    cr = recipe.components.get(comp)
    names = cr.involved() if cr else []
    return [*names, recipe.base] if recipe.base and recipe.base not in names else names


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
        incremental merger's few-model updates (a full merge reads with pread instead, so mapped pages of dozens
        of files never pile up in its resident set)."""
        if not self.models.has(model, key):
            return None
        if self.device.type == "cuda":
            return _upcast_fp8(self._load_cuda(model, key), self.acc_dtype)
        if mapped and self.models.mappable(model):
            t = self.models.view(model, key)
        elif transient:
            info = self.models.info(model, key)
            buf = scratch("read", info.nbytes, self.device)
            out = buf[: info.nbytes].view(info.dtype).view(info.shape) if info.nbytes and info.shape else None
            t = self.models.read(model, key, out)
        else:
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


_CHUNK = 1 << 20  # elements: a 4 MiB fp32 slice stays in cache between the widening copy and the add
_scratch = threading.local()


def _chunk_buffer(dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    key = (dtype, device)
    bufs = getattr(_scratch, "bufs", None)
    if bufs is None:
        bufs = _scratch.bufs = {}
    if key not in bufs:
        bufs[key] = torch.empty(_CHUNK, dtype=dtype, device=device)
    return bufs[key]


def add_into(acc: torch.Tensor, t: torch.Tensor, alpha: float) -> torch.Tensor:
    """``acc += alpha * t`` for a narrower ``t`` (fp16/bf16 into fp32/fp64).

    torch's mixed-dtype ``add_`` takes a scalar casting path measured ~3x slower than widening a cache-sized slice
    into a per-thread buffer (a vectorised copy) and adding same-dtype slices; no full-size temporary is made."""
    if t.dtype == acc.dtype or acc.device.type != "cpu" or t.numel() <= _CHUNK:
        return acc.add_(t, alpha=alpha)
    a, x, buf = acc.view(-1), t.reshape(-1), _chunk_buffer(acc.dtype, acc.device)
    n = a.numel()
    for i in range(0, n, _CHUNK):
        j = min(i + _CHUNK, n)
        c = buf[: j - i]
        c.copy_(x[i:j])
        a[i:j].add_(c, alpha=alpha)
    return acc


class _Direct(threading.local):
    """Per worker thread: where the key being computed may also be written (a live module's parameter, see
    :func:`run_plan`), and whether the final :func:`narrow` did write it."""

    dest: torch.Tensor | None = None
    wrote: bool = False


_direct = _Direct()


def narrow(acc: torch.Tensor, scale: float, out_dtype: torch.dtype, *, inplace: bool = True) -> torch.Tensor:
    """``acc * scale`` as a new ``out_dtype`` tensor, slice by slice (scale same-dtype, then a vectorised narrowing
    copy: ~2x faster than a mixed-dtype ``mul(out=)``). ``inplace=False`` leaves ``acc`` untouched (cached sums).

    When the sink offered a direct destination for this key (:func:`run_plan`), each narrowed slice is also copied
    into it while it is still in cache: the swap into a live pipeline then costs no second pass over the model."""
    out = torch.empty(acc.shape, dtype=out_dtype, device=acc.device)
    dest = _direct.dest
    if dest is not None and (dest.numel() != acc.numel() or dest.device != acc.device):
        dest = None
    _direct.dest = None  # one key, one final narrowing
    if acc.device.type != "cpu" or acc.numel() <= _CHUNK:
        out = torch.mul(acc, scale, out=out) if scale != 1.0 else out.copy_(acc)
        if dest is not None:
            dest.copy_(out.view(-1))
        _direct.wrote = dest is not None  # a recomputed key (NaN policy) is then handed over by copy, not direct
        return out
    a, o = acc.view(-1), out.view(-1)
    buf = None if inplace else _chunk_buffer(acc.dtype, acc.device)
    n = a.numel()
    for i in range(0, n, _CHUNK):
        j = min(i + _CHUNK, n)
        if scale == 1.0:
            o[i:j].copy_(a[i:j])
        elif inplace:
            o[i:j].copy_(a[i:j].mul_(scale))
        else:
            o[i:j].copy_(torch.mul(a[i:j], scale, out=buf[: j - i]))
        if dest is not None:
            dest[i:j].copy_(o[i:j])
    _direct.wrote = dest is not None
    return out


def update_and_narrow(s: torch.Tensor, adds: list[tuple[torch.Tensor, float]], scale: float, out_dtype: torch.dtype,
                      anchor: torch.Tensor | None = None, anchor_weight: float = 0.0) -> tuple[torch.Tensor, bool]:
    """The incremental merger's whole per-key update in one pass over the cached fp32 sum ``s``:
    ``s += Σ d·t`` (in place), then the output ``scale·s`` (or ``scale·s + anchor_weight·anchor``) narrowed to
    ``out_dtype`` - slice by slice on CPU, so each slice of ``s`` is read and written once while in cache instead
    of once per step (add, finite check, narrow). Arithmetic per element is the same as the step-by-step form.
    Returns ``(out, finite)``; ``finite`` is False when an added tensor brought NaN / Inf into ``s`` (the caller
    then rebuilds that key with per-model checks). Honours the direct destination like :func:`narrow`."""
    def combine(chunk: torch.Tensor, anc: torch.Tensor | None, buf: torch.Tensor) -> torch.Tensor:
        if anc is None:
            return torch.mul(chunk, scale, out=buf) if scale != 1.0 else chunk
        return torch.mul(chunk, scale, out=buf).add_(anc, alpha=anchor_weight)

    if s.device.type != "cpu" or s.numel() <= _CHUNK:
        for t, d in adds:
            add_into(s, t, d)
        finite = not adds or _all_finite(s)
        if anchor is None:
            return narrow(s, scale, out_dtype, inplace=False), finite
        return narrow(torch.mul(s, scale).add_(anchor, alpha=anchor_weight), 1.0, out_dtype), finite
    dest = _direct.dest
    if dest is not None and dest.numel() != s.numel():
        dest = None
    _direct.dest = None
    out = torch.empty(s.shape, dtype=out_dtype, device=s.device)
    sv, o = s.view(-1), out.view(-1)
    flat = [(t.reshape(-1), d) for t, d in adds]
    av = anchor.reshape(-1) if anchor is not None else None
    wide, buf = _chunk_buffer(s.dtype, s.device), _chunk_buffer2(s.dtype, s.device)
    finite, n = True, sv.numel()
    for i in range(0, n, _CHUNK):
        j = min(i + _CHUNK, n)
        c = sv[i:j]
        for x, d in flat:
            w = wide[: j - i]
            w.copy_(x[i:j])
            c.add_(w, alpha=d)
        if flat and finite and not bool(torch.isfinite(c.sum())) and not bool(torch.isfinite(c).all()):
            finite = False
        r = combine(c, None if av is None else av[i:j], buf[: j - i])
        o[i:j].copy_(r)
        if dest is not None:
            dest[i:j].copy_(o[i:j])
    _direct.wrote = dest is not None
    return out, finite


def _chunk_buffer2(dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A second per-thread slice buffer (the fused update needs one for widening and one for the result)."""
    key = ("second", dtype, device)
    bufs = getattr(_scratch, "bufs", None)
    if bufs is None:
        bufs = _scratch.bufs = {}
    if key not in bufs:
        bufs[key] = torch.empty(_CHUNK, dtype=dtype, device=device)
    return bufs[key]


def scratch(name: str, nbytes: int, device: torch.device) -> torch.Tensor:
    """This thread's reusable byte buffer ``name`` (grown on demand, never shrunk: bounded by the largest tensor)."""
    bufs = getattr(_scratch, "named", None)
    if bufs is None:
        bufs = _scratch.named = {}
    buf = bufs.get((name, device))
    if buf is None or buf.numel() < nbytes:
        buf = bufs[(name, device)] = torch.empty(max(nbytes, 1), dtype=torch.uint8, device=device)
    return buf


def _itemsize(dtype: torch.dtype) -> int:
    return dtype.itemsize


def _all_finite(t: torch.Tensor) -> bool:
    """One same-dtype reduction instead of an elementwise mask (~25x cheaper): the sum is finite iff every element
    is, unless the sum itself overflows - then the exact elementwise check decides."""
    if not t.is_floating_point() or t.numel() == 0:
        return True
    if t.dtype in FP8_DTYPES:  # no reductions for float8 in torch: check the exact fp16 widening (fp8 fits in fp16)
        t = t.to(torch.float16)
    if bool(torch.isfinite(t.sum())):
        return True
    return bool(torch.isfinite(t).all())


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def default_threads() -> int:
    """One key-worker per core (at most 4: beyond that the merge is bound by memory bandwidth)."""
    return max(1, min(4, os.cpu_count() or 1))


@contextmanager
def intra_op_threads(n: int | None) -> Iterator[None]:
    """Temporarily set torch's intra-op (OpenMP) thread count; ``None`` leaves it alone.

    The CPU merge parallelises across keys (worker threads) instead of inside each op: merge ops are short
    (most tensors are small), and an OpenMP barrier per op waits for every team thread to be scheduled, which on a
    busy machine was measured to make a 1-worker merge of a tiny SDXL pool 13x slower (30 s vs 2.2 s). Restored on
    exit, so the renderer that runs after a trial's merge keeps its own setting."""
    if n is None:
        yield
        return
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


#: below this many output bytes a plan runs in the calling thread (measured: a tiny SD1 model's 1,100 keys merge ~2x
#: faster inline than through the pool, whose per-key hand-off dominates when tensors are a few KB)
INLINE_PLAN_BYTES = 32 << 20


def _plan_bytes(plan: list[PlannedTensor]) -> int:
    return sum(_numel(pt.shape) * _itemsize(pt.dtype) for pt in plan)


def run_plan(plan: list[PlannedTensor], compute, sink: MergeSink, *, threads: int | None = None,
             progress: bool = False, desc: str = "merge", device: torch.device | None = None) -> int:
    """Compute every planned tensor (``compute(pt) -> tensor``) with bounded look-ahead; feed the sink in order.

    Workers compute keys (reading, repairing, accumulating) while the calling thread hands finished tensors to the
    sink in layout order, so file writes overlap arithmetic and at most ``2 * threads`` results are in flight."""
    threads = threads or default_threads()
    with intra_op_threads(1 if device is None or device.type == "cpu" else None):
        return _run_plan(plan, compute, sink, threads, progress, desc)


def _direct_compute(compute, sink: MergeSink):
    """Wrap ``compute`` so that a sink offering ``direct_target(key)`` (the live-pipeline swap) receives the key's
    final narrowing pass in place; returns ``(tensor, written)`` per key."""
    target = getattr(sink, "direct_target", None)
    if target is None or not hasattr(sink, "mark_written"):
        return lambda pt: (compute(pt), False)

    def run(pt: PlannedTensor) -> tuple[torch.Tensor, bool]:
        _direct.dest, _direct.wrote = target(pt.key), False
        try:
            t = compute(pt)
            return t, _direct.wrote
        finally:
            _direct.dest, _direct.wrote = None, False

    return run


def _run_plan(plan: list[PlannedTensor], compute, sink: MergeSink, threads: int, progress: bool, desc: str) -> int:
    work = _direct_compute(compute, sink)

    def hand_over(pt: PlannedTensor, result: tuple[torch.Tensor, bool]) -> None:
        t, written = result
        if written:
            sink.mark_written(pt.key)  # type: ignore[attr-defined]
        sink.consume(pt.key, t)

    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(plan), desc=desc, unit="key", dynamic_ncols=True)
    sink.begin(plan)
    done = 0
    try:
        if threads <= 1 or _plan_bytes(plan) < INLINE_PLAN_BYTES:
            # Small plans (tiny models, one changed block): thread hand-offs would cost more than the arithmetic.
            for pt in plan:
                hand_over(pt, work(pt))
                done += 1
                if bar:
                    bar.update()
            sink.end()
            return done
        with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="merge") as pool:
            window: deque[tuple[PlannedTensor, Future]] = deque()
            it: Iterator[PlannedTensor] = iter(plan)
            for pt in it:
                window.append((pt, pool.submit(work, pt)))
                if len(window) >= 2 * threads:
                    break
            while window:
                pt, fut = window.popleft()
                res = fut.result()
                nxt = next(it, None)
                if nxt is not None:
                    window.append((nxt, pool.submit(work, nxt)))
                hand_over(pt, res)
                done += 1
                if bar:
                    bar.update()
    except BaseException:
        abort = getattr(sink, "abort", None)
        if abort:
            abort()
        raise
    finally:
        if bar:
            bar.close()
    sink.end()
    return done


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

        def compute(pt: PlannedTensor) -> torch.Tensor:
            if dev.type == "cuda":  # one stream per worker thread: one key's copy overlaps another's arithmetic
                stream = getattr(kc._local, "stream", None) or torch.cuda.Stream(device=dev)
                kc._local.stream = stream
                with torch.cuda.stream(stream):
                    t = kc.compute(pt.key, pt.component, pt.dtype)
                    t = t.to(pt.dtype) if t is not None and t.dtype != pt.dtype else t
                stream.synchronize()
            else:
                t = kc.compute(pt.key, pt.component, pt.dtype)
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


__all__ = ["MergeSink", "MergeStats", "ModelSet", "PlannedTensor", "KeyComputer", "merge", "run_plan", "plan_output",
           "layout_for", "resolve_device", "parse_dtype", "component_of"]
