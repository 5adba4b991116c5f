"""Robust pool diagnostics from a distance matrix: far-off models, groups, near-duplicate re-saves.

All rules are relative to the pool itself (medians, MADs, gaps between merge heights), because absolute weight-space
distances mean nothing across architectures, components and training styles.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

#: normal-consistent scale of the median absolute deviation
MAD_SCALE = 1.4826
#: scale of the mean absolute deviation, the fallback when more than half the distances are equal (MAD = 0)
MEANAD_SCALE = 1.2533
DEFAULT_THRESHOLD = 3.5
#: a model is only called far when it is also this many times the pool's median distance away (effect-size gate)
DEFAULT_MIN_RATIO = 3.0


@dataclass(frozen=True)
class Outlier:
    """One model far from the rest of the pool in one component, with the figures that triggered the flag."""

    name: str
    component: str
    measure: str  # what ``distance`` is: "distance to base" or "median distance to the other models"
    distance: float
    median: float  # median of that measure over the pool
    scale: float  # robust scale used (1.4826·MAD, or the mean-deviation fallback)
    robust_z: float
    threshold: float
    ratio: float  # distance / median


    @property
    def suggestion(self) -> str:
        return f"pool.exclude=[{self.name}]"

    def message(self) -> str:
        return (f"{self.component}: {self.name} is an outlier: {self.measure} {self.distance:.4g} vs pool median {self.median:.4g} "
                f"({self.ratio:.1f}x, robust z {self.robust_z:.1f} > {self.threshold:g}); consider excluding it from the search space "
                f"({self.suggestion})")

    def to_json(self) -> dict:
        d = {k: (None if isinstance(v, float) and not np.isfinite(v) else v) for k, v in asdict(self).items()}
        return {**d, "suggestion": self.suggestion, "message": self.message()}


def robust_z(values: Sequence[float], floor: float = 0.0) -> tuple[np.ndarray, float, float, str]:
    """One-sided robust z-scores ``(v - median) / (1.4826·MAD)``; returns ``(z, median, scale, rule)``.

    When more than half the values coincide (MAD = 0, e.g. most members ship the base text encoder) the mean absolute
    deviation stands in; when that is also below ``floor`` (numerical noise) every z is 0: there is nothing to rank.
    """
    v = np.asarray(values, dtype=np.float64)
    med = float(np.median(v))
    mad = float(np.median(np.abs(v - med)))
    scale, rule = MAD_SCALE * mad, "MAD"
    tiny = max(floor, 1e-12 * max(abs(med), float(np.max(np.abs(v))) if v.size else 0.0))
    if scale <= tiny:
        scale, rule = MEANAD_SCALE * float(np.mean(np.abs(v - med))), "mean deviation (MAD = 0)"
    if scale <= tiny:
        return np.zeros_like(v), med, 0.0, "all equal"
    return (v - med) / scale, med, scale, rule


def find_outliers(component: str, names: Sequence[str], dist: np.ndarray, base_dist: np.ndarray | None = None,
                  threshold: float = DEFAULT_THRESHOLD, floor: float = 0.0, min_ratio: float = DEFAULT_MIN_RATIO
                  ) -> list[Outlier]:
    """Models whose distance to the base (or, without one, median distance to the others) is robustly large.

    The median distance to the others is used without a base because it is itself robust: one far model moves every
    other model's median by at most one rank. Needs 3 models with a base, 4 without (a median of two is a mean).

    Two conditions: robust z > ``threshold`` *and* distance >= ``min_ratio`` x the median. The second one matters
    because weight-space distances are nearly deterministic in millions of dimensions: the MAD then measures only
    how evenly the members' training strengths happen to be spread, and 8 models of spreads 0.03-0.08 drawn at
    random give z > 3.5 in about 5 % of pools (measured). A real outlier (another base, a 10x delta) is several
    times farther than the typical member, so the gate costs no sensitivity where it matters.
    """
    n = len(names)
    if n < (3 if base_dist is not None else 4):
        return []
    if base_dist is not None:
        measure, values = "distance to base", np.asarray(base_dist, dtype=np.float64)
    else:
        measure = "median distance to the other models"
        values = np.array([np.median(np.delete(dist[i], i)) for i in range(n)])
    z, med, scale, _ = robust_z(values, floor)
    ratio = values / med if med > 0 else np.where(values > floor, np.inf, 1.0)
    return [Outlier(names[i], component, measure, float(values[i]), med, scale, float(z[i]), threshold, float(ratio[i]))
            for i in np.argsort(-z) if z[i] > threshold and ratio[i] >= min_ratio]


@dataclass(frozen=True)
class DuplicateGroup:
    """Models whose component is (nearly) the same weights: re-saves in another dtype, or plain copies."""

    names: list[str]
    max_distance: float
    max_relative: float  # max distance / weight norm within the group
    exact: bool  # the same values (dtype aside)
    dtypes: dict[str, str]

    def to_json(self) -> dict:
        return asdict(self)


def near_duplicates(names: Sequence[str], dist: np.ndarray, norms: np.ndarray, dtypes: dict[str, str] | None = None,
                    rel_norm: float = 5e-3, rel_median: float = 0.1) -> list[DuplicateGroup]:
    """Groups (connected pairs) closer than dtype rounding would put two copies of one model.

    A pair is a near-duplicate when its distance is below ``rel_norm`` of the weights' norm (bf16 rounding alone
    moves weights by ~0.1-0.2 %; real finetunes differ by far more) *and*, in pools of three or more, below
    ``rel_median`` of the pool's median distance, so a pool of genuinely close models is not all called duplicates.
    """
    n = len(names)
    if n < 2:
        return []
    off = dist[~np.eye(n, dtype=bool)]
    median = float(np.median(off)) if n >= 3 else float("inf")
    parent = list(range(n))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    rel = np.zeros_like(dist)
    for a in range(n):
        for b in range(a + 1, n):
            scale = float(np.sqrt((norms[a] ** 2 + norms[b] ** 2) / 2.0))
            rel[a, b] = rel[b, a] = dist[a, b] / scale if scale > 0 else (0.0 if dist[a, b] == 0 else np.inf)
            if rel[a, b] < rel_norm and dist[a, b] < rel_median * median:
                parent[find(a)] = find(b)
    groups: dict[int, list[int]] = {}
    for i in range(n):
        groups.setdefault(find(i), []).append(i)
    out = []
    for members in groups.values():
        if len(members) < 2:
            continue
        sub = np.ix_(members, members)
        out.append(DuplicateGroup(names=[names[i] for i in members], max_distance=float(dist[sub].max()),
                                  max_relative=float(rel[sub].max()), exact=bool(rel[sub].max() < 1e-7),
                                  dtypes={names[i]: (dtypes or {}).get(names[i], "?") for i in members}))
    return out


def linkage_matrix(dist: np.ndarray) -> np.ndarray:
    """Average-linkage (UPGMA) hierarchy of a distance matrix (scipy layout)."""
    from scipy.cluster.hierarchy import linkage
    from scipy.spatial.distance import squareform

    return linkage(squareform(np.asarray(dist, dtype=np.float64), checks=False), method="average")


def find_clusters(names: Sequence[str], dist: np.ndarray, floor: float = 0.0, gap: float = 1.5) -> tuple[list[list[str]], float | None]:
    """Clusters cut at the widest relative gap between successive merge heights; one cluster when there is none.

    Merges below ``floor`` (near-duplicate level) are not structure and are ignored when looking for the gap, so a
    re-saved copy does not split an otherwise homogeneous pool into singletons. Returns ``(clusters, cut height)``,
    largest cluster first; the cut is ``None`` when the pool is one group.
    """
    n = len(names)
    if n < 3:
        return ([list(names)] if n else []), None
    from scipy.cluster.hierarchy import fcluster

    z = linkage_matrix(dist)
    h = np.sort(z[:, 2])
    structural = h[h > floor]
    best, cut = gap, None
    for lo, hi in zip(structural[:-1], structural[1:], strict=True):
        if lo > 0 and hi / lo >= best:
            best, cut = hi / lo, float(np.sqrt(lo * hi))
    if cut is None:
        return [list(names)], None
    labels = fcluster(z, t=cut, criterion="distance")
    groups: dict[int, list[str]] = {}
    for name, lab in zip(names, labels, strict=True):
        groups.setdefault(int(lab), []).append(name)
    return sorted(groups.values(), key=lambda g: (-len(g), names.index(g[0]))), cut
