"""LAION "improved aesthetic predictor": an MLP head on L2-normalised OpenAI CLIP ViT-L/14 image embeddings.

The head is 768 -> 1024 -> 128 -> 64 -> 16 -> 1 with dropouts 0.2, 0.2, 0.1 and no activations (it is therefore an
affine map at inference; the layer structure only matters for the state-dict keys ``layers.{0,2,4,6,7}``). Outputs
are roughly 1-10 on real images. Same-shape heads (e.g. the "chad" predictor) load the same way, and so do heads
trained on another tower's embeddings: the input may be any width (the head's first layer says which), and the
scorer checks it against the tower's ``embed_dim``.

The head is tiny; the cost is the ViT-L/14 image encode, which this scorer shares with CLIP similarity when both
name the same tower (see :mod:`scorers.tower`).
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from astolfo_opt.errors import CheckpointError, ConfigError
from scorers.base import TowerScorer, check_batch, check_direction, require_file, to_floats
from scorers.tower import get_tower

#: input width of the published predictor (OpenAI CLIP ViT-L/14); other heads' width is read from ``layers.0.weight``
HEAD_INPUT_DIM = 768
HEAD_KEYS = tuple(f"layers.{i}.{p}" for i in (0, 2, 4, 6, 7) for p in ("weight", "bias"))

_HEADS: dict[tuple[str, str], nn.Module] = {}
_HEADS_LOCK = threading.Lock()


class AestheticHead(nn.Module):
    """The exact module layout of the published predictor, so its state dict loads with ``strict=True``."""

    def __init__(self, input_dim: int = HEAD_INPUT_DIM):
        super().__init__()
        self.input_dim = input_dim
        self.layers = nn.Sequential(
            nn.Linear(input_dim, 1024), nn.Dropout(0.2),
            nn.Linear(1024, 128), nn.Dropout(0.2),
            nn.Linear(128, 64), nn.Dropout(0.1),
            nn.Linear(64, 16),
            nn.Linear(16, 1),
        )

    def forward(self, embeds: torch.Tensor) -> torch.Tensor:
        """``[N, input_dim]`` L2-normalised embeddings -> ``[N]`` scores."""
        return self.layers(embeds).squeeze(-1)


def load_head(path: str | Path, config_key: str = "scorer.aesthetic.head") -> nn.Module:
    """Load a head strictly (missing, extra or mis-shaped keys are errors, not silent partial loads), in eval mode on
    the CPU. ``weights_only=True`` because a ``.pth`` from the internet must not run code. The input width comes from
    ``layers.0.weight`` (any width; the rest must be 1024-128-64-16-1), so heads for other towers load too."""
    p = require_file(path, config_key, "aesthetic head file")
    try:
        state = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(p, f"cannot read as a torch state dict: {str(e).splitlines()[0][:200] if str(e) else e!r}",
                              "it must be a plain state dict .pth (weights_only load)") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise CheckpointError(p, f"holds a {type(state).__name__}, not a state dict")
    first = state.get("layers.0.weight")
    width = first.shape[1] if isinstance(first, torch.Tensor) and first.ndim == 2 and first.shape[1] > 0 else HEAD_INPUT_DIM
    head = AestheticHead(int(width))
    try:
        head.load_state_dict(state, strict=True)
    except RuntimeError as e:
        missing = sorted(set(HEAD_KEYS) - set(state))
        extra = sorted(set(state) - set(HEAD_KEYS))
        detail = (f"missing keys {missing}" if missing else "") + ("; " if missing and extra else "") + \
                 (f"unexpected keys {extra}" if extra else "")
        raise CheckpointError(p, f"is not a LAION aesthetic head ({width}-1024-128-64-16-1): "
                                 f"{detail or str(e).splitlines()[-1].strip()[:200]}") from None
    return head.eval().requires_grad_(False)


def get_head(path: str | Path, device: torch.device, config_key: str = "scorer.aesthetic.head") -> nn.Module:
    """Resident head per (file, device): several aesthetic scorers over one file keep one copy."""
    p = require_file(path, config_key, "aesthetic head file")
    key = (str(p), str(device))
    with _HEADS_LOCK:
        if key not in _HEADS:
            _HEADS[key] = load_head(p, config_key).to(device)
        return _HEADS[key]


class LaionAesthetic(TowerScorer):
    """Aesthetic score of each image (the prompt is ignored). ``head`` is the ``.pth`` file; the tower arguments
    must describe an OpenAI ViT-L/14 (``ViT-L-14-quickgelu`` + local weights, or a transformers folder) for the real
    head to mean anything. Any tower whose ``embed_dim`` equals the head's input width is accepted (the tiny test
    tower gives 768-d, like ViT-L/14); a head trained on another tower's embeddings goes with that tower."""

    def __init__(self, *, head: str | None = None, model: str | None = None, pretrained: str | None = None,
                 hf_dir: str | None = None, processor_dir: str | None = None, model_config: str | None = None,
                 name: str = "aesthetic", direction: str = "maximize", device: str = "auto", dtype: str = "auto",
                 batch_size: int = 16, config_key: str = "scorer.aesthetic"):
        self.name = name
        self.direction = check_direction(direction, config_key)
        self.head_path = require_file(head, f"{config_key}.head", "aesthetic head file")
        self.tower = get_tower(model=model, pretrained=pretrained, hf_dir=hf_dir, processor_dir=processor_dir,
                               model_config=model_config, device=device, dtype=dtype, batch_size=batch_size,
                               config_key=config_key)
        self.head = get_head(self.head_path, self.tower.device, f"{config_key}.head")
        width = self.head.input_dim
        if self.tower.embed_dim != width:
            advice = " (the published LAION head is for CLIP ViT-L/14: use ViT-L-14-quickgelu)" if width == HEAD_INPUT_DIM else ""
            raise ConfigError(f"{config_key}: the aesthetic head {self.head_path.name} takes {width}-d image embeddings but "
                              f"the tower {self.tower.model_name} gives {self.tower.embed_dim}-d; the head must be trained "
                              f"on that tower's embeddings{advice}")

    @torch.inference_mode()
    def score_embeddings(self, image_embeds: torch.Tensor, prompts: Sequence[str]) -> list[float]:
        check_batch(image_embeds, prompts)
        return to_floats(self.head(image_embeds.float().to(self.tower.device)))
