"""The geometric median of the members (per key): the point minimising the sum of Euclidean distances to them, by
Weiszfeld's iteration. Robust to a few outlying models where the mean is pulled by them.

It holds the key's member tensors at once (every iteration revisits all of them): memory is N tensors of one key.
Same iteration, stopping rule and weights as sd-mecha 1.1.8's ``geometric_median``."""

from __future__ import annotations

import torch

from astolfo_opt.merge.methods.registry import Inputs, Param, merge_method

EPS = Param("eps", 1e-6, 1e-12, 1.0, searchable=False, doc="floor of a distance (a member at the median)")
MAXITER = Param("maxiter", 100, 1, 10000, integer=True, searchable=False, doc="Weiszfeld iterations at most")
FTOL = Param("ftol", 1e-20, 0.0, 1.0, searchable=False, doc="stop when the objective changes by less, relatively")


def _average(points: list[torch.Tensor], w: torch.Tensor) -> torch.Tensor:
    return sum(p * w[i] for i, p in enumerate(points)) / w.sum()  # type: ignore[return-value]


def _objective(median: torch.Tensor, points: list[torch.Tensor], w: torch.Tensor) -> torch.Tensor:
    return torch.mean(torch.stack([torch.dist(p, median) for p in points]) * w)


@merge_method(linear=False, params=(EPS, MAXITER, FTOL), weighted=True)
def geometric_median(inputs: Inputs) -> torch.Tensor:
    """Weiszfeld: start at the weighted mean, reweight each member by ``wᵢ / max(‖θᵢ - median‖, eps)``, repeat until
    the mean weighted distance changes by at most ``ftol`` of itself."""
    p = inputs.params
    points = list(inputs.members)
    w = torch.tensor(list(inputs.weights), dtype=points[0].dtype, device=points[0].device)
    median, new_w = _average(points, w), w
    obj = _objective(median, points, w)
    for _ in range(int(p["maxiter"])):
        prev = obj
        dist = torch.stack([torch.dist(x, median) for x in points])
        new_w = w / torch.clamp(dist, min=p["eps"])
        median = _average(points, new_w)
        obj = _objective(median, points, w)
        if abs(prev - obj) <= p["ftol"] * obj:
            break
    return _average(points, new_w)
