"""The embedded demo: search the tiny trained world for a better merge than the uniform one, on CPU, offline.

Steps (each printed): build (or reuse) the demo world in ``runs/world-demo`` (``astolfo-opt world build``: a trained
base, finetunes that gain and forget concepts, an outlier, planted faults, its CLIP tower, aesthetic head and judge);
scan its pool (the NaN model is flagged and excluded through ``pool.exclude``, the fix the error message names; the
copied text encoder shares one inclusion parameter); run the study with ``scorer=world`` and the project's default
search (surrogate sampler, no pruner) through the same Hydra config tree as ``astolfo-opt search``; export the
best trial; render the uniform merge of every usable model and the exported best on the same prompts and seeds,
judge both with the world's held-out judge, and write ``summary.json`` and ``uniform_vs_best.png``.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

from astolfo_opt.errors import ConfigError

DEMO_WORLD = "runs/world-demo"


def _side_by_side(left: Any, right: Any, title: str) -> Any:
    from PIL import Image, ImageDraw

    pad, bar = 12, 28
    w, h = left.width + right.width + 3 * pad, max(left.height, right.height) + bar + 2 * pad
    canvas = Image.new("RGB", (w, h), "white")
    canvas.paste(left, (pad, bar + pad))
    canvas.paste(right, (2 * pad + left.width, bar + pad))
    ImageDraw.Draw(canvas).text((pad, 8), title, fill="black")
    return canvas


def world_search_config(world: str | Path, out: str | Path, n_trials: int, *, device: str = "cpu", study_name: str = "demo",
                        extra_overrides: list[str] | None = None, exclude: list[str] | None = None) -> Any:
    """The root search config on a built world (``scorer=world``, its pool without the NaN model, and without
    ``exclude`` when given), as the demo runs it."""
    from hydra import compose, initialize_config_dir

    from astolfo_opt.commands.search import conf_dir

    world = Path(world)
    doc = json.loads((world / "world.json").read_text())
    nan_models = [n for n, kind in doc["faults"].items() if kind == "nan"]
    excluded = list(dict.fromkeys([*nan_models, *(exclude or [])]))
    overrides = [
        "scorer=world", f"world_dir={world}", "pool=demo", f"pool.folder={world / 'pool'}", f"pool.exclude=[{','.join(excluded)}]",
        f"study_name={study_name}", f"run_dir={out}", f"n_trials={n_trials}", f"device={device}", *(extra_overrides or []),
    ]
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3", job_name=study_name):
        return compose("config", overrides=overrides)


def run_demo(out_dir: str | Path = "runs/demo", n_trials: int = 30, fresh: bool = True, device: str = "cpu",
             extra_overrides: list[str] | None = None, world_dir: str | Path = DEMO_WORLD, world_size: str = "demo") -> dict:
    from astolfo_opt.checkpoint.writer import atomic_write_bytes, atomic_write_text
    from astolfo_opt.render.grid import make_grid
    from astolfo_opt.render.pipeline import build_pipeline
    from astolfo_opt.render.prompts import load_prompt_set
    from astolfo_opt.search.app import run_search
    from astolfo_opt.search.export import export_trial
    from astolfo_opt.search.pool import resolve_pool
    from astolfo_opt.search.study import open_storage_url
    from astolfo_opt.world.build import BuildParams, build_world
    from astolfo_opt.world.check import WorldEval, prompts_for
    from astolfo_opt.world.concepts import all_concepts, split_heldout
    from astolfo_opt.world.judge import judge

    t0 = time.perf_counter()
    out, world = Path(out_dir), Path(world_dir)
    if fresh:
        for p in ("study.db", "artifacts", "best.safetensors", "search.log", "hydra", "summary.json", "uniform_vs_best.png"):
            q = out / p
            shutil.rmtree(q) if q.is_dir() else q.unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    print(f"[1/6] world: {world} (built on the first run, then reused)", flush=True)
    build_world(world, BuildParams(size=world_size), progress=True, log=lambda s: print("      " + s, flush=True))
    doc = json.loads((world / "world.json").read_text())
    pool_dir = world / "pool"
    nan_models = [n for n, kind in doc["faults"].items() if kind == "nan"]
    try:
        resolve_pool({"folder": str(pool_dir), "base": "base"}, cache_file=out / "pool_facts.json")
        raise AssertionError("the NaN model was not flagged")
    except ConfigError as e:
        print(f"[2/6] scan flags: {e}")
        print(f"      -> the demo sets pool.exclude={nan_models}, so the study never merges it")
    pool = resolve_pool({"folder": str(pool_dir), "base": "base", "exclude": nan_models}, cache_file=out / "pool_facts.json")
    shared = [g for g in pool.identical_groups("te0") if len(g) > 1]
    print(f"      te0 groups sharing one inclusion parameter: {shared}; outliers planted (the search is not told): "
          f"{doc['outliers']}")
    cfg = world_search_config(world, out, n_trials, device=device, extra_overrides=extra_overrides)
    print(f"[3/6] search: {n_trials} trials, sampler {cfg.sampler.name} + pruner {cfg.pruner.name}, scorer=world "
          f"(CLIP tower + aesthetic head) -> {out / 'study.db'}", flush=True)
    res = run_search(cfg)
    for line in res.lines():
        print("      " + line)
    storage = f"sqlite:///{out / 'study.db'}"
    exp = export_trial(open_storage_url(storage), "demo", out / "best.safetensors", trial="best", device=device)
    print(f"[4/6] export: trial {exp.trial} -> {exp.path} (check against the scored merge: {exp.verified or 'skipped'})")
    # ------------------------------------------------------------------ judge: uniform merge vs the exported best
    ev = WorldEval(world, device=device)
    usable = [m.name for m in pool.models]
    study_prompts = load_prompt_set(world / "prompts.yaml").prompts
    train, _ = split_heldout(all_concepts())
    eval_prompts = prompts_for(train, 2)
    ev.load(ev.recipe(usable))
    uni_study, uni_eval = ev.render(study_prompts), ev.render(eval_prompts)
    best = build_pipeline(exp.path, device=device)
    best_study, best_eval = best.render(study_prompts, ev.settings), best.render(eval_prompts, ev.settings)
    j = {name: judge(ev.judge_net, ims, [p.prompt for p in ps])["accuracy"] for name, ims, ps in (
        ("uniform_study", uni_study, study_prompts), ("best_study", best_study, study_prompts),
        ("uniform_eval", uni_eval, eval_prompts), ("best_eval", best_eval, eval_prompts))}
    obj_uni = ev.objective.evaluate(uni_study, [p.prompt for p in study_prompts]).value
    obj_best = ev.objective.evaluate(best_study, [p.prompt for p in study_prompts]).value
    print(f"[5/6] judge (held out, never optimised): uniform merge of {len(usable)} usable models "
          f"{j['uniform_eval']:.2f} -> best trial {j['best_eval']:.2f} on {len(eval_prompts)} training-concept renders; "
          f"on the study's {len(study_prompts)} prompts {j['uniform_study']:.2f} -> {j['best_study']:.2f} "
          f"(objective {obj_uni:.3f} -> {obj_best:.3f})")
    labels = [p.prompt for p in study_prompts]
    left = make_grid(uni_study, labels, title=f"uniform merge of {len(usable)} models: judge {j['uniform_study']:.2f}", cols=4)
    right = make_grid(best_study, labels, title=f"best trial {exp.trial}: judge {j['best_study']:.2f}", cols=4)
    fig = _side_by_side(left, right, "astolfo-opt demo: same prompts, same seeds, world render settings")
    import io

    buf = io.BytesIO()
    fig.save(buf, format="PNG")
    atomic_write_bytes(out / "uniform_vs_best.png", buf.getvalue())
    seconds = time.perf_counter() - t0
    summary = {"uniform_judge_accuracy": j["uniform_eval"], "best_judge_accuracy": j["best_eval"],
               "uniform_judge_accuracy_study_prompts": j["uniform_study"], "best_judge_accuracy_study_prompts": j["best_study"],
               "uniform_objective": obj_uni, "best_objective": obj_best, "best_trial": exp.trial, "trials": n_trials,
               "usable_models": usable, "excluded": nan_models, "outliers": doc["outliers"], "world": str(world),
               "best_file": str(exp.path), "judge_images": {"eval": len(eval_prompts), "study": len(study_prompts)},
               "time_split": res.time_split, "seconds": round(seconds, 1)}
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=1) + "\n")
    print(f"[6/6] uniform_judge_accuracy {summary['uniform_judge_accuracy']:.3f}, best_judge_accuracy "
          f"{summary['best_judge_accuracy']:.3f} -> {out / 'summary.json'}")
    print(f"      side by side: {out / 'uniform_vs_best.png'}; every trial's grid: {out / 'artifacts'} "
          f"(astolfo-opt dashboard --storage {storage} --artifacts {out / 'artifacts'})")
    print(f"      correct the objective by eye: astolfo-opt review --storage {storage} --study demo "
          f"(mark the worst of three grids; then search ... objective.calibration={out / 'calibration.json'})")
    print(f"demo finished in {seconds:.0f}s")
    return {"result": res, "export": exp, "summary": summary, "seconds": seconds}
