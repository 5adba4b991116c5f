"""``analyse_pool``: weight-space distances, 2-D map, outliers, clusters and near-duplicates of a pool.

The expensive part (one streaming pass, :mod:`astolfo_opt.analysis.distances`) yields raw Gram statistics that are
cached; everything here is derived from them in milliseconds, so thresholds can change without re-reading weights.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from astolfo_opt.analysis.distances import (
    ComponentStats,
    centre_gram,
    cosines_from_gram,
    distances_from_gram,
    model_names,
    pool_stats,
)
from astolfo_opt.analysis.maps import classical_mds
from astolfo_opt.analysis.outliers import DEFAULT_THRESHOLD, DuplicateGroup, Outlier, find_clusters, find_outliers, near_duplicates


def _json_num(x: float) -> float | None:
    return None if x is None or not math.isfinite(x) else float(x)


def _json_matrix(m: np.ndarray) -> list:
    return [[_json_num(v) for v in row] for row in np.asarray(m, dtype=np.float64)]


@dataclass
class ComponentAnalysis:
    """Everything reported for one component. Matrices are over ``names`` (excluded models are not in them)."""

    component: str
    names: list[str]
    reference: str  # "base" or "pool mean..."
    distance: np.ndarray  # [n, n] L2 distances
    cosine: np.ndarray  # [n, n] cosine similarity of deltas (NaN where a delta is zero)
    norms: np.ndarray  # [n] L2 norm of each model's weights (shared keys)
    base_distance: np.ndarray | None  # [n] distance to the base, when deltas are from a base
    mds: np.ndarray  # [n, 2]
    mds_share: float  # share of variance the 2 map axes keep
    mds_base: np.ndarray | None  # base position on the map (None without base or when the base is a pool member)
    mds_inliers: tuple[list[str], np.ndarray, float] | None  # map without outliers: (names, coords, share)
    outliers: list[Outlier]
    clusters: list[list[str]]
    cluster_cut: float | None
    near_duplicates: list[DuplicateGroup]
    keys_used: int
    numel: int
    skipped: dict[str, list[str]] = field(default_factory=dict)  # reason -> canonical keys skipped for every model
    excluded: dict[str, str] = field(default_factory=dict)  # model -> why it is not in the matrices
    dtypes: dict[str, str] = field(default_factory=dict)

    @property
    def skipped_keys(self) -> int:
        return sum(len(v) for v in self.skipped.values())

    def median_distance(self) -> float:
        n = len(self.names)
        return float(np.median(self.distance[~np.eye(n, dtype=bool)])) if n >= 2 else 0.0

    def to_json(self) -> dict[str, Any]:
        return {
            "component": self.component, "names": self.names, "reference": self.reference,
            "distance": _json_matrix(self.distance), "cosine": _json_matrix(self.cosine),
            "norms": [_json_num(v) for v in self.norms],
            "base_distance": None if self.base_distance is None else [_json_num(v) for v in self.base_distance],
            "mds": {"coords": {n: [_json_num(x), _json_num(y)] for n, (x, y) in zip(self.names, self.mds, strict=True)},
                    "explained_share": _json_num(self.mds_share),
                    "base": None if self.mds_base is None else [_json_num(v) for v in self.mds_base],
                    "without_outliers": None if self.mds_inliers is None else {
                        "coords": {n: [_json_num(x), _json_num(y)] for n, (x, y) in zip(self.mds_inliers[0], self.mds_inliers[1],
                                                                                         strict=True)},
                        "explained_share": _json_num(self.mds_inliers[2])}},
            "outliers": [o.to_json() for o in self.outliers],
            "clusters": self.clusters, "cluster_cut": _json_num(self.cluster_cut) if self.cluster_cut is not None else None,
            "near_duplicates": [g.to_json() for g in self.near_duplicates],
            "keys_used": self.keys_used, "numel": self.numel,
            "skipped_keys": {"count": self.skipped_keys, "by_reason": {k: len(v) for k, v in self.skipped.items()},
                             "examples": {k: v[:5] for k, v in self.skipped.items()}},
            "excluded": self.excluded, "dtypes": self.dtypes,
        }


@dataclass
class PoolAnalysis:
    """Result of :func:`analyse_pool`: per-component analyses plus the pool's identity."""

    arch: str
    size: str
    names: list[str]
    paths: list[Path]
    base_name: str | None
    base_path: Path | None
    components: dict[str, ComponentAnalysis]
    cached: list[str]  # components served from the cache

    def __getitem__(self, component: str) -> ComponentAnalysis:
        return self.components[component]

    @property
    def outliers(self) -> list[Outlier]:
        return [o for c in self.components.values() for o in c.outliers]

    def to_json(self) -> dict[str, Any]:
        return {"arch": self.arch, "size": self.size, "names": self.names, "paths": [str(p) for p in self.paths],
                "base": None if self.base_path is None else {"name": self.base_name, "path": str(self.base_path)},
                "cached": self.cached, "components": {k: v.to_json() for k, v in self.components.items()}}

    def summary_lines(self) -> list[str]:
        """Short human report for the inspect command's terminal output."""
        ref = f"deltas from base {self.base_name}" if self.base_name else "deltas from the pool mean"
        lines = [f"weight-space analysis of {len(self.names)} {self.arch} models ({ref})"
                 + (f" [cached: {', '.join(self.cached)}]" if self.cached else "")]
        for ca in self.components.values():
            n = len(ca.names)
            head = f"{ca.component}: {n} models, {ca.keys_used} keys"
            if n >= 2:
                off = ca.distance[~np.eye(n, dtype=bool)]
                head += f", L2 distance median {np.median(off):.4g} (min {off.min():.4g}, max {off.max():.4g})"
                head += f", 2-D map keeps {ca.mds_share:.0%} of the variance"
            if ca.reference not in ("base", "pool mean"):
                head += f"; reference: {ca.reference}"
            lines.append(head)
            if ca.skipped:
                lines.append(f"  skipped {ca.skipped_keys} keys for every model: "
                             + "; ".join(f"{len(v)} {k}" for k, v in ca.skipped.items()))
            for name, why in ca.excluded.items():
                lines.append(f"  excluded {name}: {why}")
            for o in ca.outliers:
                lines.append(f"  outlier {o.name}: {o.measure} {o.distance:.4g} vs median {o.median:.4g} ({o.ratio:.1f}x), "
                             f"robust z {o.robust_z:.1f} > {o.threshold:g}; consider {o.suggestion}")
            if len(ca.clusters) > 1:
                lines.append(f"  {len(ca.clusters)} clusters: " + " | ".join(", ".join(g) for g in ca.clusters))
            elif n >= 3:
                lines.append("  clusters: one group (no clear gap in the hierarchy)")
            for g in ca.near_duplicates:
                kind = "same values" if g.exact else f"near-duplicates (max relative distance {g.max_relative:.2g})"
                lines.append(f"  {kind}: " + ", ".join(f"{nm} [{g.dtypes.get(nm, '?')}]" for nm in g.names))
        return lines


