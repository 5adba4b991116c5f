"""From recipe to a ready-to-render pipeline: in-place swap vs writing a file and reloading it (issue 4).

Full-size SD1 layout, 4 inputs (the random fp16 checkpoints ``bench_merge.py`` generates, reused from
``--workdir``), page cache warmed. For one uniform 4-way recipe it times:

(a) ``merge(recipe, pipe.swap_sink())`` into a pipeline built once from the base (the study's trial path);
(b) ``merge(recipe, NullSink())``: the kernel alone, the floor for (a);
(c) ``merge`` into a ``.safetensors`` file + diffusers ``from_single_file(file, config=DIR, local_files_only=True)``
    (what a "write and reload" workflow pays every trial; our own ``build_pipeline(file)`` is timed beside it);
(d) ``IncrementalMerger`` + swap for a one-model UNet change (one member's UNet weight changed), after a first
    full incremental merge.

Correctness is checked, not assumed: (a) and (c) render the same 64 px 1-step image bit for bit, and after (d)
the swapped pipeline equals a pipeline built from a file of the changed recipe on a sample of parameters.

  python experiments/bench_swap.py --json experiments/results/bench_swap.json
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
for p in (ROOT, ROOT / "experiments"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))


def timed(fn) -> tuple[Any, float]:
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / "astolfo-bench-merge"),
                    help="where the full-size pool lives / is generated (shared with bench_merge.py)")
    ap.add_argument("--models", type=int, default=4)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--repeat", type=int, default=2, help="runs of (a) and (b), alternated; the best is reported")
    ap.add_argument("--json", default=None, help="write the results here")
    args = ap.parse_args()

    import numpy as np
    import torch
    from bench_merge import ensure_pool, warm
    from diffusers import StableDiffusionPipeline

    from astolfo_opt.merge.incremental import IncrementalMerger
    from astolfo_opt.merge.kernel import merge
    from astolfo_opt.merge.plan import resolve_device
    from astolfo_opt.merge.recipe import Recipe
    from astolfo_opt.merge.sinks import NullSink, SafetensorsSink
    from astolfo_opt.render.pipeline import build_pipeline, config_dir
    from astolfo_opt.render.prompts import Prompt
    from astolfo_opt.render.settings import RenderSettings

    dev = resolve_device(args.device)
    workdir = Path(args.workdir)
    paths = ensure_pool(workdir, args.models)
    t_warm = warm(paths)
    recipe = Recipe.average([str(p) for p in paths])
    settings = RenderSettings(width=64, height=64, steps=1, guidance_scale=7.0)
    prompt = [Prompt("a photo of a cat", "", 1)]
    res: dict[str, Any] = {"machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "device": str(dev),
                                       "torch": torch.__version__}, "models": len(paths), "warm_seconds": round(t_warm, 2)}

    # build once (a study pays this once)
    pipe, t_build = timed(lambda: build_pipeline(paths[0], device=dev))
    res["build_pipeline_from_base_s"] = round(t_build, 2)
    print(f"build_pipeline(base): {t_build:.2f} s ({pipe})", flush=True)

    # (a) merge straight into the live modules, (b) the kernel alone; alternated, best of --repeat each
    runs_a, runs_b = [], []
    for _ in range(args.repeat):
        stats_a, t = timed(lambda: merge(recipe, pipe.swap_sink(), device=dev, threads=args.threads))
        runs_a.append(round(t, 2))
        _, t = timed(lambda: merge(recipe, NullSink(), device=dev, threads=args.threads))
        runs_b.append(round(t, 2))
    t_a, t_b = min(runs_a), min(runs_b)
    img_a = np.asarray(pipe.render(prompt, settings)[0])
    res.update(a_swap_s=t_a, a_runs=runs_a, b_null_sink_s=t_b, b_runs=runs_b)
    print(f"(a) merge -> swap_sink: {t_a:.2f} s {runs_a} ({stats_a.summary()})", flush=True)
    print(f"(b) merge -> NullSink: {t_b:.2f} s {runs_b}", flush=True)

    # (c) write a file, reload with diffusers' single-file loader (and with ours)
    out = workdir / "bench_swap_merged.safetensors"
    cfg = config_dir("sd1", "full")
    _, t_write = timed(lambda: merge(recipe, SafetensorsSink(out, {}), device=dev, threads=args.threads))
    dtype = torch.float16 if dev.type == "cuda" else torch.float32
    del pipe
    gc.collect()
    ref, t_fsf = timed(lambda: StableDiffusionPipeline.from_single_file(
        str(out), config=str(cfg), local_files_only=True, torch_dtype=dtype, safety_checker=None,
        requires_safety_checker=False).to(dev))
    ref.set_progress_bar_config(disable=True)
    ref.scheduler = type(ref.scheduler).from_config(ref.scheduler.config)
    img_c = np.asarray(ref(prompt=[prompt[0].prompt], negative_prompt=[""], width=64, height=64, num_inference_steps=1,
                           guidance_scale=7.0, generator=[torch.Generator("cpu").manual_seed(1)]).images[0])
    del ref
    gc.collect()
    ours, t_ours = timed(lambda: build_pipeline(out, device=dev))
    res.update(c_write_s=round(t_write, 2), c_from_single_file_s=round(t_fsf, 2), c_total_s=round(t_write + t_fsf, 2),
               c_build_pipeline_s=round(t_ours, 2), c_total_ours_s=round(t_write + t_ours, 2),
               a_equals_c_image=bool(np.array_equal(img_a, img_c)))
    print(f"(c) write {t_write:.2f} s + from_single_file {t_fsf:.2f} s = {t_write + t_fsf:.2f} s "
          f"(our build_pipeline(file): {t_ours:.2f} s); image (a) == (c): {res['a_equals_c_image']}", flush=True)

    # (d) incremental: one model's UNet weight changes
    pipe = ours
    merger = IncrementalMerger(device=dev, threads=args.threads)
    _, t_first = timed(lambda: merger.merge(recipe, pipe.swap_sink()))
    changed = Recipe.from_dict(recipe.to_dict())
    changed.components["unet"].members[-1].weight = 0.0 if len(paths) > 2 else 0.5
    stats_d, t_d = timed(lambda: merger.merge(changed, pipe.swap_sink()))
    res.update(d_first_incremental_s=round(t_first, 2), d_one_model_unet_change_s=round(t_d, 2),
               d_changed=list(merger.last_changed), d_bytes_read=stats_d.bytes_read)
    print(f"(d) incremental first merge {t_first:.2f} s; one-model UNet change -> swap: {t_d:.2f} s "
          f"(changed {merger.last_changed}, {stats_d.bytes_read / 1e9:.2f} GB read)", flush=True)
    out2 = workdir / "bench_swap_changed.safetensors"
    merge(changed, SafetensorsSink(out2, {}), device=dev, threads=args.threads)
    from astolfo_opt.checkpoint.io import open_checkpoint

    live = dict(pipe.modules["unet"].named_parameters())
    with open_checkpoint(out2) as r:
        probe = {"model.diffusion_model.input_blocks.1.1.proj_in.weight": live["down_blocks.0.attentions.0.proj_in.weight"],
                 "model.diffusion_model.out.2.weight": live["conv_out.weight"]}
        worst = max(float((r.get(k).to(torch.float32) - p.detach().cpu().reshape(r.get(k).shape).float()).abs().max())
                    for k, p in probe.items())
    res["d_matches_file_max_abs"] = worst
    merger.close()
    for f in (out, out2):
        f.unlink(missing_ok=True)
    print(json.dumps(res, indent=2))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(res, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
