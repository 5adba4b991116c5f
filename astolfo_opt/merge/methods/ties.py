"""TIES merging (Yadav et al. 2023, arXiv:2306.01708): trim, elect sign, disjoint mean, in deltas from the base.

Streamed per key in two passes over the members (each read twice, never all held): pass 1 sums the trimmed deltas to
elect each element's sign, pass 2 averages the trimmed deltas that agree with it. Numerically the same as sd-mecha
1.1.8's ``add_difference_ties_extended(vote_sgn=True, apply_stock=True)`` (checked in tests/test_merge_methods.py).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from astolfo_opt.merge.methods.registry import Inputs, Param, merge_method

DENSITY = Param("density", 0.2, 0.0, 1.0, doc="share of each delta kept, by |Δ| per tensor")
LAMBDA = Param("lambda", 1.0, 0.0, 2.0, doc="scale of the merged delta added to the base")


def trim(delta: torch.Tensor, density: float) -> torch.Tensor:
    """``delta`` with all but its top ``density`` share of elements by magnitude set to zero (ties keep)."""
    k = max(int((1.0 - density) * delta.numel()), 1)
    kth = delta.flatten().abs().float().kthvalue(k).values
    return delta * (delta.abs() >= kth).to(delta.dtype)


def ties_delta(deltas: Callable[[], list[torch.Tensor] | object], density: float) -> torch.Tensor:
    """The elected disjoint mean of the trimmed deltas; ``deltas()`` yields them afresh for each pass."""
    total = None
    for d in deltas():  # type: ignore[attr-defined]
        t = trim(d, density)
        total = t if total is None else total.add_(t)
    sign = torch.sign(total)  # type: ignore[arg-type]
    acc, count = torch.zeros_like(sign), torch.zeros_like(sign)
    for d in deltas():  # type: ignore[attr-defined]
        t = trim(d, density)
        agree = (torch.sign(t) == sign).to(t.dtype)
        acc.add_(t * agree)
        count.add_(agree)
    return torch.nan_to_num(acc / count, nan=0.0, posinf=0.0, neginf=0.0)


def deltas_of(inputs: Inputs):
    """``() -> iterator`` over the members' deltas from the base (each pass reads the members again)."""
    base = inputs.base
    return lambda: (m - base for m in inputs.members)


@merge_method(linear=False, params=(DENSITY, LAMBDA), needs_base=True, mbw=True)
def ties(inputs: Inputs) -> torch.Tensor:
    """``base + λ·α_b·TIES(Δ)``: trim each delta to its top ``density`` by |Δ|, elect each element's sign as the sign of
    the summed trimmed deltas, average the trimmed deltas that agree with it."""
    p = inputs.params
    merged = ties_delta(deltas_of(inputs), p["density"])
    return inputs.base.add(merged, alpha=p["lambda"] * inputs.alpha)  # type: ignore[union-attr]
