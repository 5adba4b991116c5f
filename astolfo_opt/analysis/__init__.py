"""Weight-space analysis of a pool: pairwise distances of deltas, 2-D maps, outliers, clusters, near-duplicates."""

from astolfo_opt.analysis.maps import build_figure, render_maps
from astolfo_opt.analysis.pool import ComponentAnalysis, PoolAnalysis, analyse_pool

__all__ = ["ComponentAnalysis", "PoolAnalysis", "analyse_pool", "build_figure", "render_maps"]
