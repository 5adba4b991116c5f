"""The scorer protocol and the small helpers every scorer shares.

A scorer turns rendered images (plus the prompts that produced them) into one float per image. The search only ever
sees this protocol, so a new scorer is one file with a class that has ``name``, ``direction``, ``device`` and
``score()``, plus one YAML file under ``conf/scorer/`` whose ``_target_`` points at it.

Scorers built on a CLIP image tower derive from :class:`TowerScorer`: they expose the tower and a
``score_embeddings()`` method, which lets :mod:`scorers.objectives` encode each image once per tower and hand the same
embeddings to every scorer sitting on that tower (CLIP similarity and the LAION aesthetic head share ViT-L/14).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol, runtime_checkable

import torch

from astolfo_opt.errors import ConfigError, MissingFileError

if TYPE_CHECKING:
    from PIL import Image

    from scorers.tower import ClipTower

Direction = Literal["maximize", "minimize"]
DIRECTIONS: tuple[str, ...] = ("maximize", "minimize")


@runtime_checkable
class Scorer(Protocol):
    """What the objective needs from a scorer: a name, which way is better, where it runs, and a batch score."""

    name: str
    direction: str
    device: torch.device

    def score(self, images: Sequence[Image.Image], prompts: Sequence[str]) -> list[float]:
        """One float per image; ``prompts[i]`` is the prompt image ``i`` was rendered from."""
        ...


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """``auto`` picks CUDA when present so the same config runs on a workstation and on the CPU-only CI."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ConfigError(f"invalid device {device!r} ({e}); use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {device!r} requested but CUDA is not available (use device=auto or cpu)")
    return dev


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """``auto`` means fp16 on CUDA (speed, memory) and fp32 on CPU (CPU half matmuls are slow and inexact)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is None or dtype == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    table = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16, "float16": torch.float16,
             "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}
    if dtype not in table:
        raise ConfigError(f"invalid dtype {dtype!r}; use auto, fp32, fp16 or bf16")
    return table[dtype]


def check_direction(direction: str, config_key: str) -> str:
    """Optuna only knows these two words; catch typos at build time rather than at study creation."""
    if direction not in DIRECTIONS:
        raise ConfigError(f"{config_key}.direction is {direction!r}; use maximize or minimize")
    return direction


def is_missing(value: Any) -> bool:
    """OmegaConf's mandatory marker can reach us as a plain string when a config is passed as a dict."""
    return value is None or (isinstance(value, str) and value.strip() in ("", "???"))


def require_file(path: Any, config_key: str, what: str = "weights file") -> Path:
    """Resolve a user-provided local file or raise the one-line error that names the file and its config key."""
    if is_missing(path):
        raise ConfigError(f"{config_key} is required: set it with `{config_key}=/path/to/{what.replace(' ', '_')}`")
    p = Path(str(path)).expanduser()
    if not p.is_file():
        raise MissingFileError(p, config_key, what)
    return p.resolve()


def require_dir(path: Any, config_key: str, what: str = "model directory", needs: Sequence[str] = ()) -> Path:
    """Same as :func:`require_file` for a model folder; ``needs`` names files that must sit inside it."""
    if is_missing(path):
        raise ConfigError(f"{config_key} is required: set it with `{config_key}=/path/to/{what.replace(' ', '_')}`")
    p = Path(str(path)).expanduser()
    if not p.is_dir():
        raise MissingFileError(p, config_key, what)
    for name in needs:
        if not (p / name).is_file():
            raise MissingFileError(p / name, config_key, f"{what} file")
    return p.resolve()


def check_batch(images: Sequence[Any], prompts: Sequence[str]) -> None:
    """A length mismatch would silently pair images with the wrong prompts; fail loudly instead."""
    if len(images) != len(prompts):
        raise ConfigError(f"scorer got {len(images)} images but {len(prompts)} prompts; pass one prompt per image")


def to_floats(values: torch.Tensor) -> list[float]:
    """Scores leave the scorer as plain Python floats (JSON- and Optuna-friendly); NaN stays NaN for the caller."""
    return [float(v) for v in values.detach().to("cpu", torch.float64).reshape(-1).tolist()]


def finite_mean(values: Sequence[float]) -> float:
    """Mean that propagates NaN: a broken image must not be hidden by averaging it away."""
    if not values:
        return math.nan
    return float(sum(values) / len(values))


class TowerScorer(ABC):
    """A scorer computed from the L2-normalised image embeddings of a shared :class:`~scorers.tower.ClipTower`.

    Subclasses set ``self.tower`` and implement :meth:`score_embeddings`; :meth:`score` then encodes and scores in
    one call, while :func:`scorers.objectives.score_all` encodes once per tower for many scorers.
    """

    name: str
    direction: str
    tower: ClipTower

    @property
    def device(self) -> torch.device:
        return self.tower.device

    def score(self, images: Sequence[Image.Image], prompts: Sequence[str]) -> list[float]:
        check_batch(images, prompts)
        if not images:
            return []
        return self.score_embeddings(self.tower.encode_images(images), list(prompts))

    @abstractmethod
    def score_embeddings(self, image_embeds: torch.Tensor, prompts: Sequence[str]) -> list[float]:
        """Score ``[N, D]`` L2-normalised fp32 image embeddings from ``self.tower`` against their prompts."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, direction={self.direction!r}, tower={self.tower!r})"
