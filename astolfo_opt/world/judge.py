"""The judge: a small CNN, trained apart from everything the optimiser sees, that reads a rendered image and names its
colour, shape and background. Judge accuracy is the world's ground truth for "did the merge draw the prompt".

Why apart: a search that optimised the judge would teach us nothing about whether the objective (CLIP + aesthetic)
is a good proxy. So the judge differs from the tower in architecture (convolutions on the 8x8 cells vs a ViT),
data seed and augmentation, and is never loaded by a study. ``astolfo-opt world judge --images DIR`` judges an
``astolfo-opt render`` folder, taking each image's prompt from its ``render.json``.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

from astolfo_opt.errors import ConfigError
from astolfo_opt.world import vae as V
from astolfo_opt.world.concepts import ATTRIBUTES, Concept, parse_prompt


class Judge(nn.Module):
    """8x8 cells (the 64 px image average-pooled) -> logits per attribute."""

    def __init__(self, width: int = 48):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, width, 3, padding=1), nn.ReLU(), nn.Conv2d(width, width, 3, padding=1), nn.ReLU(),
            nn.Conv2d(width, width, 3, padding=1, stride=2), nn.ReLU(), nn.Flatten(), nn.Linear(width * 16, 128), nn.ReLU())
        self.heads = nn.ModuleDict({a: nn.Linear(128, len(v)) for a, v in ATTRIBUTES.items()})

    def forward(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.body(F.avg_pool2d(pixels, pixels.shape[-1] // 8))
        return {a: head(h) for a, head in self.heads.items()}


def train_judge(folder: Path, sample: Callable[[torch.Generator, int], tuple[torch.Tensor, list[Concept]]], *, steps: int,
                seed: int, batch_size: int = 128, lr: float = 2e-3) -> tuple[Path, float, float]:
    """Train on jittered and mildly degraded renders-to-be; writes ``judge.safetensors``. Returns (path, final loss,
    seconds)."""
    import time

    from safetensors.torch import save_file

    from astolfo_opt.world.scorer import degrade, jitter

    t0 = time.perf_counter()
    torch.manual_seed(seed)
    net = Judge()
    opt = torch.optim.AdamW(net.parameters(), lr=lr)
    g = torch.Generator().manual_seed(seed)
    losses = []
    for _ in range(steps):
        latents, concepts = sample(g, batch_size)
        q = batch_size // 4  # a quarter mildly degraded: renders of merges are not clean either
        bad, _ = degrade(latents[:q], g)
        lat = torch.cat([latents[:q] + 0.4 * (bad - latents[:q]), jitter(latents[q:], g, 0.25)])
        labels = torch.tensor([c.labels() for c in concepts])
        out = net(V.decode(lat).clamp(-1, 1))
        loss = sum(F.cross_entropy(out[a], labels[:, i]) for i, a in enumerate(ATTRIBUTES))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    net.eval()
    path = folder / "judge.safetensors"
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(tmp), metadata={"attributes": json.dumps(ATTRIBUTES)})
    tmp.replace(path)
    tail = losses[-max(1, steps // 10):]
    return path, sum(tail) / len(tail), time.perf_counter() - t0


def load_judge(path: Path) -> Judge:
    from safetensors.torch import load_file

    net = Judge()
    net.load_state_dict(load_file(str(path)), strict=True)
    return net.eval()


def pixels_of(images: Sequence[Any]) -> torch.Tensor:
    """PIL images (or [3, H, W] tensors in [-1, 1]) -> ``[N, 3, 64, 64]`` in [-1, 1]."""
    import numpy as np

    out = []
    for im in images:
        if isinstance(im, torch.Tensor):
            out.append(im)
            continue
        a = torch.from_numpy(np.asarray(im.convert("RGB"), dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1)
        if a.shape[-1] != 64:
            a = F.interpolate(a[None], size=(64, 64), mode="area")[0]
        out.append(a)
    return torch.stack(out)


@torch.inference_mode()
def judge(net: Judge, images: Sequence[Any], prompts: Sequence[str]) -> dict[str, Any]:
    """Per image: predicted attributes, whether each matches the prompt's; overall ``accuracy`` (every attribute
    right) and per-attribute accuracy. A prompt outside the world's language is an error naming it."""
    concepts = []
    for p in prompts:
        c = parse_prompt(p)
        if c is None:
            raise ConfigError(f"prompt {p!r} is not one of the world's (\"a <colour> <shape> on <background>\"); "
                              "judge renders of the world's prompts.yaml / heldout.yaml")
        concepts.append(c)
    if not concepts:
        return {"images": 0, "accuracy": float("nan"), "attributes": {}, "rows": []}
    out = net(pixels_of(images))
    pred = {a: out[a].argmax(-1).tolist() for a in ATTRIBUTES}
    rows = []
    for i, c in enumerate(concepts):
        want = c.attributes()
        got = {a: ATTRIBUTES[a][pred[a][i]] for a in ATTRIBUTES}
        rows.append({"prompt": c.prompt, "predicted": got, "correct": {a: got[a] == want[a] for a in ATTRIBUTES},
                     "all_correct": got == want})
    n = len(rows)
    return {"images": n, "accuracy": sum(r["all_correct"] for r in rows) / n,
            "attributes": {a: sum(r["correct"][a] for r in rows) / n for a in ATTRIBUTES}, "rows": rows}


def judge_folder(images: Path, world: Path) -> dict[str, Any]:
    """Judge an ``astolfo-opt render`` output folder: files and prompts from its ``render.json``."""
    from PIL import Image

    from astolfo_opt.world.build import REBUILD

    meta_path = images / "render.json"
    if not meta_path.is_file():
        raise ConfigError(f"{meta_path} not found: --images must be a folder written by `astolfo-opt render`")
    try:
        meta = json.loads(meta_path.read_text())
        files, prompts = meta["files"], [p["prompt"] for p in meta["prompts"]]
    except (OSError, ValueError, KeyError, TypeError):
        raise ConfigError(f"{meta_path} has no files / prompts lists; re-render with `astolfo-opt render`") from None
    judge_path = world / "judge" / "judge.safetensors"
    if not judge_path.is_file():
        raise ConfigError(f"{judge_path} is missing; build the world with `{REBUILD.format(out=world)}` (or pass --world)")
    try:
        net = load_judge(judge_path)
    except Exception as e:  # noqa: BLE001 - safetensors / shape errors: one line
        raise ConfigError(f"{judge_path} cannot be loaded ({type(e).__name__}); delete {world} and run "
                          f"`{REBUILD.format(out=world)}`") from None
    ims = []
    for f in files:
        try:
            ims.append(Image.open(images / f).convert("RGB"))
        except OSError:
            raise ConfigError(f"{images / f} (listed in render.json) cannot be read as an image") from None
    res = judge(net, ims, prompts)
    for row, f in zip(res["rows"], files, strict=True):
        row["file"] = f
    return res
