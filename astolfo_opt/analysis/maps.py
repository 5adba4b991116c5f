"""2-D weight-space maps: classical MDS of the distance matrix beside a clustered distance heatmap.

A 2-D map of a high-dimensional pool always lies a little; the figure states how much of the variance its two axes
keep, and when one far model dominates (it then owns the first axis and squashes everyone else into a line) a
third panel maps the pool without the flagged outliers.
"""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from astolfo_opt.errors import AstolfoError

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from astolfo_opt.analysis.pool import ComponentAnalysis, PoolAnalysis


def classical_mds(dist: np.ndarray, dims: int = 2) -> tuple[np.ndarray, float]:
    """Torgerson MDS: coordinates ``[n, dims]`` and the share of (positive) variance those axes keep.

    Axis signs are fixed (largest absolute coordinate positive) so maps of the same pool are stable across runs.
    """
    d = np.asarray(dist, dtype=np.float64)
    n = d.shape[0]
    if n == 0:
        return np.zeros((0, dims)), 0.0
    j = np.eye(n) - np.full((n, n), 1.0 / n)
    b = -0.5 * j @ (d**2) @ j
    vals, vecs = np.linalg.eigh((b + b.T) / 2.0)
    order = np.argsort(vals)[::-1]
    vals, vecs = vals[order], vecs[:, order]
    pos = np.clip(vals, 0.0, None)
    total = float(pos.sum())
    coords = np.zeros((n, dims))
    k = min(dims, n)
    coords[:, :k] = vecs[:, :k] * np.sqrt(pos[:k])
    for a in range(k):
        col = coords[:, a]
        if col.size and col[np.argmax(np.abs(col))] < 0:
            coords[:, a] = -col
    share = float(pos[:k].sum() / total) if total > 0 else 1.0
    return coords, share


def _label_offsets(coords: np.ndarray, step: float = 8.0) -> list[float]:
    """Vertical label offsets (points) so that labels of near-coincident models (near-duplicates, tight clusters)
    stack instead of printing over each other: a label whose box (about 10% x 4% of the map's extent) would touch an
    earlier one moves down a line."""
    span = float(np.ptp(coords, axis=0).max()) if len(coords) else 0.0
    wx, wy = (0.10 * span, 0.04 * span) if span > 0 else (1e-12, 1e-12)
    out: list[float] = []
    for i, (x, y) in enumerate(coords):
        k = sum(1 for j in range(i) if abs(coords[j][0] - x) <= wx and abs(coords[j][1] - y) <= wy)
        out.append(-step * k)
    return out


def _map_panel(ax, names: list[str], coords: np.ndarray, share: float, title: str, base_xy: np.ndarray | None,
               base_label: str | None, outliers: set[str], clusters: list[list[str]]) -> None:
    import matplotlib

    cmap = matplotlib.colormaps["tab10"]
    colour = {n: cmap(ci % 10) for ci, grp in enumerate(clusters) for n in grp}
    offsets = _label_offsets(coords)
    for name, (x, y), dy in zip(names, coords, offsets, strict=True):
        out = name in outliers
        if name == base_label and base_xy is None:  # the base is a pool member: it is the reference, mark it so
            ax.scatter([x], [y], s=140, marker="*", color="gold", edgecolors="black", linewidths=0.8, zorder=4)
        else:
            ax.scatter([x], [y], s=46, color=colour.get(name, "grey"), marker="X" if out else "o",
                       edgecolors="red" if out else "black", linewidths=0.6, zorder=3)
        ax.annotate(name, (x, y), xytext=(4, 4 + dy), textcoords="offset points", fontsize=7, color="red" if out else "black",
                    fontweight="bold" if name == base_label else "normal")
    if base_xy is not None:
        ax.scatter([base_xy[0]], [base_xy[1]], s=140, marker="*", color="gold", edgecolors="black", linewidths=0.8, zorder=4)
        ax.annotate(base_label or "base", tuple(base_xy), xytext=(4, -10), textcoords="offset points", fontsize=7,
                    fontweight="bold")
    ax.set_title(title, fontsize=9)
    ax.text(0.01, 0.01, f"2 axes keep {share:.0%} of the variance", transform=ax.transAxes, fontsize=7, va="bottom",
            color="dimgray")
    ax.margins(0.18)  # room for the labels of the outermost points
    ax.set_aspect("equal", adjustable="datalim")
    ax.tick_params(labelsize=6)
    ax.grid(alpha=0.3)


