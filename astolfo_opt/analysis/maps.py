"""2-D weight-space maps: classical MDS of the distance matrix beside a clustered distance heatmap.

A 2-D map of a high-dimensional pool always lies a little; the figure states how much of the variance its two axes
keep, and when one far model dominates (it then owns the first axis and squashes everyone else into a line) a
third panel maps the pool without the flagged outliers.
"""

from __future__ import annotations

import math
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


#: candidate label positions around a point, as multiples of (label width, label height) added to a small pad
_RING = [(0, 0), (0, -1), (-1, 0), (-1, -1)] + [(dx, dy) for k in range(1, 30) for dy in (-k, k) for dx in (0, -1)]


def _place_labels(fig, labels: list[tuple[object, str, tuple[float, float], dict]]) -> None:
    """Annotate every map point with its name so that no two labels (and no label and another point) overlap.

    Why not fixed offsets: near-duplicates sit on one point and a far-off model squeezes the rest of the pool into a
    dot, so fixed offsets print names over each other. Placement is done in display space after the layout is
    final: each label takes the first free spot of a ring of candidates (right/left, above/below, then further up and
    down), with a thin leader line once it sits away from its point. Labels stay out of the layout computation, so
    placing them cannot move the axes they were placed in."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    if not labels:
        return
    if not isinstance(fig.canvas, FigureCanvasAgg):
        FigureCanvasAgg(fig)
    fig.draw_without_rendering()
    renderer = fig.canvas.get_renderer()
    px_per_pt = fig.dpi / 72.0
    pad, mark = 3.0 * px_per_pt, 4.0 * px_per_pt
    placed: dict[int, list[tuple[float, float, float, float]]] = {}
    points: dict[int, list[tuple[float, float]]] = {}
    for ax, _name, xy, _style in labels:
        points.setdefault(id(ax), []).append(tuple(ax.transData.transform(xy)))
    for ax, name, xy, style in labels:
        px, py = ax.transData.transform(xy)
        probe = ax.annotate(name, xy, xytext=(0, 0), textcoords="offset points", **style)
        bb = probe.get_window_extent(renderer)
        probe.remove()
        w, h = bb.width + 1.0, bb.height + 1.0
        frame = ax.get_window_extent(renderer)
        boxes = placed.setdefault(id(ax), [])
        others = [(qx, qy) for qx, qy in points[id(ax)] if abs(qx - px) > 1e-6 or abs(qy - py) > 1e-6]
        best = None
        for fx, fy in _RING:
            x0 = px + pad if fx == 0 else px - pad - w
            y0 = py + pad + fy * (h + 1.0) if fy >= 0 else py - pad - h + (fy + 1) * (h + 1.0)
            box = (x0, y0, x0 + w, y0 + h)
            inside = frame.x0 <= box[0] and box[2] <= frame.x1 and frame.y0 <= box[1] and box[3] <= frame.y1
            clash = any(box[0] < b[2] and b[0] < box[2] and box[1] < b[3] and b[1] < box[3] for b in boxes)
            hits = any(box[0] - mark < qx < box[2] + mark and box[1] - mark < qy < box[3] + mark for qx, qy in others)
            if not clash and not hits and inside:
                best = box
                break
            if best is None and not clash:
                best = box  # keep the first non-clashing spot in case no spot is also inside / off other points
        if best is None:
            best = (px + pad, py + pad, px + pad + w, py + pad + h)
        boxes.append(best)
        dx, dy = (best[0] - px) / px_per_pt, (best[1] - py) / px_per_pt
        far = math.hypot(min(abs(best[0] - px), abs(best[2] - px)), min(abs(best[1] - py), abs(best[3] - py))) > 2.5 * pad
        arrow = {"arrowstyle": "-", "color": "gray", "lw": 0.5, "shrinkA": 0, "shrinkB": 2} if far else None
        ann = ax.annotate(name, xy, xytext=(dx, dy), textcoords="offset points", ha="left", va="bottom",
                          arrowprops=arrow, **style)
        ann.set_in_layout(False)


def _map_panel(ax, names: list[str], coords: np.ndarray, share: float, title: str, base_xy: np.ndarray | None,
               base_label: str | None, outliers: set[str], clusters: list[list[str]], labels: list) -> None:
    """Points of one map; their labels are queued in ``labels`` and placed once the figure's layout is final."""
    import matplotlib

    cmap = matplotlib.colormaps["tab10"]
    colour = {n: cmap(ci % 10) for ci, grp in enumerate(clusters) for n in grp}
    for name, (x, y) in zip(names, coords, strict=True):
        out = name in outliers
        if name == base_label and base_xy is None:  # the base is a pool member: it is the reference, mark it so
            ax.scatter([x], [y], s=140, marker="*", color="gold", edgecolors="black", linewidths=0.8, zorder=4)
        else:
            ax.scatter([x], [y], s=46, color=colour.get(name, "grey"), marker="X" if out else "o",
                       edgecolors="red" if out else "black", linewidths=0.6, zorder=3)
        labels.append((ax, name, (float(x), float(y)), {"fontsize": 7, "color": "red" if out else "black",
                                                          "fontweight": "bold" if name == base_label else "normal"}))
    if base_xy is not None:
        ax.scatter([base_xy[0]], [base_xy[1]], s=140, marker="*", color="gold", edgecolors="black", linewidths=0.8, zorder=4)
        labels.append((ax, base_label or "base", (float(base_xy[0]), float(base_xy[1])), {"fontsize": 7, "fontweight": "bold"}))
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
    labels: list = []  # (axes, text, data xy, text style) of every map label, placed after the layout
    fig.suptitle(f"weight-space map of {len(analysis.names)} {analysis.arch} models ({ref})", fontsize=11)
    for row, ca in zip(axes, comps, strict=True):
        outl = {o.name for o in ca.outliers}
        title = f"{ca.component}: classical MDS of L2 distances"
        if ca.excluded:
            note = "not shown: " + ", ".join(f"{k} ({v})" for k, v in ca.excluded.items())
            title += "\n" + "\n".join(textwrap.wrap(note, 60, break_long_words=True))
        _map_panel(row[0], ca.names, ca.mds, ca.mds_share, title, ca.mds_base, analysis.base_name if ca.reference == "base" else None,
                   outl, ca.clusters, labels)
        if ca.reference != "base":
            row[0].scatter([0], [0], marker="+", s=60, color="gray", zorder=2)
            labels.append((row[0], "pool mean", (0.0, 0.0), {"fontsize": 6, "color": "gray"}))
        if len(ca.names) >= 2:
            _heatmap_panel(fig, row[1], ca)
        else:
            row[1].axis("off")
        if three:
            if ca.mds_inliers is not None:
                names, coords, share = ca.mds_inliers
                _map_panel(row[2], names, coords, share, f"{ca.component}: map excluding outliers ({', '.join(sorted(outl))})",
                           None, None, set(), ca.clusters, labels)
            else:
                row[2].axis("off")
    _place_labels(fig, labels)
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
