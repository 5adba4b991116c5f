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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch

from astolfo_opt.checkpoint.io import CheckpointReader, open_checkpoint
from astolfo_opt.checkpoint.layout import (
    MERGE_COMPONENTS,
    PASSTHROUGH_COMPONENTS,
    Layout,
    block_of,
    canonical_key,
    component_of,
    detect_architecture,
    detect_size,
    get_layout,
)
from astolfo_opt.errors import CheckpointError, ConfigError, NonFiniteError
from astolfo_opt.merge.recipe import ComponentRecipe, Recipe

log = logging.getLogger(__name__)
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32, "fp64": torch.float64}


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
    d = torch.device(device)
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
        self.paths = {n: Path(p) for n, p in models.items()}
        self.readers: dict[str, CheckpointReader] = {}
        self.index: dict[str, dict[str, str]] = {}  # model -> canonical -> raw key
        archs = {}
        for name, path in self.paths.items():
            r = open_checkpoint(path)
            a = detect_architecture(r.keys())
            if a is None:
                raise CheckpointError(path, "not a Stable Diffusion checkpoint (no UNet / text encoder keys found)")
            archs[name] = a
            self.readers[name] = r
            self.index[name] = {canonical_key(a, k): k for k in r.keys()}
        found = sorted(set(archs.values()))
        if arch is None and len(found) > 1:
            mixed = ", ".join(f"{n}={a}" for n, a in archs.items())
            raise ConfigError(f"the models mix architectures ({mixed}); merge only models of one architecture")
        self.arch = arch or found[0]
        for name, a in archs.items():
            if a != self.arch:
                raise CheckpointError(self.paths[name], f"is {a}, the merge is {self.arch}")

    def has(self, model: str, key: str) -> bool:
        return key in self.index[model]

    def info(self, model: str, key: str):
        return self.readers[model].info(self.index[model][key])

    def read(self, model: str, key: str, out: torch.Tensor | None = None) -> torch.Tensor:
        return self.readers[model].read(self.index[model][key], out)

    def close(self) -> None:
        for r in self.readers.values():
            r.close()


def layout_for(models: ModelSet) -> Layout:
    first = next(iter(models.readers.values()))
    shapes = {canonical_key(models.arch, k): first.info(k).shape for k in first.keys()}
    size = detect_size(models.arch, shapes)
    if size is None:
        raise CheckpointError(first.path, "its UNet widths match no known full or tiny layout of " + models.arch)
    return get_layout(models.arch, size)


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
            if wanted is not None or recipe.base is None or not models.has(recipe.base, key):
                continue
            plan.append(PlannedTensor(key, comp, models.info(recipe.base, key).dtype, e.shape))
            continue
        if wanted is not None and comp not in wanted:
            continue
        sources = _sources(recipe, comp)
        if e.optional and not any(models.has(m, key) for m in sources):
            continue
        if key.endswith("position_ids"):
            plan.append(PlannedTensor(key, comp, torch.int64, e.shape))
            continue
        plan.append(PlannedTensor(key, comp, out_dtype, e.shape))
    return plan


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

    # -- reading with repairs ------------------------------------------------------------------------------------
    def load(self, model: str, key: str) -> torch.Tensor | None:
        """The model's tensor for ``key`` on the compute device, shape-repaired; None if the model lacks it."""
        if not self.models.has(model, key):
            return None
        if self.device.type == "cuda":
            return self._load_cuda(model, key)
        t = self.models.read(model, key)
        self.bytes_read += t.numel() * t.element_size()
        self.tensors_read += 1
        self.models_read.add(model)
        want = self.layout.expected_shape(key)
        if want is not None and tuple(t.shape) != want:
            if t.numel() != _numel(want):
                raise CheckpointError(self.models.paths[model], f"tensor {key} has shape {tuple(t.shape)}, expected {want}",
                                      "the file is of another model size or damaged: exclude it")
            t = t.reshape(want)  # 1x1 conv <-> Linear proj_in / proj_out, VAE attention forms
        if self.device.type != "cpu":
            t = t.to(self.device, non_blocking=True)
        return t

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
        self.bytes_read += info.nbytes
        self.tensors_read += 1
        self.models_read.add(model)
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
        if not t.is_floating_point():
            return True
        bad = int((~torch.isfinite(t)).sum())
        if not bad:
            return True
        if self.recipe.nan_policy == "error":
            raise NonFiniteError(model, key, bad)
        log.warning("nan_policy=drop_model: %s dropped for %s (%d NaN/Inf values)", model, key, bad)
        return False

    # -- arithmetic ----------------------------------------------------------------------------------------------
    def compute(self, key: str, comp: str) -> torch.Tensor | None:
        """fp32/fp64 result for ``key`` (None: no source has it). ``position_ids`` are rebuilt, never averaged."""
        e = self.layout.entries.get(key)
        if key.endswith("position_ids"):
            shape = e.shape if e else (1, 77)
            return torch.arange(shape[-1], dtype=torch.int64, device=self.device).reshape(shape)
        if comp in PASSTHROUGH_COMPONENTS:
            return self.load(self.recipe.base, key) if self.recipe.base else None
        cr = self.recipe.components.get(comp)
        if cr is None:
            return self._from_base(key)
        block = block_of(self.models.arch, key, self.recipe.time_embed_block)
        return self.compute_component(cr, key, block)

    def _from_base(self, key: str) -> torch.Tensor | None:
        if self.recipe.base is None:
            return None
        t = self.load(self.recipe.base, key)
        if t is None:
            return None
        self.finite_or_policy(self.recipe.base, key, t)
        return t.to(self.acc_dtype)

    def weighted_average(self, cr: ComponentRecipe, key: str, block: str) -> tuple[torch.Tensor | None, float]:
        acc, total = None, 0.0
        for m in cr.members:
            w = cr.weight_for(m.model, block)
            if w == 0.0:
                continue
            t = self.load(m.model, key)
            if t is None or not self.finite_or_policy(m.model, key, t):
                continue
            if acc is None:
                acc = torch.zeros(t.shape, dtype=self.acc_dtype, device=t.device)
            acc.add_(t, alpha=w)
            total += w
        return acc, total

    def compute_component(self, cr: ComponentRecipe, key: str, block: str) -> torch.Tensor | None:
        if cr.method == "weighted_average":
            acc, total = self.weighted_average(cr, key, block)
            if acc is None or total == 0.0:
                return self._from_base(key)  # pruned everywhere: fill from the base
            acc.mul_(1.0 / total)
            if cr.anchor is not None:
                a = cr.alpha_for(block)
                anchor = self.load(cr.anchor, key)
                if anchor is None:
                    anchor = self._from_base(key)
                elif not self.finite_or_policy(cr.anchor, key, anchor):
                    anchor = None
                if anchor is not None and a != 1.0:
                    acc.mul_(a).add_(anchor, alpha=1.0 - a)
            return acc
        ts = []
        for m in cr.members:
            t = self.load(m.model, key)
            if t is None:
                t = self._from_base(key)
                if t is None:
                    return None
            elif not self.finite_or_policy(m.model, key, t):
                raise NonFiniteError(m.model, key, int((~torch.isfinite(t)).sum()))  # no substitute for a fixed slot
            ts.append(t)
        a = cr.alpha_for(block)
        if cr.method == "copy":
            return ts[0].to(self.acc_dtype)
        if cr.method == "weighted_sum":
            return ts[0].to(self.acc_dtype).mul_(1.0 - a).add_(ts[1], alpha=a)
        # add_difference: A + α (B - C)
        return ts[0].to(self.acc_dtype).add_(ts[1], alpha=a).add_(ts[2], alpha=-a)


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def default_threads() -> int:
    return max(1, min(4, os.cpu_count() or 1))


