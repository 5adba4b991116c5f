"""``astolfo-opt render``: render a prompt set with one checkpoint to one PNG per prompt plus a labelled grid.png.

Same renderer, prompt sets and seeds as a study, so a merge exported from a study (or any model) can be looked at
exactly as the search saw it. A prompt set's ``render:`` section (size, steps, guidance, scheduler) gives the defaults
its author meant; flags given here still win. render.json's ``prompts`` list (aligned with ``files``) says which
prompt, negative and seed each image was rendered from."""

from __future__ import annotations

import argparse
import io
import json
import re
import time
from pathlib import Path

from astolfo_opt.errors import ConfigError

#: width = height per render variant when --size is not given (tiny test models: 64)
DEFAULT_SIZE = {"sd1": 512, "sd2-v": 768, "sd2-eps": 512, "sdxl": 1024, "sdxl-v": 1024}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, help="model file (.safetensors / .ckpt): SD1, SD2 or SDXL, full or tiny")
    p.add_argument("--prompts", default="default", help="prompt set YAML, or a shipped set: default | tiny | heldout (default: default)")
    p.add_argument("--out", required=True, help="output folder (created): one PNG per prompt, grid.png, render.json")
    p.add_argument("--steps", type=int, default=None,
                   help="sampling steps (default: the prompt set's render.steps, else 20; tiny models 2)")
    p.add_argument("--size", default=None, help="WxH, e.g. 512x768 (default: the prompt set's render.width/height, else by variant: "
                                              "512 / 768 sd2-v / 1024 sdxl; tiny 64)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda (default: auto)")
    p.add_argument("--variant", default=None, help="sd1 | sd2-v | sd2-eps | sdxl | sdxl-v (default: from the file's v_pred marker / "
                                                   "ModelSpec; SD2 stating neither must be given)")
    p.add_argument("--guidance", type=float, default=None,
                   help="classifier-free guidance scale (default: the prompt set's render.guidance_scale, else 7.0; tiny 5.0)")
    p.add_argument("--guidance-rescale", type=float, default=None,
                   help="diffusers guidance_rescale, 0..1 (default: 0.7 for zero-terminal-SNR sdxl-v, else 0)")
    p.add_argument("--scheduler", default=None, help="euler | euler_a | ddim | dpm++2m | dpm++2m_karras | unipc | pndm "
                                                     "(default: the prompt set's render.scheduler, else euler)")
    p.add_argument("--clip-skip", type=int, default=None, help="diffusers clip_skip (1 = A1111 'clip skip 2')")
    p.add_argument("--batch-size", type=int, default=1, help="prompts per pipeline call (default 1)")
    p.add_argument("--dtype", default=None, choices=["fp32", "fp16", "bf16"], help="pipeline dtype (default: fp16 on CUDA, fp32 on CPU)")
    p.add_argument("--limit", type=int, default=None, help="render only the first N prompts")


def _slug(text: str, n: int = 40) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:n] or "prompt"


def run(args: argparse.Namespace) -> int:
    import torch

    from astolfo_opt.checkpoint.writer import atomic_write_bytes, atomic_write_text
    from astolfo_opt.render.grid import label, make_grid
    from astolfo_opt.render.pipeline import build_pipeline
    from astolfo_opt.render.prompts import load_prompt_set, resolve_prompt_set
    from astolfo_opt.render.settings import RenderSettings, parse_size

    prompt_set = load_prompt_set(resolve_prompt_set(args.prompts, "--prompts"))
    prompts = prompt_set.prompts[: args.limit] if args.limit else prompt_set.prompts
    if not prompts:
        raise ConfigError("--limit leaves no prompt to render")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} exists and is not a folder")
    dtype = {None: None, "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
    t0 = time.perf_counter()
    pipe = build_pipeline(args.checkpoint, variant=args.variant, device=args.device, dtype=dtype, config_key="--variant")
    t_build = time.perf_counter() - t0
    tiny = pipe.size in ("tiny", "world")  # small test layouts render at 64 px unless told otherwise
    # precedence: explicit flag > the prompt set's render: section > built-in default (per variant / tiny)
    preset = prompt_set.render
    if args.size:
        width, height = parse_size(args.size)
    else:
        width = height = 64 if tiny else DEFAULT_SIZE[pipe.variant]
        width, height = preset.get("width", width), preset.get("height", height)
    guidance = args.guidance if args.guidance is not None else preset.get("guidance_scale", 5.0 if tiny else 7.0)
    settings = RenderSettings(width=width, height=height, steps=args.steps or preset.get("steps", 2 if tiny else 20),
                              guidance_scale=guidance, scheduler=args.scheduler or preset.get("scheduler", "euler"),
                              clip_skip=args.clip_skip, batch_size=args.batch_size, guidance_rescale=args.guidance_rescale)
    out.mkdir(parents=True, exist_ok=True)
    images, labels, files, rendered = [], [], [], []
    t1 = time.perf_counter()
    for batch in pipe.render_batches(prompts, settings):
        for p, img in batch:
            name = f"{len(images):02d}_s{p.seed}_{_slug(p.prompt)}.png"
            buf = io.BytesIO()
            img.save(buf, format="PNG")
            atomic_write_bytes(out / name, buf.getvalue())
            images.append(img)
            labels.append(label(p.prompt, p.seed, Path(args.checkpoint).stem))
            files.append(name)
            rendered.append({"prompt": p.prompt, "negative": p.negative, "seed": p.seed})
            print(f"  {name}")
    t_render = time.perf_counter() - t1
    title = (f"{Path(args.checkpoint).name} | {pipe.variant} ({pipe.size}) | {settings.width}x{settings.height}, "
             f"{settings.steps} steps, {settings.scheduler}, cfg {settings.guidance_scale} | prompts: {prompt_set.name}")
    grid = make_grid(images, labels, title=title)
    buf = io.BytesIO()
    grid.save(buf, format="PNG")
    atomic_write_bytes(out / "grid.png", buf.getvalue())
    # variant / prediction_type: what was rendered (picked from the file unless --variant); prediction: what the file states
    source = "file" if args.variant in (None, "", "auto") else "--variant"
    meta = {"checkpoint": str(args.checkpoint), "variant": pipe.variant, "variant_source": source,
            "prediction_type": pipe.prediction_type, "ztsnr": pipe.ztsnr, "guidance_rescale": pipe.guidance_rescale(settings),
            "prediction": pipe.prediction.to_json() if pipe.prediction else None, "size": pipe.size, "device": str(pipe.device),
            "dtype": str(pipe.dtype).replace("torch.", ""), "prompt_set": prompt_set.name, "prompt_set_hash": prompt_set.hash,
            "settings": settings.__dict__, "files": files, "prompts": rendered,
            "seconds": {"build": round(t_build, 3), "render": round(t_render, 3)}}
    atomic_write_text(out / "render.json", json.dumps(meta, indent=2) + "\n")
    print(f"{out}: {len(images)} images + grid.png (build {t_build:.1f} s, render {t_render:.1f} s on {pipe.device})")
    return 0