def _heatmap_panel(fig, ax, ca: ComponentAnalysis) -> None:
    from scipy.cluster.hierarchy import leaves_list

    from astolfo_opt.analysis.outliers import linkage_matrix

    n = len(ca.names)
    order = list(leaves_list(linkage_matrix(ca.distance))) if n >= 2 else list(range(n))
    d = ca.distance[np.ix_(order, order)]
    im = ax.imshow(d, cmap="viridis", interpolation="nearest")
    labels = [ca.names[i] for i in order]
    ax.set_xticks(range(n), labels, rotation=90, fontsize=6)
    ax.set_yticks(range(n), labels, fontsize=6)
    ax.set_title(f"{ca.component}: L2 distance (average-linkage order)", fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04).ax.tick_params(labelsize=6)


def build_figure(analysis: PoolAnalysis) -> Figure:
    """The whole figure (one row per component) as a matplotlib object, not yet saved: tests read its text artists."""
    from matplotlib.figure import Figure  # a bare Figure renders with Agg and never touches a GUI backend

    comps = [c for c in analysis.components.values()]
    if not comps:
        raise AstolfoError("nothing to draw: no component of the pool could be analysed")
    three = any(c.mds_inliers is not None for c in comps)
    ncols = 3 if three else 2
    n_max = max(len(c.names) for c in comps)
    cell = 4.2 + 0.12 * max(0, n_max - 8)
    fig = Figure(figsize=(cell * ncols, cell * len(comps) + 0.6), layout="constrained")
    axes = fig.subplots(len(comps), ncols, squeeze=False)
    ref = f"deltas from base {analysis.base_name}" if analysis.base_name else "deltas from the pool mean"
    fig.suptitle(f"weight-space map of {len(analysis.names)} {analysis.arch} models ({ref})", fontsize=11)
    for row, ca in zip(axes, comps, strict=True):
        outl = {o.name for o in ca.outliers}
        title = f"{ca.component}: classical MDS of L2 distances"
        if ca.excluded:
            note = "not shown: " + ", ".join(f"{k} ({v})" for k, v in ca.excluded.items())
            title += "\n" + "\n".join(textwrap.wrap(note, 60, break_long_words=True))
        _map_panel(row[0], ca.names, ca.mds, ca.mds_share, title, ca.mds_base, analysis.base_name if ca.reference == "base" else None,
                   outl, ca.clusters)
        if ca.reference != "base":
            row[0].scatter([0], [0], marker="+", s=60, color="gray", zorder=2)
            row[0].annotate("pool mean", (0, 0), xytext=(4, -10), textcoords="offset points", fontsize=6, color="gray")
        if len(ca.names) >= 2:
            _heatmap_panel(fig, row[1], ca)
        else:
            row[1].axis("off")
        if three:
            if ca.mds_inliers is not None:
                names, coords, share = ca.mds_inliers
                _map_panel(row[2], names, coords, share, f"{ca.component}: map excluding outliers ({', '.join(sorted(outl))})",
                           None, None, set(), ca.clusters)
            else:
                row[2].axis("off")
    return fig


def render_maps(analysis: PoolAnalysis, out_png: str | Path) -> list[Path]:
    """Write the map figure (a row per component) to ``out_png`` atomically; returns the written paths."""
    import io

    from astolfo_opt.checkpoint.writer import atomic_write_bytes

    out = Path(out_png)
    if out.suffix.lower() != ".png":
        raise AstolfoError(f"map output {out} must end in .png (e.g. --map pool-map.png)")
    if not out.parent.exists():
        raise AstolfoError(f"cannot write {out}: folder {out.parent} does not exist (create it or choose another path)")
    fig = build_figure(analysis)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    atomic_write_bytes(out, buf.getvalue())
    return [out]
