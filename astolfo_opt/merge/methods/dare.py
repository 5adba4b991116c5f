"""DARE (Yu et al. 2023, arXiv:2311.03099): drop each delta element with probability ``drop_rate``, rescale the rest
by ``1/(1-drop_rate)``; and DARE-TIES, DARE's drop before TIES' trim / elect / disjoint mean.

The drop masks come from a CPU ``torch.Generator`` seeded with ``seed`` for every key and drawn in member order, as
sd-mecha 1.1.8 draws them (``ties_sum_with_dropout``), so a recipe merges to the same tensors on every run, thread
count and device, and its export hash is reproducible.
"""

from __future__ import annotations

import torch

from astolfo_opt.merge.methods.registry import Inputs, Param, merge_method
from astolfo_opt.merge.methods.ties import DENSITY, LAMBDA, ties_delta

DROP_RATE = Param("drop_rate", 0.9, 0.0, 0.99, doc="probability that a delta element is dropped")
SEED = Param("seed", 0, 0, 2**31 - 1, integer=True, searchable=False, doc="seed of the drop masks")


def dropped(inputs: Inputs):
    """``() -> iterator`` over the members' masked deltas ``m ⊙ (θ - base)`` (not yet rescaled); every pass re-seeds
    the generator, so the masks are identical in every pass."""
    p, base = inputs.params, inputs.base

    def gen():
        g = torch.Generator("cpu").manual_seed(int(p["seed"]))
        for m in inputs.members:
            d = m - base
            keep = torch.ones(d.shape, dtype=d.dtype) - p["drop_rate"]
            yield d * torch.bernoulli(keep.clamp(0, 1), generator=g).to(d.device)

    return gen


@merge_method(linear=False, params=(DROP_RATE, LAMBDA, SEED), needs_base=True, mbw=True)
def dare(inputs: Inputs) -> torch.Tensor:
    """``base + λ·α_b·mean(m ⊙ Δ) / (1 - drop_rate)``: the deltas' mean after random drop and rescale (λ = 1 is the
    plain average in expectation)."""
    p = inputs.params
    total = None
    for d in dropped(inputs)():
        total = d if total is None else total.add_(d)
    scale = p["lambda"] * inputs.alpha / ((1.0 - p["drop_rate"]) * len(inputs.members))
    return inputs.base.add(total, alpha=scale)  # type: ignore[union-attr, arg-type]


@merge_method(linear=False, params=(DENSITY, LAMBDA, DROP_RATE, SEED), needs_base=True, mbw=True)
def dare_ties(inputs: Inputs) -> torch.Tensor:
    """``base + λ·α_b·TIES(m ⊙ Δ) / (1 - drop_rate)``: DARE's drop, then TIES on the surviving deltas, then rescale."""
    p = inputs.params
    merged = ties_delta(dropped(inputs), p["density"]) / (1.0 - p["drop_rate"])
    return inputs.base.add(merged, alpha=p["lambda"] * inputs.alpha)  # type: ignore[union-attr]
