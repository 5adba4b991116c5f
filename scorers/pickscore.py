"""PickScore: a transformers CLIP-H model fine-tuned on Pick-a-Pic human preferences.

Score = ``exp(logit_scale) * cos(image, prompt)`` (the ``logit`` convention of
:mod:`scorers.clip_similarity`; about 18-23 on typical SD images). ``hf_dir`` is the local PickScore model folder
(``config.json`` + weights); ``processor_dir`` the local CLIP-ViT-H-14 processor folder
(``preprocessor_config.json`` + tokenizer files), which PickScore ships separately. Defaults to ``hf_dir``.
"""

from __future__ import annotations

from scorers.base import require_dir
from scorers.clip_similarity import ClipSimilarity


class PickScore(ClipSimilarity):
    """Human preference score; higher is preferred."""

    def __init__(self, *, hf_dir: str | None = None, processor_dir: str | None = None, name: str = "pickscore",
                 direction: str = "maximize", device: str = "auto", dtype: str = "auto", batch_size: int = 8,
                 config_key: str = "scorer.pickscore"):
        # checked here so a missing folder names hf_dir instead of falling through to the open_clip arguments
        require_dir(hf_dir, f"{config_key}.hf_dir", "PickScore model directory", needs=("config.json",))
        super().__init__(hf_dir=hf_dir, processor_dir=processor_dir, convention="logit", name=name, direction=direction,
                         device=device, dtype=dtype, batch_size=batch_size, config_key=config_key)
