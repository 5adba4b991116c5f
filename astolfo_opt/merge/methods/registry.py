"""The merge-method registry: what a recipe's ``method:`` means, written once.

A method is one small typed function registered with :func:`merge_method`, which declares everything the rest of the
program needs to know about it without calling it: its parameters (ranges, defaults, which are searchable), how many
members it takes, whether it reads a base / anchor, per-block alphas or member weights, and whether it is *linear*.

Why linearity is the central flag: a linear method's output is ``Σ c_m θ_m`` with coefficients that depend on the
recipe only, so its function returns those coefficients (a :class:`Linear`) instead of tensors. The kernel executes
them; the incremental merger updates cached sums with coefficient changes; the benchmark oracle and the weight-space
surrogate compute distances from them, all from this one statement. A non-linear method (TIES, DARE, geometric
median) is a function of tensors, run per key by the kernel; only the kernel may call it, and the weight-space tools
refuse it (:class:`~astolfo_opt.errors.ConfigError` from :meth:`MergeMethod.form`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from astolfo_opt.errors import ConfigError


@dataclass(frozen=True)
class Param:
    """One numeric parameter of a method: its range (inclusive), default, and whether a search may vary it (a seed or
    an iteration cap is part of the recipe but not a taste to optimise)."""

    name: str
    default: float
    low: float
    high: float
    integer: bool = False
    searchable: bool = True
    log: bool = False
    doc: str = ""

    def check(self, value: Any, where: str) -> float:
        try:
            v = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}.{self.name}={value!r} is not a number") from None
        if not math.isfinite(v) or not self.low <= v <= self.high:
            raise ConfigError(f"{where}.{self.name}={value!r} is outside [{self.low:g}, {self.high:g}]")
        if self.integer and v != int(v):
            raise ConfigError(f"{where}.{self.name}={value!r} must be a whole number")
        return float(int(v)) if self.integer else v


@dataclass(frozen=True)
class Linear:
    """The output of a linear method for one block, as coefficients over models.

    ``normalise=True`` (an ensemble): ``θ = mix · Σ wᵢθᵢ / Σ wᵢ + (1 - mix) · anchor``; a member without the key (a
    pruned file) drops out of that key and the others are renormalised; with no member left the base stands in.
    ``normalise=False`` (fixed slots, A1111 style): ``θ = Σ wᵢθᵢ`` in slot order; a slot without the key is filled by
    the base. The kernel evaluates both forms in exactly this order (the first term seeds the fp32 accumulator)."""

    terms: tuple[tuple[str, float], ...]
    normalise: bool = False
    anchor: str | None = None
    mix: float = 1.0

    def coefficients(self, has: Callable[[str], bool] | None = None, base: str | None = None) -> dict[str, float]:
        """``{model: c}`` with ``θ = Σ c·θ_model`` for a key that the models satisfying ``has`` hold (all, if None).

        Zero coefficients are left out. Raises ``ConfigError`` when nothing provides the key."""
        has = has or (lambda _m: True)
        out: dict[str, float] = {}

        def put(m: str, c: float) -> None:
            out[m] = out.get(m, 0.0) + c

        if self.normalise:
            live = [(m, w) for m, w in self.terms if w != 0.0 and has(m)]
            total = sum(w for _, w in live)
            mix = self.mix if self.anchor is not None else 1.0
            if not live or total == 0.0:
                if base is None or not has(base):
                    raise ConfigError("no member and no base provides this key")
                live, total = [(base, 1.0)], 1.0
            for m, w in live:
                put(m, mix * w / total)
            if mix != 1.0:
                put(self.anchor if has(self.anchor) else base, 1.0 - mix)  # type: ignore[arg-type]
        else:
            for m, w in self.terms:
                src = m if has(m) else base
                if src is None:
                    raise ConfigError(f"model {m} lacks this key and there is no base to stand in")
                put(src, w)
        return {m: c for m, c in out.items() if c != 0.0}


class Members(Protocol):
    """The members' tensors for one key, in recipe order, in the accumulation dtype. Indexing loads (it may read the
    file again: a method that walks the members twice costs two reads, never N tensors of memory); ``list(members)``
    holds them all when a method truly needs them at once."""

    def __len__(self) -> int: ...

    def __getitem__(self, i: int) -> torch.Tensor: ...

    def __iter__(self) -> Iterator[torch.Tensor]: ...


@dataclass(frozen=True)
class Inputs:
    """What a non-linear method sees for one key: the members' tensors, the base (the anchor, else ``recipe.base``;
    None for a method that needs none), member weights, the block's alpha, and the resolved parameters."""

    members: Members
    base: torch.Tensor | None
    weights: Sequence[float]
    alpha: float
    params: Mapping[str, float]


