"""``astolfo-opt merge``: a recipe (or ``--average`` of N files) streamed into one ``.safetensors`` file."""

from __future__ import annotations

import argparse
from pathlib import Path

from astolfo_opt.errors import ConfigError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("recipe", nargs="?", help="recipe YAML/JSON (models, base, components, MBW weights)")
    p.add_argument("--average", nargs="+", metavar="MODEL", help="uniform N-way merge of these files (all components)")
    p.add_argument("--base", help="with --average: model file that fills keys missing from pruned inputs")
    p.add_argument("--out", required=True, help="output .safetensors (written to a temp file, renamed when complete)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda (default: auto)")
    p.add_argument("--dtype", default="fp16", choices=["fp16", "bf16", "fp32", "fp8_e4m3", "fp8_e5m2"],
                   help="output dtype (default fp16; fp8_* store F8_E4M3 / F8_E5M2, lossy)")
    p.add_argument("--accumulate", default="fp32", choices=["fp32", "fp64"], help="accumulation dtype (default fp32)")
    p.add_argument("--nan-policy", choices=["error", "drop_model"], help="override the recipe's NaN policy")
    p.add_argument("--threads", type=int, default=None, help="merge worker threads (default: min(4, cores))")
    p.add_argument("--allow-mixed-prediction", action="store_true",
                   help="merge a pool that mixes v-prediction and epsilon models anyway (refused by default: the result is broken)")
    p.add_argument("--title", help="modelspec.title of the output (default: astolfo-opt merge <recipe hash>)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def run(args: argparse.Namespace) -> int:
    from astolfo_opt.merge.kernel import merge
    from astolfo_opt.merge.recipe import Recipe
    from astolfo_opt.merge.sinks import SafetensorsSink, merge_metadata

    out = Path(args.out)
    if out.suffix.lower() != ".safetensors":
        raise ConfigError(f"--out {out}: the output must be a .safetensors file")
    if bool(args.recipe) == bool(args.average):
        raise ConfigError("give either a RECIPE file or --average A B ... (not both, not neither)")
    if args.average:
        paths = list(args.average) + ([args.base] if args.base else [])
        recipe = Recipe.average(paths)
        if args.base:
            base_name = list(recipe.models)[-1]
            recipe.base = base_name
            for c in recipe.components.values():
                c.members = [m for m in c.members if m.model != base_name]
    else:
        recipe = Recipe.load(args.recipe)
    if args.nan_policy:
        recipe.nan_policy = args.nan_policy
    if args.allow_mixed_prediction:
        recipe.allow_mixed_prediction = True
    for name, p in recipe.models.items():
        if Path(p).resolve() == out.resolve():
            raise ConfigError(f"--out {out} is also input model {name}: choose another output path")
    recipe.validate()  # a bad recipe is named before any file is opened for its metadata
    sink = SafetensorsSink(out, merge_metadata(recipe, title=args.title or out.stem))
    stats = merge(recipe, sink, device=args.device, out_dtype=args.dtype,
                  accumulate_dtype=args.accumulate, threads=args.threads, progress=not args.no_progress)
    print(f"{out}: {stats.summary()}")
    return 0
