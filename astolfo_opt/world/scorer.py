"""The world's scorers: a tiny open_clip tower trained contrastively on (image, caption) pairs, and an aesthetic head
of the LAION predictor's shape trained to put clean images above degraded ones.

Why these two: they are what the search optimises on real models (CLIP similarity + LAION aesthetic, one image
encode), and both load through the same code path as the real ones (``ClipSimilarity`` with ``model_config`` +
``pretrained``; ``LaionAesthetic`` with ``head``), so a study on the world exercises exactly what a study on real
checkpoints does. Images are what the renderer produces (decoded world latents, 64 px); the tower is trained on
clean and lightly noised renders-to-be, the head on five kinds of degradation at random severities.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F  # noqa: N812

from astolfo_opt.checkpoint.writer import atomic_write_text
from astolfo_opt.world import vae as V

TOWER_NAME = "astolfo-world-clip"
TOWER_CONFIG = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 64, "layers": 3, "width": 64, "head_width": 32, "patch_size": 8},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}
#: open_clip's default (OpenAI) normalisation, which its preprocess applies to every image
MEAN = torch.tensor([0.48145466, 0.4578275, 0.40821073])[:, None, None]
STD = torch.tensor([0.26862954, 0.26130258, 0.27577711])[:, None, None]
DEGRADATIONS = ("blur", "noise", "cast", "artefacts", "washed")


@dataclass
class Fit:
    steps: int
    final_loss: float
    seconds: float


def preprocess(pixels: torch.Tensor) -> torch.Tensor:
    """Pixels in [-1, 1] (64 px) -> the tower's input, as open_clip's transform makes it from the PNG."""
    return ((pixels.clamp(-1, 1) + 1) / 2 - MEAN) / STD


def degrade(latents: torch.Tensor, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Each latent degraded by one random kind at a random severity in [0.3, 1]; returns (latents, severity)."""
    n = latents.shape[0]
    sev = 0.3 + 0.7 * torch.rand(n, generator=g)
    kinds = torch.randint(0, len(DEGRADATIONS), (n,), generator=g)
    out = latents.clone()
    gain = V.LATENT_GAIN
    for i in range(n):
        s, k, z = float(sev[i]), DEGRADATIONS[int(kinds[i])], out[i, :3]
        if k == "blur":
            blurred = F.avg_pool2d(z[None], 3, stride=1, padding=1, count_include_pad=False)[0]
            out[i, :3] = (1 - s) * z + s * blurred
        elif k == "noise":
            out[i, :3] = z + 0.7 * s * gain * torch.randn(z.shape, generator=g)
        elif k == "cast":
            out[i, :3] = z + 0.9 * s * gain * (torch.rand(3, 1, 1, generator=g) * 2 - 1)
        elif k == "artefacts":
            mask = (torch.rand(1, *z.shape[1:], generator=g) < 0.45 * s).float()
            out[i, :3] = z * (1 - mask) + mask * gain * (torch.rand(z.shape, generator=g) * 2 - 1)
        else:  # washed out: contrast towards mid grey
            out[i, :3] = z * (1 - 0.85 * s)
    return out, sev


def jitter(latents: torch.Tensor, g: torch.Generator, scale: float = 0.15) -> torch.Tensor:
    """Mild render-like noise, so the tower and judge see what an imperfect model draws."""
    noise = scale * V.LATENT_GAIN * torch.rand(latents.shape[0], 1, 1, 1, generator=g) * torch.randn(latents.shape, generator=g)
    noise[:, 3:] = 0
    return latents + noise


def write_tower_config(folder: Path) -> Path:
    path = folder / f"{TOWER_NAME}.json"
    atomic_write_text(path, json.dumps(TOWER_CONFIG, indent=1) + "\n")
    return path


