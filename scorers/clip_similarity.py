"""CLIP image-text similarity: how well each image matches the prompt it was rendered from.

Conventions (``convention``):

* ``cosine`` (default): ``cos(e_img, e_txt)`` of the L2-normalised embeddings, in [-1, 1]; typical values for a
  matching SD image under ViT-L/14 are 0.2-0.35.
* ``clipscore``: CLIPScore (Hessel et al. 2021) ``2.5 * max(cos, 0)``, in [0, 2.5]; the clip at 0 and the 2.5 scale
  make it comparable with published CLIPScore numbers, but it loses the ordering among badly mismatched images.
* ``logit``: ``exp(logit_scale) * cos`` with the model's own learned temperature (about 100 for CLIP); PickScore is
  reported this way.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from astolfo_opt.errors import ConfigError
from scorers.base import TowerScorer, check_batch, check_direction, to_floats
from scorers.tower import get_tower

CONVENTIONS = ("cosine", "clipscore", "logit")


def apply_convention(cos: torch.Tensor, convention: str, logit_scale: float = 100.0) -> torch.Tensor:
    """Map raw cosine similarities to the reported score (see the module docstring)."""
    if convention == "cosine":
        return cos
    if convention == "clipscore":
        return 2.5 * cos.clamp(min=0.0)
    if convention == "logit":
        return logit_scale * cos
    raise ConfigError(f"unknown CLIP similarity convention {convention!r}; use one of {', '.join(CONVENTIONS)}")


class ClipSimilarity(TowerScorer):
    """Prompt adherence as CLIP similarity. Tower arguments (``model``, ``pretrained``, ``hf_dir``, ...) are those of
    :class:`scorers.tower.ClipTower`; equal tower arguments across scorers share one resident model."""

    def __init__(self, *, model: str | None = None, pretrained: str | None = None, hf_dir: str | None = None,
                 processor_dir: str | None = None, model_config: str | None = None, convention: str = "cosine",
                 name: str = "clip", direction: str = "maximize", device: str = "auto", dtype: str = "auto",
                 batch_size: int = 16, config_key: str = "scorer.clip"):
        if convention not in CONVENTIONS:
            raise ConfigError(f"{config_key}.convention={convention!r}; use one of {', '.join(CONVENTIONS)}")
        self.name = name
        self.direction = check_direction(direction, config_key)
        self.convention = convention
        self.tower = get_tower(model=model, pretrained=pretrained, hf_dir=hf_dir, processor_dir=processor_dir,
                               model_config=model_config, device=device, dtype=dtype, batch_size=batch_size,
                               config_key=config_key)

    def cosine(self, image_embeds: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        """Row-wise cosine of image ``i`` with prompt ``i`` (both sides already unit length)."""
        check_batch(image_embeds, prompts)
        text = self.tower.encode_texts(list(prompts)).to(image_embeds.device)
        return (image_embeds.float() * text).sum(dim=-1)

    def score_embeddings(self, image_embeds: torch.Tensor, prompts: Sequence[str]) -> list[float]:
        return to_floats(apply_convention(self.cosine(image_embeds, prompts), self.convention, self.tower.logit_scale))
