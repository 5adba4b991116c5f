"""What a checkpoint predicts (epsilon or v) and whether it was trained with zero terminal SNR, read from the file.

Why this matters: a v-prediction model sampled as epsilon renders garbage, and the scores of garbage then steer the
search; averaging a v-prediction UNet with an epsilon UNet silently yields a broken model. Files say what they are in
two ways, and we read both:

- **marker keys** (NoobAI / Illustrious v-pred derivatives, read by ComfyUI and Forge): an empty ``v_pred`` tensor
  means v-prediction, an empty ``ztsnr`` tensor zero-terminal-SNR training. Presence is what counts (as in those
  tools); a marker holding data or of a non-numeric dtype is reported, not ignored.
- **ModelSpec metadata** (Stability's "SAI Model Spec", ``modelspec.*`` keys of ``__metadata__``):
  ``modelspec.prediction_type`` (``epsilon`` / ``v``), and for SD2 the architecture id
  (``stable-diffusion-v2-768-v`` is v, ``stable-diffusion-v2-512`` epsilon).

When both speak and disagree, the markers win (they are what the inference tools act on) and a warning names both.
Nothing else is guessed: a file that says nothing has ``type None``, and SD2 then still needs ``pool.variant``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

EPSILON, V_PREDICTION = "epsilon", "v_prediction"
#: marker keys -> what their presence means
V_MARKER, ZTSNR_MARKER = "v_pred", "ztsnr"
MARKER_KEYS = (V_MARKER, ZTSNR_MARKER)
#: ``modelspec.prediction_type`` spellings seen in the wild -> ours
MODELSPEC_PREDICTION = {"epsilon": EPSILON, "eps": EPSILON, "v": V_PREDICTION, "v_prediction": V_PREDICTION,
                        "v-prediction": V_PREDICTION, "vpred": V_PREDICTION, "v_pred": V_PREDICTION}
#: ModelSpec architecture ids that fix the prediction type by themselves (SD2's two variants)
MODELSPEC_ARCH_PREDICTION = {"stable-diffusion-v2-768-v": V_PREDICTION, "stable-diffusion-v2-512": EPSILON}
#: what a file that states nothing is loaded as by every inference tool (SD2 has no such default: 512-base is epsilon,
#: 768-v is v, and the keys are the same)
DEFAULT_PREDICTION = {"sd1": EPSILON, "sdxl": EPSILON}
#: ModelSpec architecture id we write per architecture (and SD2 variant)
MODELSPEC_ARCH = {"sd1": "stable-diffusion-v1", ("sd2", EPSILON): "stable-diffusion-v2-512",
                  ("sd2", V_PREDICTION): "stable-diffusion-v2-768-v", "sdxl": "stable-diffusion-xl-v1-base"}


@dataclass(frozen=True)
class Prediction:
    """What one file says about its prediction type (see module doc)."""

    type: str | None  # "epsilon" | "v_prediction" | None: the file does not say
    source: str | None = None  # "markers" | "modelspec" | "modelspec.architecture"
    ztsnr: bool = False
    markers: tuple[str, ...] = ()
    problems: tuple[str, ...] = field(default=())  # one line each: contradictions, malformed markers, unknown values

    def to_json(self) -> dict[str, Any]:
        return {"prediction_type": self.type, "source": self.source, "ztsnr": self.ztsnr, "markers": list(self.markers),
                "problems": list(self.problems)}


def _marker_problem(key: str, dtype: torch.dtype, shape: tuple[int, ...]) -> str | None:
    if dtype == torch.bool or dtype.is_complex:
        return f"marker {key} has dtype {str(dtype).removeprefix('torch.')} (expected an empty numeric tensor); read as present"
    n = math.prod(shape)
    if n != 0:
        return f"marker {key} holds {n} value(s) of shape {tuple(shape)} (expected an empty tensor); read as present"
    return None


def read_prediction(tensors: Mapping[str, tuple[torch.dtype, tuple[int, ...]]], metadata: Mapping[str, str]) -> Prediction:
    """The prediction type from the marker keys (``tensors``: key -> (dtype, shape), only the markers are looked at)
    and the ModelSpec metadata."""
    problems: list[str] = []
    markers = tuple(k for k in MARKER_KEYS if k in tensors)
    for k in markers:
        p = _marker_problem(k, *tensors[k])
        if p:
            problems.append(p)
    from_markers = V_PREDICTION if V_MARKER in markers else None
    raw = (metadata.get("modelspec.prediction_type") or "").strip()
    from_spec, spec_source = None, None
    if raw:
        from_spec = MODELSPEC_PREDICTION.get(raw.lower())
        spec_source = "modelspec"
        if from_spec is None:
            problems.append(f"modelspec.prediction_type={raw!r} is not a known value (epsilon, v); ignored")
    arch_id = (metadata.get("modelspec.architecture") or "").strip()
    if from_spec is None and arch_id.split("/")[0] in MODELSPEC_ARCH_PREDICTION:
        from_spec, spec_source = MODELSPEC_ARCH_PREDICTION[arch_id.split("/")[0]], "modelspec.architecture"
    if from_markers and from_spec and from_markers != from_spec:
        problems.append(f"the marker key {V_MARKER} says {from_markers} but {spec_source} says {from_spec}; "
                        f"the marker wins (inference tools act on it)")
    ztsnr = ZTSNR_MARKER in markers
    if from_markers:
        return Prediction(from_markers, "markers", ztsnr, markers, tuple(problems))
    if ZTSNR_MARKER in markers and from_spec is None:
        problems.append(f"marker {ZTSNR_MARKER} without {V_MARKER}: zero terminal SNR, prediction type not stated")
    if from_spec:
        return Prediction(from_spec, spec_source, ztsnr, markers, tuple(problems))
    return Prediction(None, None, ztsnr, markers, tuple(problems))


def prediction_of(reader: Any) -> Prediction:
    """:func:`read_prediction` of an open :class:`~astolfo_opt.checkpoint.io.CheckpointReader` (headers only)."""
    tensors = {}
    for k in MARKER_KEYS:
        if k in reader:
            info = reader.info(k)
            tensors[k] = (info.dtype, tuple(info.shape))
    return read_prediction(tensors, dict(reader.metadata or {}))


def effective_prediction(arch: str | None, stated: str | None) -> str | None:
    """The type a file is used as: what it states, else its architecture's default (``None`` for SD2)."""
    return stated or DEFAULT_PREDICTION.get(arch or "")


def pool_prediction(types: Mapping[str, str | None], allow: str = "allow_mixed_prediction: true") -> str | None:
    """The one prediction type of a pool (model -> effective type), or ``None`` when none is known. Raise the one-line
    "prediction" error (naming both groups and the option ``allow`` that merges anyway) when the pool mixes
    v-prediction and epsilon models."""
    from astolfo_opt.errors import ConfigError

    groups: dict[str, list[str]] = {}
    for name, t in types.items():
        if t is not None:
            groups.setdefault(t, []).append(name)
    if len(groups) > 1:
        v, e = groups.get(V_PREDICTION, []), groups.get(EPSILON, [])
        raise ConfigError(f"the pool mixes prediction types: v_prediction {', '.join(v)} and epsilon {', '.join(e)}; averaging "
                          f"them yields a broken model: exclude one group, or set {allow} to merge anyway")
    return next(iter(groups), None)