def run_plan(plan: list[PlannedTensor], compute, sink: MergeSink, *, threads: int | None = None,
             progress: bool = False, desc: str = "merge") -> int:
    """Compute every planned tensor (``compute(pt) -> tensor``) with bounded look-ahead; feed the sink in order."""
    threads = threads or default_threads()
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(plan), desc=desc, unit="key", dynamic_ncols=True)
    sink.begin(plan)
    done = 0
    try:
        if threads == 1:
            for pt in plan:
                sink.consume(pt.key, compute(pt))
                done += 1
                if bar:
                    bar.update()
        else:
            with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="merge") as pool:
                window: deque[tuple[PlannedTensor, Future]] = deque()
                it: Iterator[PlannedTensor] = iter(plan)
                for pt in it:
                    window.append((pt, pool.submit(compute, pt)))
                    if len(window) >= 2 * threads:
                        break
                while window:
                    pt, fut = window.popleft()
                    t = fut.result()
                    nxt = next(it, None)
                    if nxt is not None:
                        window.append((nxt, pool.submit(compute, nxt)))
                    sink.consume(pt.key, t)
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
                    t = kc.compute(pt.key, pt.component)
                    t = t.to(pt.dtype) if t is not None and t.dtype != pt.dtype else t
                stream.synchronize()
            else:
                t = kc.compute(pt.key, pt.component)
            if t is None:
                raise CheckpointError(ms.paths[next(iter(ms.paths))], f"no model in the recipe provides {pt.key}",
                                      "add a base model that has it (recipe.base)")
            return t.to(pt.dtype) if t.dtype != pt.dtype else t

        n = run_plan(plan, compute, sink, threads=threads, progress=progress)
        comps_done = sorted({pt.component for pt in plan} & set(MERGE_COMPONENTS))
        return MergeStats(models=len(ms.paths), keys=n, seconds=time.perf_counter() - t0, bytes_read=kc.bytes_read,
                          tensors_read=kc.tensors_read, components=comps_done, models_read=kc.models_read)
    finally:
        if own:
            ms.close()


__all__ = ["MergeSink", "MergeStats", "ModelSet", "PlannedTensor", "KeyComputer", "merge", "run_plan", "plan_output",
           "layout_for", "resolve_device", "parse_dtype", "component_of"]
