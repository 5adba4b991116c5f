"""The embedded demo: a tiny SD1 pool, a tiny random CLIP scorer, a pruned study, an export - CPU, offline, minutes.

Steps (each printed): generate ``runs/demo/pool`` (base + 7 finetunes: ``m06`` ships ``m00``'s text encoder bit for
bit, so they share one inclusion parameter; ``m07_nan`` has NaN values in a UNet tensor), scan the pool (the NaN
model is flagged and excluded through ``pool.exclude=[m07_nan]``, which ``conf/pool/demo.yaml`` sets - the fix the
error message names), write the tiny CLIP tower + aesthetic head, run the study through the same Hydra config tree
as ``astolfo-opt search`` (median pruner over prompt batches, so weak trials stop after their first batch), export the
best trial to ``runs/demo/best.safetensors`` with the hash check, and print the time split and the dashboard command.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

from astolfo_opt.errors import ConfigError

DEMO_MODELS = 7


def make_demo_pool(folder: str | Path) -> list[Path]:
    """Base + ``m00..m06`` (m06 with m00's text encoder) + ``m07_nan`` (tiny SD1, fp16). Regenerated only when missing."""
    from astolfo_opt.testing.factory import ModelSpec, make_checkpoint, make_pool

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if not (folder / "base.safetensors").is_file() or not (folder / "m07_nan.safetensors").is_file():
        pool = make_pool(folder, n=DEMO_MODELS - 1, spreads=[0.04, 0.05, 0.06, 0.07, 0.05, 0.08])
        make_checkpoint(folder / f"m{DEMO_MODELS - 1:02d}.safetensors",
                        ModelSpec(seed=DEMO_MODELS, spread=0.05, copy_components={"te0": pool.models[0]}))
        # m06 above shares m00's text encoder; the NaN model comes last
        make_checkpoint(folder / "m07_nan.safetensors",
                        ModelSpec(seed=99, spread=0.05, corrupt={"model.diffusion_model.out.2.weight": "nan"}))
    return sorted(folder.glob("*.safetensors"))


def run_demo(out_dir: str | Path = "runs/demo", n_trials: int = 24, fresh: bool = True, device: str = "cpu",
             extra_overrides: list[str] | None = None) -> dict:
    from hydra import compose, initialize_config_dir

    from astolfo_opt.commands.search import conf_dir
    from astolfo_opt.search.app import run_search
    from astolfo_opt.search.export import export_trial
    from astolfo_opt.search.pool import resolve_pool
    from astolfo_opt.search.study import open_storage_url
    from scorers.testing import demo_objective_config

    t0 = time.perf_counter()
    out = Path(out_dir)
    if fresh:
        for p in ("study.db", "artifacts", "best.safetensors", "search.log", "hydra"):
            q = out / p
            shutil.rmtree(q) if q.is_dir() else q.unlink(missing_ok=True)
    pool_dir = out / "pool"
    files = make_demo_pool(pool_dir)
    print(f"[1/5] pool: {len(files)} tiny SD1 models in {pool_dir} ({time.perf_counter() - t0:.1f}s)")
    try:
        resolve_pool({"folder": str(pool_dir), "base": "base"}, cache_file=out / "pool_facts.json")
        raise AssertionError("the NaN model was not flagged")
    except ConfigError as e:
        print(f"[2/5] scan flags: {e}")
        print("      -> conf/pool/demo.yaml sets pool.exclude=[m07_nan], so the study never merges it")
    pool = resolve_pool({"folder": str(pool_dir), "base": "base", "exclude": ["m07_nan"]}, cache_file=out / "pool_facts.json")
    shared = pool.identical_groups("te0")
    print(f"      te0 groups: {[g for g in shared if len(g) > 1]} share one inclusion parameter")
    sc = demo_objective_config(out / "scorer", device=device)
    clip, aes = sc["scorers"]["clip"], sc["scorers"]["aesthetic"]
    print(f"[3/5] scorer: tiny random CLIP tower {Path(clip['pretrained']).name} + aesthetic head {Path(aes['head']).name}")
    overrides = [
        "pool=demo", f"pool.folder={pool_dir}", "study_name=demo", f"run_dir={out}", f"n_trials={n_trials}", f"device={device}",
        "render=tiny", "scorer=tiny_clip", f"scorer.scorers.clip.pretrained={clip['pretrained']}",
        f"scorer.scorers.aesthetic.head={aes['head']}",
        "pruner=median", "pruner.n_startup_trials=4", "sampler=tpe", "sampler.n_startup_trials=8", "space=inclusion_mbw",
        *(extra_overrides or []),
    ]
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3", job_name="demo"):
        cfg = compose("config", overrides=overrides)
    print(f"[4/5] search: {n_trials} trials, TPE + median pruning over prompt batches -> {out / 'study.db'}")
    res = run_search(cfg)
    for line in res.lines():
        print("      " + line)
    storage = f"sqlite:///{out / 'study.db'}"
    exp = export_trial(open_storage_url(storage), "demo", out / "best.safetensors", trial="best", device=device)
    print(f"[5/5] export: trial {exp.trial} -> {exp.path} (check against the scored merge: {exp.verified or 'skipped'})")
    split = res.time_split
    tot = split.get("total") or 1.0
    outside = (tot - split.get("render", 0.0) - split.get("score", 0.0)) / tot
    print(f"time split over {res.ran_here} trials: merge {split.get('merge', 0):.1f}s, render {split.get('render', 0):.1f}s, "
          f"score {split.get('score', 0):.1f}s, other {split.get('other', 0):.1f}s; outside render+score: {100 * outside:.1f}%")
    print(f"demo finished in {time.perf_counter() - t0:.0f}s")
    print(f"dashboard: astolfo-opt dashboard --storage {storage} --artifacts {out / 'artifacts'}")
    return {"result": res, "export": exp, "outside_share": outside, "seconds": time.perf_counter() - t0}