def train_tower(folder: Path, sample: Callable[[torch.Generator, int], tuple[torch.Tensor, list[str]]], *, steps: int,
                seed: int, batch_size: int = 96, lr: float = 2e-3,
                on_step: Callable[[int, float], None] | None = None) -> tuple[Path, Path, Fit]:
    """Train the tower; writes ``TOWER_NAME.json`` (open_clip architecture) and ``tower.safetensors``."""
    import time

    import open_clip
    from safetensors.torch import save_file

    from scorers.tower import register_model_config

    t0 = time.perf_counter()
    cfg_path = write_tower_config(folder)
    register_model_config(cfg_path)
    torch.manual_seed(seed)
    import logging

    quiet = logging.getLogger().level
    logging.getLogger().setLevel(logging.ERROR)  # open_clip warns that a model it creates untrained is untrained
    try:
        model = open_clip.create_model(TOWER_NAME, pretrained=None, device="cpu")
    finally:
        logging.getLogger().setLevel(quiet)
    tok = open_clip.get_tokenizer(TOWER_NAME)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    g = torch.Generator().manual_seed(seed)
    token_cache: dict[str, torch.Tensor] = {}
    losses = []
    for i in range(steps):
        latents, prompts = sample(g, batch_size)
        imgs = preprocess(V.decode(jitter(latents, g)))
        uniq = list(dict.fromkeys(prompts))
        for p in uniq:
            if p not in token_cache:
                token_cache[p] = tok([p])[0]
        img_f = F.normalize(model.encode_image(imgs), dim=-1)
        txt_f = F.normalize(model.encode_text(torch.stack([token_cache[p] for p in uniq])), dim=-1)
        idx = torch.tensor([uniq.index(p) for p in prompts])
        logits = model.logit_scale.exp() * img_f @ txt_f.T  # [B, U]: each image against each distinct caption
        loss_i = F.cross_entropy(logits, idx)
        # caption -> image: every image of that caption is a positive (a batch holds several per caption)
        pos = (idx[None, :] == torch.arange(len(uniq))[:, None]).float()
        loss_t = -(torch.log_softmax(logits.T, dim=1) * pos / pos.sum(1, keepdim=True)).sum(1).mean()
        loss = (loss_i + loss_t) / 2
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, 4.6052)
        losses.append(float(loss.detach()))
        if on_step is not None:
            on_step(i, losses[-1])
    model.eval()
    weights = folder / "tower.safetensors"
    tmp = weights.with_name(weights.name + ".tmp")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp))
    tmp.replace(weights)
    tail = losses[-max(1, steps // 10):]
    return cfg_path, weights, Fit(steps, sum(tail) / len(tail), time.perf_counter() - t0)


def train_head(folder: Path, tower: object, sample: Callable[[torch.Generator, int], tuple[torch.Tensor, list[str]]], *,
               steps: int, seed: int, batch_size: int = 128, lr: float = 1e-3) -> tuple[Path, Fit]:
    """Train the aesthetic head on the frozen tower's image embeddings: clean (lightly jittered) renders score 7.5,
    degraded ones ``7.5 - 5 * severity``. Writes ``aesthetic_head.pth`` (a plain state dict, as the LAION file is)."""
    import io
    import time

    from astolfo_opt.checkpoint.writer import atomic_write_bytes
    from scorers.laion_aesthetic import AestheticHead

    t0 = time.perf_counter()
    torch.manual_seed(seed)
    model = tower.model  # type: ignore[attr-defined]
    head = AestheticHead(int(tower.embed_dim))  # type: ignore[attr-defined]
    opt = torch.optim.AdamW(head.parameters(), lr=lr)
    g = torch.Generator().manual_seed(seed)
    losses = []
    head.train()
    for _ in range(steps):
        latents, _ = sample(g, batch_size)
        half = batch_size // 2
        bad, sev = degrade(latents[half:], g)
        lat = torch.cat([jitter(latents[:half], g, 0.08), bad])
        target = torch.cat([torch.full((half,), 7.5), 7.5 - 5.0 * sev])
        with torch.no_grad():
            emb = F.normalize(model.encode_image(preprocess(V.decode(lat))).float(), dim=-1)
        loss = F.mse_loss(head(emb), target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    head.eval()
    buf = io.BytesIO()
    torch.save(head.state_dict(), buf)
    path = folder / "aesthetic_head.pth"
    atomic_write_bytes(path, buf.getvalue())
    tail = losses[-max(1, steps // 10):]
    return path, Fit(steps, sum(tail) / len(tail), time.perf_counter() - t0)
