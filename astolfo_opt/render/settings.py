"""Render settings: image size, steps, guidance, guidance rescale, scheduler, clip skip, batch size.

Why a small frozen dataclass: a trial's images must be reproducible from (recipe, prompt set, settings, device), so
the settings are validated once and hashed into the study's record, never mutated during a study.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any

from astolfo_opt.errors import ConfigError

#: scheduler name -> (diffusers class name, extra config); all are built from the shipped scheduler config
SCHEDULERS: dict[str, tuple[str, dict[str, Any]]] = {
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "ddim": ("DDIMScheduler", {}),
    "dpm++2m": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "dpm++2m_karras": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": True}),
    "unipc": ("UniPCMultistepScheduler", {}),
    "pndm": ("PNDMScheduler", {"skip_prk_steps": True}),
}


@dataclass(frozen=True)
class RenderSettings:
    """How every prompt of a set is rendered. ``clip_skip`` follows diffusers (1 = A1111 "clip skip 2"; 0/None = off).

    ``guidance_rescale`` is diffusers' ``guidance_rescale`` (phi of "Common Diffusion Noise Schedules and Sample Steps
    are Flawed", eq. 16): it tames the over-exposure classifier-free guidance causes on zero-terminal-SNR models.
    ``None`` means "the variant's default" (0.7 for ``sdxl-v``, 0 otherwise: see ``render.pipeline``), so a config
    written before the field existed renders as it did."""

    width: int = 512
    height: int = 512
    steps: int = 20
    guidance_scale: float = 7.0
    scheduler: str = "euler"
    clip_skip: int | None = None
    batch_size: int = 1
    guidance_rescale: float | None = None

    def __post_init__(self) -> None:
        for name in ("width", "height"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 8 or v % 8:
                raise ConfigError(f"render.{name}={v!r} must be a positive multiple of 8 (e.g. 512)")
        if not isinstance(self.steps, int) or self.steps < 1:
            raise ConfigError(f"render.steps={self.steps!r} must be an integer >= 1")
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ConfigError(f"render.batch_size={self.batch_size!r} must be an integer >= 1")
        if self.scheduler not in SCHEDULERS:
            raise ConfigError(f"render.scheduler={self.scheduler!r} is unknown; use one of {', '.join(SCHEDULERS)}")
        if self.clip_skip is not None and (not isinstance(self.clip_skip, int) or self.clip_skip < 0):
            raise ConfigError(f"render.clip_skip={self.clip_skip!r} must be null or an integer >= 0")
        try:
            float(self.guidance_scale)
        except (TypeError, ValueError):
            raise ConfigError(f"render.guidance_scale={self.guidance_scale!r} must be a number") from None
        gr = self.guidance_rescale
        if gr is not None and (isinstance(gr, bool) or not isinstance(gr, int | float) or not 0.0 <= float(gr) <= 1.0):
            raise ConfigError(f"render.guidance_rescale={gr!r} must be null (the variant's default) or a number in [0, 1]")

    @classmethod
    def from_mapping(cls, cfg: Mapping[str, Any]) -> RenderSettings:
        """Settings from a render config section (extra keys such as ``prompt_set`` / ``variant`` are ignored)."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in dict(cfg).items() if k in names and (v is not None or k == "clip_skip")})

    def hash(self) -> str:
        """Content hash. Fields added later are left out while unset (``None``), so settings written before they
        existed keep their hash."""
        d = asdict(self)
        for name in _ADDED_FIELDS:
            if d[name] is None:
                del d[name]
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


#: fields added after settings hashes were first recorded (left out of the hash while None)
_ADDED_FIELDS = ("guidance_rescale",)


def parse_size(text: str) -> tuple[int, int]:
    """``"512x768"`` -> ``(512, 768)`` (width, height); ``"512"`` -> square."""
    parts = str(text).lower().replace("×", "x").split("x")
    try:
        if len(parts) == 1:
            return int(parts[0]), int(parts[0])
        if len(parts) == 2:
            return int(parts[0]), int(parts[1])
    except ValueError:
        pass
    raise ConfigError(f"size {text!r} is not WxH (e.g. --size 512x512)")
