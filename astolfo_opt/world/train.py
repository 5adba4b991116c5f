"""Training the world's diffusion models in the live render pipeline's own modules, and writing them as SD1 files.

Why train inside a :class:`~astolfo_opt.render.pipeline.RenderPipeline`: its modules are exactly what every later
render and swap uses, and its traced key map (``render/swap.py``) is the one bridge between diffusers parameters
and A1111 key names, so a trained model is written through the inverse of the map the renderer reads it with: a file
that round-trips through ``build_pipeline`` is what was trained, bit for bit after the fp16 cast.

The objective is SD's: epsilon prediction under the shipped scaled-linear DDPM schedule, text conditioning from the
pipeline's own CLIP text encoder (77 tokens, as rendering pads them), and 10% empty captions so classifier-free
guidance has an unconditional branch to push against.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from astolfo_opt.checkpoint import spec
from astolfo_opt.checkpoint.layout import component_of
from astolfo_opt.checkpoint.writer import SafetensorsWriter
from astolfo_opt.render.pipeline import RenderPipeline, load_config

#: draws one training batch: (generator, batch size) -> (latents [B, 4, 8, 8], prompts)
BatchFn = Callable[[torch.Generator, int], tuple[torch.Tensor, list[str]]]


@dataclass
class TrainResult:
    steps: int
    first_loss: float
    final_loss: float  # mean of the last 10% of steps
    seconds: float


def reinitialise(pipe: RenderPipeline, seed: int, components: tuple[str, ...] = ("unet", "te0")) -> None:
    """Give ``components`` diffusers' / transformers' own initialisation (seeded) in place: the factory's values are
    for merge tests, not for learning."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    for comp in components:
        if comp == "unet":
            fresh = UNet2DConditionModel.from_config(load_config(pipe.variant, pipe.size, "unet/config.json"))
        else:
            cfg = load_config(pipe.variant, pipe.size, "text_encoder/config.json")
            kw = {k: v for k, v in cfg.items() if k not in ("architectures", "model_type", "torch_dtype")}
            fresh = CLIPTextModel(CLIPTextConfig(**kw))
        state = fresh.state_dict()
        with torch.no_grad():
            for name, p in pipe.modules[comp].named_parameters():
                p.copy_(state[name])


def text_embeddings(pipe: RenderPipeline, prompts: list[str]) -> torch.Tensor:
    """``[N, 77, width]`` conditioning exactly as the SD pipeline computes it (each distinct prompt encoded once)."""
    uniq = list(dict.fromkeys(prompts))
    tok = pipe.pipe.tokenizer(uniq, padding="max_length", max_length=pipe.pipe.tokenizer.model_max_length, truncation=True,
                              return_tensors="pt").input_ids
    emb = pipe.modules["te0"](tok)[0]
    index = {p: i for i, p in enumerate(uniq)}
    # a one-hot product, not ``emb[idx]``: the backward of an index with repeats accumulates in an order that varies
    # between runs on CPU, and a world's file hashes must not
    pick = torch.nn.functional.one_hot(torch.tensor([index[p] for p in prompts]), len(uniq)).to(emb.dtype)
    return (pick @ emb.flatten(1)).view(len(prompts), *emb.shape[1:])


