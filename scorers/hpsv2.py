"""HPSv2 (Human Preference Score v2): an open_clip ViT-H-14 fine-tuned on human preference pairs.

The score is the cosine between the image and prompt embeddings of the fine-tuned model (about 0.2-0.35; the HPSv2
reference code reports exactly this diagonal), so it is :class:`~scorers.clip_similarity.ClipSimilarity` with other
defaults. ``pretrained`` is the local ``HPS_v2*.pt`` file; its ``state_dict`` entry (with or without a ``module.``
prefix) is read by open_clip's own loader with ``weights_only=True``.
"""

from __future__ import annotations

from scorers.clip_similarity import ClipSimilarity


class HPSv2(ClipSimilarity):
    """Human preference score; higher is preferred."""

    def __init__(self, *, model: str = "ViT-H-14", pretrained: str | None = None, model_config: str | None = None,
                 name: str = "hpsv2", direction: str = "maximize", device: str = "auto", dtype: str = "auto",
                 batch_size: int = 8, config_key: str = "scorer.hpsv2"):
        super().__init__(model=model, pretrained=pretrained, model_config=model_config, convention="cosine", name=name,
                         direction=direction, device=device, dtype=dtype, batch_size=batch_size, config_key=config_key)
