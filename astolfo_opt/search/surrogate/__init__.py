"""``surrogate``: a weight-space model of the score - fit where the best merge lies, propose the nearest recipe.

Why: every recipe of the ``inclusion`` / ``inclusion_mbw`` families is, per (component, MBW block), the base plus a
linear combination of the models' deltas. One streaming pass over the pool gives the per-block Gram matrices of those
deltas (:func:`weight_space_from_files`), and from then on the exact L2 distance between *any* two merges of the
family costs microseconds, without merging anything (:class:`WeightSpace`). The sampler assumes the score falls off
smoothly with the weight-space distance from an unknown best merge θ° (:class:`RadialSurrogate`:
``y ≈ a - b·‖θ - θ°‖^p``, θ° a *continuous* member of the family), fits θ° and the link over all finished trials, and
proposes the recipe nearest to a Thompson draw (or the MAP estimate) of θ° (:class:`Projector`: exhaustive over the
inclusion bits, closed-form alphas).

Every trial - wherever it lies - informs every unknown at once through its exact distance to θ°, and noise averages
across all trials instead of one noisy comparison deciding a step; that is what lets a 51-parameter space be searched
in a few dozen noisy trials.

Honest limits: this prior matches the benchmark's weight-space oracle (``s = 1 - ‖θ-θ*‖ / ‖θ_uniform-θ*‖``, a
cone, p = 1) *exactly* - on that benchmark the model is correct by construction, which is why it wins there. Real
scorers (CLIP / aesthetic scores of rendered images) are only approximately radial in weight space: smooth near a good
merge, but not isotropic in the Gram metric and possibly multi-modal. The link's power ``p`` is fitted and the
Thompson draws keep exploring, but on a real scorer treat the benchmark figures as an upper bound. Spaces it cannot map
(``weights``, ``pairwise_mbw``, methods that are not a normalised linear form in the merge-method registry, an
incumbent merged with a non-linear method, no recipe / pool information in the study) fall back to
:class:`~astolfo_opt.search.strategies.StagedSampler`, which is also used for the first ``n_startup`` proposals.

The sampler is stateless like ``staged``: each call re-derives everything from the study's finished trials (their
params, values and ``recipe`` user attributes), so resume and enqueued warm starts just work. Single objective.

Layout: :mod:`.geometry` (weight space, parameter map), :mod:`.model` (the score model), :mod:`.projector` (nearest
recipe), :mod:`.sampler` (the Optuna sampler).
"""

from __future__ import annotations

from astolfo_opt.search.surrogate.geometry import WEIGHT_SPACE_PREFIXES, ParamMap, Unsupported, WeightSpace, weight_space_from_files
from astolfo_opt.search.surrogate.model import RadialSurrogate
from astolfo_opt.search.surrogate.projector import Projector
from astolfo_opt.search.surrogate.sampler import FALLBACK_ATTR, SurrogateSampler, make_surrogate_sampler

__all__ = ["FALLBACK_ATTR", "WEIGHT_SPACE_PREFIXES", "ParamMap", "Projector", "RadialSurrogate", "SurrogateSampler", "Unsupported",
           "WeightSpace", "make_surrogate_sampler", "weight_space_from_files"]