def analyse_component(stats: ComponentStats, threshold: float = DEFAULT_THRESHOLD, base_in_pool: str | None = None
                      ) -> ComponentAnalysis:
    """Derive distances, cosines, map, outliers, clusters and duplicates from one component's Gram statistics."""
    idx = stats.usable
    names = [stats.names[i] for i in idx]
    g = stats.gram[np.ix_(idx, idx)]
    with_base = stats.reference == "base"
    g = g if with_base else centre_gram(g)
    dist = distances_from_gram(g)
    cos = cosines_from_gram(g)
    norms = np.sqrt(np.clip(stats.sumsq[idx], 0.0, None))
    base_dist = np.sqrt(np.clip(np.diag(g), 0.0, None)) if with_base else None
    n = len(names)
    floor = 1e-9 * float(norms.max()) if n else 0.0
    # map: with a base that is not itself a member, the base is one more point (its delta is zero)
    mds_base = None
    if with_base and base_in_pool is None and n:
        aug = np.zeros((n + 1, n + 1))
        aug[:n, :n] = dist
        aug[n, :n] = aug[:n, n] = base_dist
        coords, share = classical_mds(aug)
        mds, mds_base = coords[:n], coords[n]
    else:
        mds, share = classical_mds(dist)
    outliers = find_outliers(stats.component, names, dist, base_dist, threshold, floor=floor)
    dups = near_duplicates(names, dist, norms, stats.dtypes)
    # merges at near-duplicate level are copies, not structure: the cluster cut looks above them
    clusters, cut = find_clusters(names, dist, floor=max((g.max_distance for g in dups), default=0.0))
    inliers = None
    if outliers and n - len(outliers) >= 2:
        keep = [i for i, nm in enumerate(names) if nm not in {o.name for o in outliers}]
        c2, s2 = classical_mds(dist[np.ix_(keep, keep)])
        inliers = ([names[i] for i in keep], c2, s2)
    return ComponentAnalysis(
        component=stats.component, names=names, reference=stats.reference, distance=dist, cosine=cos, norms=norms,
        base_distance=base_dist, mds=mds, mds_share=share, mds_base=mds_base, mds_inliers=inliers, outliers=outliers,
        clusters=clusters, cluster_cut=cut, near_duplicates=dups, keys_used=stats.keys_used, numel=stats.numel,
        skipped=stats.skipped, excluded=stats.excluded, dtypes={k: v for k, v in stats.dtypes.items() if k in names})


def analyse_pool(paths: Sequence[str | Path], base: str | Path | None = None, *, components: Sequence[str] | None = None,
                 device: str = "auto", progress: bool = True, cache: bool = True, threshold: float = DEFAULT_THRESHOLD
                 ) -> PoolAnalysis:
    """Pairwise distances / cosines of the pool's deltas (from ``base``, else the pool mean) per merge component.

    One streaming pass over the files (skipped entirely when the cache holds every requested component for the same
    files and base); then the map, robust outliers (robust z > ``threshold``), clusters and near-duplicates.
    """
    paths = [Path(p) for p in paths]
    base_p = Path(base) if base is not None else None
    layout, stats, hits = pool_stats(paths, base_p, components, device=device, progress=progress, cache=cache)
    names = model_names(paths)
    base_in_pool = None
    if base_p is not None:
        for p, nm in zip(paths, names, strict=True):
            if p.resolve() == base_p.resolve():
                base_in_pool = nm
    comps = {c: analyse_component(s, threshold, base_in_pool) for c, s in stats.items()}
    base_name = base_in_pool or (base_p.stem if base_p is not None else None)
    return PoolAnalysis(arch=layout.arch, size=layout.size, names=names, paths=paths, base_name=base_name, base_path=base_p,
                        components=comps, cached=hits)
