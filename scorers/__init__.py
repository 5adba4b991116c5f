"""Image scorers for astolfo-opt: a small protocol (:mod:`scorers.base`), a ``_target_`` registry
(:mod:`scorers.registry`), shared CLIP towers (:mod:`scorers.tower`), the scorers themselves (CLIP similarity, LAION
aesthetic, HPSv2, PickScore) and objectives that combine them (:mod:`scorers.objectives`).

Adding a scorer: one module with a class satisfying :class:`scorers.base.Scorer` (or deriving
:class:`scorers.base.TowerScorer` to share a CLIP image encode) plus one ``conf/scorer/*.yaml`` naming it in
``_target_``. Nothing here downloads weights: every model path is a local file or folder.
"""

from scorers.base import Scorer, TowerScorer
from scorers.objectives import Normalisation, Objective, ObjectiveResult, score_all
from scorers.registry import build_objective, build_scorer, clear_cache

__all__ = ["Normalisation", "Objective", "ObjectiveResult", "Scorer", "TowerScorer", "build_objective", "build_scorer",
           "clear_cache", "score_all"]