LinearFn = Callable[..., Linear]
TensorFn = Callable[[Inputs], torch.Tensor]


@dataclass(frozen=True)
class MergeMethod:
    """A registered method (see :func:`merge_method`)."""

    name: str
    fn: Callable[..., Any]
    linear: bool
    params: tuple[Param, ...] = ()
    members: int | None = None  # exact member count; None: one or more
    needs_base: bool = False  # deltas are taken from the anchor, else recipe.base
    anchor: bool = False  # accepts ``anchor:``
    mbw: bool = False  # reads per-block ``alpha``
    weighted: bool = False  # reads member weights
    alpha_default: float = 1.0  # a recipe file's alpha_default when it gives none
    writes_alpha: bool = False  # alpha_default is part of the canonical form even at 1.0 (its main parameter)
    doc: str = field(default="", compare=False)

    def param(self, name: str) -> Param:
        for p in self.params:
            if p.name == name:
                return p
        raise KeyError(name)

    def resolve(self, given: Mapping[str, Any] | None, where: str) -> dict[str, float]:
        """Every parameter's value: ``given`` checked against the ranges, defaults for the rest."""
        given = dict(given or {})
        unknown = sorted(set(given) - {p.name for p in self.params})
        if unknown:
            allowed = ", ".join(p.name for p in self.params) or "none"
            raise ConfigError(f"{where}: method {self.name} has no parameter {unknown[0]!r} (its parameters: {allowed})")
        return {p.name: p.check(given[p.name], where) if p.name in given else float(p.default) for p in self.params}

    def form(self, members: Sequence[tuple[str, float]], *, anchor: str | None = None, alpha: float = 1.0,
             params: Mapping[str, float] | None = None) -> Linear:
        """The coefficients of a linear method for one block (``members`` with that block's weights)."""
        if not self.linear:
            raise ConfigError(f"method {self.name} is not linear: it has no coefficients (only the merge kernel runs it)")
        return self.fn(tuple(members), anchor=anchor, alpha=alpha, **dict(params or {}))

    def apply(self, inputs: Inputs) -> torch.Tensor:
        if self.linear:
            raise ConfigError(f"method {self.name} is linear: evaluate its form()")
        return self.fn(inputs)


_REGISTRY: dict[str, MergeMethod] = {}


def merge_method(*, linear: bool, params: Sequence[Param] = (), members: int | None = None, needs_base: bool = False,
                 anchor: bool = False, mbw: bool = False, weighted: bool = False, alpha_default: float = 1.0,
                 writes_alpha: bool = False, name: str | None = None) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Register the decorated function as a merge method named after it (or ``name``).

    A linear method is ``fn(members, *, anchor, alpha, **params) -> Linear`` with ``members`` as ``(model, weight)``
    pairs for one block; any other is ``fn(inputs: Inputs) -> Tensor`` for one key."""

    def wrap(fn: Callable[..., Any]) -> Callable[..., Any]:
        n = name or fn.__name__
        if n in _REGISTRY:
            raise ValueError(f"merge method {n!r} is registered twice")
        if anchor and not linear and not needs_base:
            raise ValueError(f"{n}: a non-linear method reads an anchor only as its base (needs_base=True)")
        _REGISTRY[n] = MergeMethod(n, fn, linear, tuple(params), members, needs_base, anchor or needs_base, mbw,
                                   weighted, alpha_default, writes_alpha, (fn.__doc__ or "").strip())
        return fn

    return wrap


def get_method(name: str, where: str = "method") -> MergeMethod:
    """The registered method ``name``; a one-line ConfigError listing the known ones otherwise."""
    m = _REGISTRY.get(name)
    if m is None:
        raise ConfigError(f"{where}={name!r} is not one of {', '.join(_REGISTRY)}")
    return m


def method_names(linear: bool | None = None) -> list[str]:
    """Registered method names (registration order), optionally only the linear or non-linear ones."""
    return [n for n, m in _REGISTRY.items() if linear is None or m.linear == linear]
