"""Merge execution: threads, devices and sinks, independent of what a key means.

:func:`run_plan` computes every planned tensor with a small thread pool and a bounded look-ahead (torch releases the
GIL in its kernels), handing results to the sink in layout order so file writes overlap arithmetic and peak memory
stays at a few tensors. The in-place primitives the kernel and the incremental merger share live here too:
:func:`add_into` (fp16/bf16 accumulated into fp32 slice by slice, no temporary), :func:`narrow` (scale and narrow in
one pass, optionally straight into a sink's live destination), :func:`update_and_narrow` and per-thread scratch
buffers.
"""

from __future__ import annotations

import os
import threading
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from typing import Protocol

import torch

from astolfo_opt.checkpoint.io import FP8_DTYPES
from astolfo_opt.merge.plan import PlannedTensor


class MergeSink(Protocol):
    def begin(self, plan: list[PlannedTensor]) -> None: ...

    def consume(self, key: str, tensor: torch.Tensor) -> None: ...

    def end(self) -> None: ...


_CHUNK = 1 << 20  # elements: a 4 MiB fp32 slice stays in cache between the widening copy and the add


_scratch = threading.local()


def _chunk_buffer(dtype: torch.dtype, device: torch.device, slot: int = 0) -> torch.Tensor:
    """This thread's slice buffer number ``slot`` (the fused update needs two: one widening, one for the result)."""
    key = (slot, dtype, device)
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
    wide, buf = _chunk_buffer(s.dtype, s.device), _chunk_buffer(s.dtype, s.device, 1)
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