def train_diffusion(pipe: RenderPipeline, batches: BatchFn, *, steps: int, lr: float, batch_size: int = 32, seed: int = 0,
                    train_text: bool = False, p_uncond: float = 0.1, offset_noise: float = 0.15,
                    on_step: Callable[[int, float], None] | None = None) -> TrainResult:
    """Train the UNet (and the text encoder when ``train_text``) of ``pipe`` in place; deterministic per ``seed``."""
    import time

    from diffusers import DDPMScheduler

    t0 = time.perf_counter()
    sched = DDPMScheduler.from_config(load_config(pipe.variant, pipe.size, "scheduler/scheduler_config.json"))
    unet, te = pipe.modules["unet"], pipe.modules["te0"]
    params = [p for p in unet.parameters()]
    if train_text:
        params += [p for p in te.parameters()]
    for p in params:
        p.requires_grad_(True)
    unet.train()
    te.train(train_text)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    warm = max(1, steps // 20)
    lr_at = lambda i: lr * min(1.0, (i + 1) / warm) * (0.55 + 0.45 * math.cos(math.pi * i / steps))  # noqa: E731  (cosine to 10%)
    # Min-SNR-5 weighting (Hang et al. 2023, "Efficient Diffusion Training via Min-SNR Weighting Strategy"): the
    # near-clean steps, whose noise is unpredictable and which sampling hardly uses, stop dominating the loss
    ac = sched.alphas_cumprod
    snr = ac / (1 - ac)
    snr_weight = snr.clamp(max=5.0) / snr
    g = torch.Generator().manual_seed(seed)
    cached: dict[str, torch.Tensor] = {}
    losses = []
    for i in range(steps):
        latents, prompts = batches(g, batch_size)
        drop = torch.rand(len(prompts), generator=g) < p_uncond
        prompts = ["" if d else p for p, d in zip(prompts, drop.tolist(), strict=True)]
        noise = torch.randn(latents.shape, generator=g)
        # offset noise (Guttenberg 2023, as community finetunes train): a per-channel constant in the noise, so the
        # model learns to move an image's mean and can draw black and white backgrounds, which SD's schedule hides
        noise = noise + offset_noise * torch.randn(latents.shape[0], latents.shape[1], 1, 1, generator=g)
        t = torch.randint(0, sched.config.num_train_timesteps, (len(prompts),), generator=g)
        noisy = sched.add_noise(latents, noise, t)
        if train_text:
            cond = text_embeddings(pipe, prompts)
        else:
            missing = [p for p in dict.fromkeys(prompts) if p not in cached]
            if missing:
                with torch.no_grad():
                    cached.update(zip(missing, text_embeddings(pipe, missing), strict=True))
            cond = torch.stack([cached[p] for p in prompts])
        for group in opt.param_groups:
            group["lr"] = lr_at(i)
        err = (unet(noisy, t, cond).sample - noise).pow(2).mean(dim=(1, 2, 3))
        loss = (err * snr_weight[t]).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
        if on_step is not None:
            on_step(i, losses[-1])
    for p in params:
        p.requires_grad_(False)
    unet.eval()
    te.eval()
    tail = losses[-max(1, steps // 10):]
    return TrainResult(steps, losses[0], sum(tail) / len(tail), time.perf_counter() - t0)


def checkpoint_tensors(pipe: RenderPipeline, dtype: torch.dtype = torch.float16) -> dict[str, torch.Tensor]:
    """Canonical A1111 key -> tensor for every key of the pipeline's layout, through the inverse of its key map."""
    out: dict[str, torch.Tensor] = {}
    params = {comp: dict(m.named_parameters()) for comp, m in pipe.modules.items()}
    for ks in spec.checkpoint_keys(pipe.arch, pipe.size):
        if ks.key.endswith("position_ids"):
            out[ks.key] = torch.arange(ks.shape[-1], dtype=torch.int64).reshape(ks.shape)
            continue
        comp = component_of(pipe.arch, ks.key)
        rules = pipe.maps[comp].rules.get(ks.key) if comp in pipe.maps else None
        if not rules:
            raise KeyError(f"{ks.key}: no module parameter maps to it")
        parts = []
        for r in sorted(rules, key=lambda r: r.k):
            p = params[comp][r.target].detach()
            parts.append(p.T if r.op == "t" else p)
        t = torch.cat([q.reshape(-1) for q in parts]).reshape(ks.shape) if len(parts) > 1 else parts[0].reshape(ks.shape)
        out[ks.key] = t.to(dtype).contiguous()
    return out


def write_checkpoint(tensors: Mapping[str, torch.Tensor], path: str | Path, metadata: Mapping[str, str]) -> Path:
    """One ``.safetensors`` file, written to a temp file and renamed into place."""
    with SafetensorsWriter(path, [(k, t.dtype, tuple(t.shape)) for k, t in tensors.items()], metadata) as w:
        for k, t in tensors.items():
            w.write(k, t)
    return Path(path)


def pretrain_text(pipe: RenderPipeline, prompts: list[str], labels: torch.Tensor, *, steps: int = 150, lr: float = 3e-3,
                  seed: int = 0) -> TrainResult:
    """Teach the text encoder the world's words before the UNet learns to listen.

    Why: a randomly initialised 12-layer CLIP text encoder maps the world's prompts to nearly the same states (mean
    cosine 0.96 between different prompts), and a UNet trained on them spends its short budget separating them.
    Here linear probes read every attribute (``labels[:, a]``) from every token state, so each of the 77 positions
    the UNet attends to says the whole concept; the probes are thrown away."""
    import time

    t0 = time.perf_counter()
    torch.manual_seed(seed)
    te = pipe.modules["te0"]
    width = int(te.config.hidden_size)
    heads = torch.nn.ModuleList([torch.nn.Linear(width, int(labels[:, a].max()) + 1) for a in range(labels.shape[1])])
    params = [*te.parameters(), *heads.parameters()]
    for p in te.parameters():
        p.requires_grad_(True)
    te.train()
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    losses = []
    for _ in range(steps):
        states = text_embeddings(pipe, prompts)  # [N, 77, width]
        loss = sum(torch.nn.functional.cross_entropy(h(states).flatten(0, 1), labels[:, a].repeat_interleave(states.shape[1]))
                   for a, h in enumerate(heads))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    for p in te.parameters():
        p.requires_grad_(False)
    te.eval()
    tail = losses[-max(1, steps // 10):]
    return TrainResult(steps, losses[0], sum(tail) / len(tail), time.perf_counter() - t0)
