"""The linear methods: each returns its coefficients (:class:`Linear`) for one block; the kernel evaluates them."""

from __future__ import annotations

from collections.abc import Sequence

from astolfo_opt.merge.methods.registry import Linear, merge_method


@merge_method(linear=True, anchor=True, mbw=True, weighted=True)
def weighted_average(members: Sequence[tuple[str, float]], *, anchor: str | None, alpha: float) -> Linear:
    """``Σ wᵢθᵢ / Σ wᵢ`` (the uniform / ensemble merge); with ``anchor``, the MBW form ``(1-α_b)·anchor + α_b·average``.
    A member with weight 0 in a block is left out of it (``block_weights``)."""
    return Linear(tuple(members), normalise=True, anchor=anchor, mix=alpha if anchor is not None else 1.0)


@merge_method(linear=True, members=2, mbw=True, alpha_default=0.5, writes_alpha=True)
def weighted_sum(members: Sequence[tuple[str, float]], *, anchor: str | None, alpha: float) -> Linear:
    """A1111's ``(1-α_b)·A + α_b·B``."""
    (a, _), (b, _) = members
    return Linear(((a, 1.0 - alpha), (b, alpha)))


@merge_method(linear=True, members=3, mbw=True, alpha_default=0.5, writes_alpha=True)
def add_difference(members: Sequence[tuple[str, float]], *, anchor: str | None, alpha: float) -> Linear:
    """A1111's ``A + α_b·(B - C)``."""
    (a, _), (b, _), (c, _) = members
    return Linear(((a, 1.0), (b, alpha), (c, -alpha)))


@merge_method(linear=True, members=1, alpha_default=0.5)
def copy(members: Sequence[tuple[str, float]], *, anchor: str | None, alpha: float) -> Linear:
    """The single member's tensors (a component taken whole from one model). ``alpha_default`` 0.5 only keeps the
    canonical hash of recipes written before the registry; copy never reads it."""
    return Linear(((members[0][0], 1.0),))
