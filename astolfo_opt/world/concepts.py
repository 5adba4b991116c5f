"""What the world draws and says: one object (colour x shape) on a background, as a 64 px image and a prompt.

Why these attributes: the renderer's latents are 8x8 (64 px through a factor-8 autoencoder), so every attribute must
survive 8x8 cells. Colour and background are whole-cell properties; the four shapes differ in which cells they fill
(a filled square, a diamond, a plus-shaped cross, a hollow ring), so shape is the hard attribute, as composition is
for real models. Images are drawn procedurally with a jittered position and size, so each prompt is a distribution,
not one picture. Pixel values are in [-1, 1] (the diffusers convention for VAE input).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch

COLOURS: dict[str, tuple[float, float, float]] = {
    "red": (0.9, -0.8, -0.8), "green": (-0.8, 0.75, -0.8), "blue": (-0.75, -0.6, 0.95), "yellow": (0.95, 0.85, -0.9)}
SHAPES: tuple[str, ...] = ("square", "diamond", "cross", "ring")
BACKGROUNDS: dict[str, tuple[float, float, float]] = {"black": (-0.95, -0.95, -0.95), "white": (0.95, 0.95, 0.95),
                                                      "grey": (-0.1, -0.1, -0.1)}
ATTRIBUTES: dict[str, tuple[str, ...]] = {"colour": tuple(COLOURS), "shape": SHAPES, "background": tuple(BACKGROUNDS)}
IMAGE_SIZE = 64
_PROMPT = re.compile(r"^an? (?P<colour>\w+) (?P<shape>\w+) on (?:an? )?(?P<background>\w+)(?: background)?$")


@dataclass(frozen=True, order=True)
class Concept:
    colour: str
    shape: str
    background: str

    @property
    def prompt(self) -> str:
        return f"a {self.colour} {self.shape} on {self.background}"

    def labels(self) -> tuple[int, int, int]:
        """Class indices (colour, shape, background) in :data:`ATTRIBUTES` order."""
        return (ATTRIBUTES["colour"].index(self.colour), SHAPES.index(self.shape),
                ATTRIBUTES["background"].index(self.background))

    def attributes(self) -> dict[str, str]:
        return {"colour": self.colour, "shape": self.shape, "background": self.background}


def all_concepts() -> list[Concept]:
    return [Concept(c, s, b) for c in COLOURS for s in SHAPES for b in BACKGROUNDS]


def parse_prompt(prompt: str) -> Concept | None:
    """The concept a world prompt names, or None for a prompt outside the world's language."""
    m = _PROMPT.match(prompt.strip().lower())
    if not m or m["colour"] not in COLOURS or m["shape"] not in SHAPES or m["background"] not in BACKGROUNDS:
        return None
    return Concept(m["colour"], m["shape"], m["background"])


def _mask(shape: str, dx: torch.Tensor, dy: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """Soft (anti-aliased) coverage in [0, 1] of ``shape`` of radius ``r`` at offsets ``dx, dy`` (pixels)."""
    ax, ay = dx.abs(), dy.abs()
    if shape == "square":
        d = torch.maximum(ax, ay) - r * 0.8
    elif shape == "diamond":
        d = (ax + ay) - r * 1.15
    elif shape == "cross":
        arm = r * 0.32
        d = torch.minimum(torch.maximum(ax - r, ay - arm), torch.maximum(ax - arm, ay - r))
    elif shape == "ring":
        rad = (dx * dx + dy * dy).sqrt()
        d = (rad - r).abs() - r * 0.3
    else:
        raise ValueError(f"unknown shape {shape!r}")
    return (0.5 - d).clamp(0.0, 1.0)


def draw(concepts: Sequence[Concept], g: torch.Generator, size: int = IMAGE_SIZE) -> torch.Tensor:
    """``[N, 3, size, size]`` images in [-1, 1]: each concept's object at a jittered centre (+-5 px) and radius
    (17-23 px at 64 px), over its background."""
    n = len(concepts)
    s = size / IMAGE_SIZE
    cx = size / 2 + (torch.rand(n, generator=g) * 10 - 5) * s
    cy = size / 2 + (torch.rand(n, generator=g) * 10 - 5) * s
    r = (17 + torch.rand(n, generator=g) * 6) * s
    coords = torch.arange(size, dtype=torch.float32) + 0.5
    out = torch.empty(n, 3, size, size)
    for i, c in enumerate(concepts):
        dx = coords[None, :] - cx[i]
        dy = coords[:, None] - cy[i]
        m = _mask(c.shape, dx, dy, r[i])
        fg = torch.tensor(COLOURS[c.colour])[:, None, None]
        bg = torch.tensor(BACKGROUNDS[c.background])[:, None, None]
        out[i] = bg + (fg - bg) * m
    return out


def split_heldout(concepts: Iterable[Concept], n: int = 6) -> tuple[list[Concept], list[Concept]]:
    """(training concepts, held-out concepts): every 8th concept in a fixed order is held out (up to ``n``), so each
    held-out combination's colour, shape and background are each seen in training in other combinations."""
    cs = list(concepts)
    held = [c for i, c in enumerate(cs) if i % 8 == 3][:n]
    return [c for c in cs if c not in held], held
