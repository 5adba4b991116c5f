"""Does the search beat random and the automated human (greedy) procedure? (issue 8)

A tiny real-layout SD1 pool (base + N finetunes of varied spread, one or two 10x outliers) and a hidden target recipe
drawn from the seed (per component each inlier in with p=0.5, MBW alpha ~ U(0.2, 1) per UNet block). The value of a
trial's merge is the weight-space oracle ``s = 1 - |θ - θ*| / |θ_uniform - θ*|`` (0 at the uniform average the
workflow starts from, 1 at the target); the optimiser sees ``s + N(0, σ²)``, the benchmark reports the true ``s``.
Every strategy runs through the real search code (SearchSpace -> Candidate/Recipe, TrialObjective, the study's
samplers / pruners / warm starts, greedy) on the ``inclusion_mbw`` space with the same trial budget.

  python experiments/bench_search.py --seed 0,1,2,3,4 --models 12 --trials 60 --repeats 3 --repeats-of gp=1 \
      --json experiments/results/bench_search.json --png experiments/results/bench_search.png
  python experiments/bench_search.py --mode pruning --seed 0 --models 12 --trials 60 --json .../bench_pruning.json

The default strategy (``DEFAULT``) is what ``astolfo-opt search`` uses unless told otherwise: ``sampler=surrogate``
(conf/config.yaml); every strategy's sampler is built from its shipped conf/sampler file through the search's factory.

``--mode pruning``: trials report ``--prompts`` per-prompt proxy scores (noisy, rank-preserving in ``s``); the
default strategy runs without and with each pruner, and the JSON gives the share of render steps (and seconds, when
``astolfo_opt.render`` can render the tiny fixtures) that pruning saved at the final best value reached.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from astolfo_opt.errors import AstolfoError, ConfigError  # noqa: E402
from benchkit.oracle import MISMATCHES  # noqa: E402

DEFAULT = "surrogate"
STRATEGIES = ("surrogate", "staged", "random", "greedy", "tpe", "cmaes", "gp", "qmc")
#: seeds on which sampler settings were (and may be) scanned, and the disjoint seeds the reported tables use: no
#: setting is tuned on a reporting seed (issue 15). ``--seed tuning`` / ``--seed reporting`` expand to them.
SEED_SETS = {"tuning": (0, 1, 2, 3, 4), "reporting": (100, 101, 102, 103, 104)}
THRESHOLDS = (0.8, 0.85, 0.9, 0.95)
PRUNERS = ("none", "incumbent", "median", "successive_halving", "hyperband")


# ------------------------------------------------------------------------------------------------ one run
#: ``--sampler-set``: per-strategy changes to the shipped sampler options (tuning runs, on tuning seeds only)
SAMPLER_SET: dict[str, dict[str, Any]] = {}


def _sampler(name: str, seed: int):
    """The strategy's sampler exactly as ``astolfo-opt search sampler=NAME`` builds it (shipped conf/sampler file, plus
    any ``--sampler-set`` change)."""
    from astolfo_opt.search.study import make_sampler
    from benchkit.oracle import load_conf

    return make_sampler({**load_conf("sampler", name), **SAMPLER_SET.get(name, {})}, seed, multi=False, constraints=False)


def parse_sampler_set(text: str | None) -> dict[str, dict[str, Any]]:
    """``surrogate.n_startup=36;tpe.n_startup_trials=5`` -> ``{"surrogate": {"n_startup": 36}, ...}``."""
    out: dict[str, dict[str, Any]] = {}
    for item in filter(None, (text or "").split(";")):
        key, eq, value = item.partition("=")
        name, dot, opt = key.strip().partition(".")
        if not (eq and dot and name in STRATEGIES and opt):
            raise ConfigError(f"--sampler-set {item!r}: write STRATEGY.OPTION=VALUE, e.g. surrogate.n_startup=36")
        out.setdefault(name, {})[opt] = yaml.safe_load(value)
    return out


def run_strategy(name: str, space, oracle, *, trials: int, seed: int, noise: float, n_steps: int = 1, pruner: str = "none",
                 render=None, warm_start: bool = True) -> dict[str, Any]:
    """One study of ``trials`` counted trials with strategy ``name``; true ``s`` per trial from the cached oracle."""
    import optuna
    from optuna.trial import TrialState

    from astolfo_opt.search.objective import TrialObjective
    from astolfo_opt.search.study import enqueue_warm_starts, make_pruner, run_trials
    from benchkit.oracle import NoisyOracleEvaluator, load_conf

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    ev = NoisyOracleEvaluator(oracle, noise=noise, seed=seed, n_steps=n_steps, render=render)
    pname, _, popts = pruner.partition(":")  # e.g. "incumbent:z=1.5"
    pcfg = load_conf("pruner", pname)
    for item in filter(None, popts.split(";")):
        k, _, v = item.partition("=")
        pcfg[k.strip()] = yaml.safe_load(v)
    pr = make_pruner(pcfg, multi=False)  # exactly as ``astolfo-opt search pruner=NAME`` builds it
    greedy = name == "greedy"
    sampler = _sampler("tpe" if greedy else name, seed)
    study = optuna.create_study(storage=optuna.storages.InMemoryStorage(), direction="maximize", sampler=sampler, pruner=pr)
    objective = TrialObjective(space, ev, pruning=pname != "none", artifacts=None, n_trials=None if greedy else trials,
                               reuse_duplicates=True, title=name)
    t0 = time.perf_counter()
    if greedy:
        from astolfo_opt.search.greedy import run_greedy

        run_greedy(study, space, objective, trials)
    else:
        if warm_start:
            enqueue_warm_starts(study, space.warm_starts(), trials)
        run_trials(study, objective, trials)
    wall = time.perf_counter() - t0
    trials_done = [t for t in study.get_trials(deepcopy=False) if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    trials_done.sort(key=lambda t: t.number)
    curve, observed, best, best_obs, inc_true = [], [], -math.inf, -math.inf, -math.inf
    cum_steps, acc = [], 0
    for t in trials_done:
        # prompt batches rendered: reported ones when pruning, all of them otherwise, none for a reused duplicate
        acc += len(t.intermediate_values) or (0 if "cached_from" in t.user_attrs else n_steps)
        cum_steps.append(acc)
        if t.state == TrialState.COMPLETE:
            s = oracle.value(json.loads(t.user_attrs["recipe"]))
            best = max(best, s)
            if t.values[0] > best_obs:
                best_obs, inc_true = t.values[0], s
        curve.append(best)
        observed.append(best_obs)
    if not curve:
        raise ConfigError(f"strategy {name}: no trial finished")
    curve = (curve + [curve[-1]] * trials)[:trials]  # greedy may stop early (no improving flip): flat tail
    steps = sum(len(t.intermediate_values) or 1 for t in trials_done)
    return {"curve": curve, "cum_steps": cum_steps, "incumbent_true": inc_true, "trials_run": len(trials_done), "evaluations": ev.calls,
            "pruned": sum(t.state == TrialState.PRUNED for t in trials_done), "render_steps": ev.steps_run,
            "render_seconds": ev.render_seconds, "steps": steps, "wall_seconds": wall, "handed_over": handed_over(trials_done)}


def handed_over(trials) -> int | None:
    """The trial at which ``sampler=surrogate`` handed the study to its misfit fallback (None: it never did)."""
    from astolfo_opt.search.surrogate.sampler import FALLBACK_ATTR, MISFIT

    return min((t.number for t in trials if MISFIT in str(t.user_attrs.get(FALLBACK_ATTR, ""))), default=None)


def trials_to(curve: list[float], threshold: float) -> int | None:
    return next((i + 1 for i, v in enumerate(curve) if v >= threshold), None)


def _median_or_none(vals: list[int | None], cap: int) -> int | None:
    """Median of trial counts where ``None`` (never reached) ranks above every number; ``None`` if the median is."""
    xs = sorted(v if v is not None else math.inf for v in vals)
    m = statistics.median_low(xs) if len(xs) % 2 else statistics.median(xs)
    return None if not math.isfinite(m) or m > cap else (int(m) if float(m).is_integer() else float(m))  # type: ignore[return-value]


def summarise(runs: list[dict[str, Any]], trials: int) -> dict[str, Any]:
    curves = [r["curve"] for r in runs]
    curve = [statistics.median(c[i] for c in curves) for i in range(trials)]
    out = {"trials_to_95": _median_or_none([trials_to(c, 0.95) for c in curves], trials),
           "best_at_budget": statistics.median(c[-1] for c in curves),
           "curve": [round(v, 5) for v in curve],
           "trials_to": {str(th): _median_or_none([trials_to(c, th) for c in curves], trials) for th in THRESHOLDS},
           "reached_95": sum(trials_to(c, 0.95) is not None for c in curves),
           "incumbent_true_at_budget": statistics.median(r["incumbent_true"] for r in runs),
           "best_at_budget_min": min(c[-1] for c in curves), "best_at_budget_max": max(c[-1] for c in curves),
           "runs": len(runs), "mean_wall_seconds": statistics.mean(r["wall_seconds"] for r in runs),
           "handed_over_runs": sum(r.get("handed_over") is not None for r in runs)}
    return out


# ------------------------------------------------------------------------------------------------ setup per seed
def setup(seed: int, models: int, workdir: Path, backend: str, mismatch: str = "original"):
    from benchkit.oracle import CachedOracle, MismatchedOracle, draw_target, make_bench_pool, make_oracle, space_from_bench_pool

    pool, outliers = make_bench_pool(workdir / f"pool_n{models}_s{seed}", models, seed=seed)
    space = space_from_bench_pool(pool)
    target = space.candidate(draw_target(space, seed, outliers))
    if mismatch == "original":
        oracle = CachedOracle(make_oracle(backend, space, target.spec))
    elif backend != "gram":
        raise ConfigError(f"--mismatch {mismatch} is built on the gram oracle; drop --oracle {backend}")
    else:
        oracle = CachedOracle(MismatchedOracle(space, target.spec, mismatch, seed, outliers))
    return pool, space, target, oracle


def _render_hook(pool, prompts: int):
    """A per-step callable that renders one tiny image with the real pipeline, and what the cost column means."""
    from astolfo_opt.render.pipeline import build_pipeline
    from astolfo_opt.render.prompts import Prompt
    from astolfo_opt.render.settings import RenderSettings

    pipe = build_pipeline(str(pool.base), variant="sd1", device="auto")
    settings = RenderSettings(width=64, height=64, steps=4, guidance_scale=5.0, scheduler="euler", clip_skip=1, batch_size=1)

    def render(step: int) -> None:
        pipe.render([Prompt(f"a photo, prompt {step}", seed=step)], settings)

    return render, "real tiny renders (astolfo_opt.render, 64x64, 4 steps) per prompt step"


# ------------------------------------------------------------------------------------------------ modes
def bench_search(args, seeds: list[int], names: list[str], workdir: Path) -> dict[str, Any]:
    runs: dict[str, list[dict[str, Any]]] = {n: [] for n in names}
    per_seed: list[dict[str, Any]] = []
    for seed in seeds:
        t0 = time.perf_counter()
        _, space, _, oracle = setup(seed, args.models, workdir, args.oracle, args.mismatch)
        row: dict[str, Any] = {"seed": seed, "setup_seconds": round(time.perf_counter() - t0, 1), "strategies": {}}
        for name in names:
            for r in range(repeats_of(args, name)):
                res = run_strategy(name, space, oracle, trials=args.trials, seed=seed * 1000 + r, noise=args.noise)
                runs[name].append(res)
                row["strategies"].setdefault(name, []).append({"best_at_budget": round(res["curve"][-1], 4),
                                                               "trials_to_95": trials_to(res["curve"], 0.95),
                                                               "trials_to_90": trials_to(res["curve"], 0.9),
                                                               "handed_over": res["handed_over"]})
                print(f"seed {seed} {name:8s} rep {r}: best {res['curve'][-1]:.4f}  to0.9 {trials_to(res['curve'], 0.9)}  "
                      f"to0.95 {trials_to(res['curve'], 0.95)}  ({res['wall_seconds']:.1f}s)", flush=True)
        per_seed.append(row)
    summary = {n: summarise(runs[n], args.trials) for n in names}
    return {"default": DEFAULT, "trials": args.trials, "models": args.models, "noise": args.noise, "repeats": args.repeats,
            "seeds": seeds, "seed_set": args.seed_set, "oracle": args.oracle, "mismatch": args.mismatch, "space": "inclusion_mbw",
            "sampler_set": SAMPLER_SET,
            "strategies": summary, "per_seed": per_seed,
            "criteria": criteria(summary, args.trials)}


def repeats_of(args, name: str) -> int:
    """``--repeats``, or a per-strategy override from ``--repeats-of gp=1,...`` (GP is ~100x slower per trial)."""
    for item in (args.repeats_of or "").split(","):
        if "=" in item:
            k, v = item.split("=", 1)
            if k.strip() == name:
                return max(int(v), 1)
    return args.repeats


def criteria(summary: dict[str, Any], trials: int) -> dict[str, Any]:
    """The issue's acceptance test for the default, at 0.95 and (for information) at lower thresholds."""
    out: dict[str, Any] = {}
    d = summary.get(DEFAULT)
    if d is None:
        return out
    for th in THRESHOLDS:
        key = str(th)
        rnd = summary.get("random", {}).get("trials_to", {}).get(key)
        mine = d["trials_to"].get(key)
        rnd_eff = 3 * trials if rnd is None else rnd
        out[f"faster_than_random_x3@{th}"] = mine is not None and mine * 3 <= rnd_eff
    if "greedy" in summary:
        out["ends_at_least_greedy"] = d["best_at_budget"] >= summary["greedy"]["best_at_budget"]
    return out


def saving_at_equal_best(base_curve: list[float], base_cum: list[int], curve: list[float], cum: list[int],
                         total: int) -> tuple[float, bool]:
    """``(saving, reached)``: the share of render cost the pruned run saved reaching the unpruned run's final best -
    ``1 - cost until the pruned run first had it / cost until the unpruned run first had it``. The final best, not
    the best at T trials, because pruning's point is reaching the same merge for fewer renders; a pruned run that
    never reaches it is charged everything it rendered (``reached`` False)."""
    goal = base_curve[-1]
    ib = next(j for j, v in enumerate(base_curve) if v >= goal - 1e-12)
    need = max(base_cum[min(ib, len(base_cum) - 1)], 1)
    i = next((j for j, v in enumerate(curve[: len(cum)]) if v >= goal - 1e-12), None)
    return (1 - cum[i] / need, True) if i is not None else (1 - total / need, False)


def parse_pruners(text: str) -> list[str]:
    pruners = [p.strip() for p in text.split(",") if p.strip()]
    for p in pruners:
        if p.partition(":")[0] not in PRUNERS:
            raise ConfigError(f"--pruners: {p!r} is unknown; use some of {', '.join(PRUNERS)}")
    return pruners


def bench_pruning(args, seeds: list[int], workdir: Path) -> dict[str, Any]:
    pruners = parse_pruners(args.pruners)
    runs: dict[str, list[dict[str, Any]]] = {p: [] for p in pruners}
    note = None
    for seed in seeds:
        pool, space, _, oracle = setup(seed, args.models, workdir, args.oracle, args.mismatch)
        render, note = _render_hook(pool, args.prompts) if args.render else (None, "render cost counted in prompt steps")
        for p in pruners:
            for r in range(args.repeats):
                budget = args.trials if p == "none" else int(args.trials * args.pruned_budget)
                res = run_strategy(args.pruning_strategy, space, oracle, trials=budget, seed=seed * 1000 + r,
                                   noise=args.noise, n_steps=args.prompts, pruner=p, render=render)
                res["key"] = (seed, r)
                runs[p].append(res)
                print(f"seed {seed} pruner {p:18s} rep {r}: best {res['curve'][-1]:.4f} steps {res['render_steps']} "
                      f"pruned {res['pruned']}", flush=True)
    out: dict[str, Any] = {}
    base = {r["key"]: r for r in runs.get("none", [])}
    base_steps = statistics.median(r["render_steps"] for r in base.values()) if base else None
    for p, rs in runs.items():
        steps = statistics.median(r["render_steps"] for r in rs)
        eq, reached = [], 0
        for r in rs:
            b = base.get(r["key"])
            if b is None:
                continue
            saved, hit = saving_at_equal_best(b["curve"], b["cum_steps"], r["curve"], r["cum_steps"], r["render_steps"])
            eq.append(saved)
            reached += hit
        n = len(rs[0]["curve"])
        out[p] = {"best_at_budget": statistics.median(r["curve"][-1] for r in rs), "trials": n,
                  "best_at_T": statistics.median(r["curve"][min(args.trials, n) - 1] for r in rs),
                  "render_steps": steps, "render_seconds": statistics.median(r["render_seconds"] for r in rs),
                  "render_steps_at_T": statistics.median(r["cum_steps"][min(args.trials, len(r["cum_steps"])) - 1] for r in rs),
                  "pruned_trials": statistics.median(r["pruned"] for r in rs),
                  "saving": None if not base_steps else round(1 - steps / base_steps, 4),
                  "saving_at_equal_best": round(statistics.median(eq), 4) if eq else None,
                  "reached_unpruned_best": f"{reached}/{len(eq)}",
                  "curve": [round(statistics.median(r["curve"][i] for r in rs), 5) for i in range(n)]}
    return {"mode": "pruning", "default": DEFAULT, "strategy": args.pruning_strategy, "trials": args.trials,
            "models": args.models, "prompts": args.prompts, "noise_of_mean": args.noise, "seeds": seeds, "repeats": args.repeats,
            "render": note, "pruners": out}


# ------------------------------------------------------------------------------------------------ world mode
def world_pool_subset(world: Path, models: int) -> tuple[list[str], list[str]]:
    """``(kept, excluded)`` model names of a built world for a pool of ``models`` finetunes besides the base: its planted
    outliers (1 below 8 models, else 2, as the oracle pools), then finetunes in name order; planted faults are left out
    (this benchmark compares search strategies, the scan's fault handling is tested elsewhere)."""
    doc = json.loads((world / "world.json").read_text())
    names = sorted(Path(rel).stem for rel in doc["files"] if rel.startswith("pool/"))
    faults, outliers = set(doc["faults"]), [m for m in doc["outliers"] if m in names]
    finetunes = [m for m in names if m != "base" and m not in faults and m not in outliers]
    n_out = min(len(outliers), 1 if models < 8 else 2)
    if models > len(finetunes) + n_out or models < 2:
        raise ConfigError(f"--models {models}: the world at {world} has {len(finetunes)} finetunes and {len(outliers)} outliers; "
                          "build a larger one (astolfo-opt world build --size bench) or ask for fewer")
    kept = ["base", *outliers[:n_out], *finetunes[: models - n_out]]
    return kept, [m for m in names if m not in kept]


def run_name(name: str, models: int, seed: int, pruner: str = "none", batch: int | None = None) -> str:
    """The folder / cache name of one world run: a ``--sampler-set``, pruned or re-batched run is another run, never the
    shipped one's (two processes with different settings must not share a study)."""
    changed = "".join(f"_{k}-{v}" for k, v in sorted(SAMPLER_SET.get(name, {}).items()))  # no "=": Hydra reads run_dir
    safe = "".join(c if c.isalnum() or c in "_." else "-" for c in pruner)  # "incumbent:paired=true" -> a folder name
    return (f"{name}{changed}{'' if pruner == 'none' else '_' + safe}"
            f"{'' if batch is None else f'_b{batch}'}_n{models}_s{seed}")


def world_run(name: str, world: Path, models: int, *, trials: int, seed: int, workdir: Path, device: str,
              pruner: str = "none", batch: int | None = None) -> dict[str, Any]:
    """One real study on the world (merge -> swap -> render -> score) with strategy ``name``: the shipped sampler
    (or ``strategy=greedy``), ``pruner`` (none in search mode), the study's warm starts; per trial its objective and the
    renders it cost (a pruned trial counts the prompts it rendered). ``batch``: prompts per pipeline call, i.e. per
    pruning report (the world's shipped 12 is one report per trial, so nothing can be pruned)."""
    import shutil

    import optuna
    from optuna.trial import TrialState

    from astolfo_opt.search.app import run_search
    from astolfo_opt.search.demo import world_search_config
    from astolfo_opt.search.study import open_storage_url

    out = workdir / run_name(name, models, seed, pruner, batch)
    shutil.rmtree(out, ignore_errors=True)
    _, excluded = world_pool_subset(world, models)
    pr, _, opts = pruner.partition(":")  # e.g. "incumbent:z=1.5;n_warmup_steps=0", as the synthetic pruning mode
    overrides = [f"pruner={pr}", *(f"pruner.{kv.strip()}" for kv in opts.split(";") if kv.strip()),
                 *([f"render.batch_size={batch}"] if batch is not None else []), f"seed={seed}", "progress=false", "artifacts=false",
                 "strategy=greedy" if name == "greedy" else f"sampler={name}",
                 *(f"sampler.{k}={json.dumps(v)}" for k, v in SAMPLER_SET.get(name, {}).items())]
    cfg = world_search_config(world, out, trials, device=device, study_name=name, extra_overrides=overrides, exclude=excluded)
    t0 = time.perf_counter()
    run_search(cfg)
    wall = time.perf_counter() - t0
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    study = optuna.load_study(study_name=name, storage=open_storage_url(f"sqlite:///{out / 'study.db'}"))
    done = sorted((t for t in study.get_trials(deepcopy=False) if t.state in (TrialState.COMPLETE, TrialState.PRUNED)),
                  key=lambda t: t.number)
    curve, renders, best, acc, inc = [], [], -math.inf, 0, None
    split: dict[str, float] = {}
    for t in done:
        acc += 0 if "cached_from" in t.user_attrs else len(t.user_attrs.get("per_prompt") or [])  # a duplicate renders nothing
        for k, v in (t.user_attrs.get("time") or {}).items():
            split[k] = split.get(k, 0.0) + float(v)
        if t.state == TrialState.COMPLETE and t.values[0] > best:
            best, inc = t.values[0], t
        curve.append(best)
        renders.append(acc)
    if inc is None:
        raise ConfigError(f"strategy {name}: no trial finished on the world")
    curve = (curve + [curve[-1]] * trials)[:trials]  # greedy may stop early: flat tail, no more renders
    renders = (renders + [renders[-1]] * trials)[:trials]
    return {"curve": curve, "cum_renders": renders, "renders": acc, "trials_run": len(done), "wall_seconds": wall,
            "time_split": {k: round(v, 2) for k, v in split.items()}, "incumbent_trial": inc.number,
            "incumbent_objective": inc.values[0], "incumbent_recipe": inc.user_attrs["recipe"], "handed_over": handed_over(done),
            "pruned": sum(t.state == TrialState.PRUNED for t in done),
            "first_objective": done[0].values[0] if done[0].state == TrialState.COMPLETE else None}


def kept_world_run(args, name: str, seed: int, workdir: Path, *, trials: int, pruner: str = "none",
                   batch: int | None = None) -> dict[str, Any]:
    """:func:`world_run`, or its result kept beside its study by an earlier sweep: a long sweep can stop and go on
    (``--workdir``), and the pruning mode's unpruned runs are the search mode's."""
    from astolfo_opt.checkpoint.writer import atomic_write_text

    done = workdir / f"{run_name(name, args.models, seed, pruner, batch)}_t{trials}.json"
    if done.is_file():
        res = json.loads(done.read_text())
    else:
        res = world_run(name, Path(args.world), args.models, trials=trials, seed=seed, workdir=workdir, device=args.device,
                        pruner=pruner, batch=batch)
        res["seed"] = seed
        atomic_write_text(done, json.dumps(res))
    print(f"world seed {seed} {name:9s} pruner {pruner}: best objective {res['curve'][-1]:.4f} (incumbent trial "
          f"{res['incumbent_trial']}), {res['renders']} renders, {res.get('pruned', 0)} pruned, {res['wall_seconds']:.0f} s",
          flush=True)
    return res


def judge_incumbent(ev, world: Path, recipe_json: str) -> dict[str, float]:
    """The world's held-out judge on the incumbent, rendered again: the study's prompts plus the never-trained
    (held-out) combinations - the judge was never optimised, so this is the check the objective cannot game."""
    from astolfo_opt.render.prompts import load_prompt_set
    from astolfo_opt.search.space import spec_to_recipe
    from astolfo_opt.world.judge import judge

    ev.load(spec_to_recipe(json.loads(recipe_json)))
    study, held = load_prompt_set(world / "prompts.yaml").prompts, load_prompt_set(world / "heldout.yaml").prompts
    a = judge(ev.judge_net, ev.render(study), [p.prompt for p in study])["accuracy"]
    h = judge(ev.judge_net, ev.render(held), [p.prompt for p in held])["accuracy"]
    return {"judge_accuracy": (a * len(study) + h * len(held)) / (len(study) + len(held)), "judge_study": a, "judge_heldout": h}


def checked_world(path: str) -> Path:
    world = Path(path)
    if not (world / "world.json").is_file():
        raise ConfigError(f"--world {world}: no world.json there (build one: astolfo-opt world build --out {world} --size bench)")
    return world


def best_by_renders(run: dict[str, Any], grid: list[int]) -> list[float]:
    """The run's best objective once it had spent at most ``r`` renders, for each ``r`` of ``grid`` (-inf before its
    first finished trial): the curve that compares runs whose trials cost different numbers of renders."""
    out = []
    for r in grid:
        i = next((j for j, c in reversed(list(enumerate(run["cum_renders"]))) if c <= r), None)
        out.append(run["curve"][i] if i is not None else -math.inf)
    return out


def bench_world_pruning(args, seeds: list[int], workdir: Path) -> dict[str, Any]:
    """``--world DIR --mode pruning``: the default strategy on the world without a pruner (the search mode's runs, the
    shipped one-batch render) and with each pruner (``--prune-batch`` prompts per pruning report, ``--pruned-budget``
    times the trials, since a pruned trial is cheaper); renders saved at the unpruned run's final best, per seed."""
    from astolfo_opt.render.prompts import load_prompt_set
    from astolfo_opt.world.check import WorldEval

    world = checked_world(args.world)
    pruners = parse_pruners(args.pruners)
    if "none" not in pruners:
        raise ConfigError("--pruners: include none, the run every pruner is compared with")
    n_prompts = len(load_prompt_set(world / "prompts.yaml").prompts)
    if not 1 <= args.prune_batch < n_prompts:
        raise ConfigError(f"--prune-batch {args.prune_batch}: give 1 to {n_prompts - 1} (the world has {n_prompts} prompts; "
                          "one batch per trial leaves the pruner nothing to stop)")
    runs: dict[str, list[dict[str, Any]]] = {p: [] for p in pruners}
    for seed in seeds:
        for p in pruners:
            pruned = p != "none"
            runs[p].append(kept_world_run(args, args.pruning_strategy, seed, workdir, pruner=p,
                                          trials=int(args.trials * args.pruned_budget) if pruned else args.trials,
                                          batch=args.prune_batch if pruned else None))
    ev = WorldEval(world, device=args.device)
    for rs in runs.values():
        for r in rs:
            r.update(judge_incumbent(ev, world, r["incumbent_recipe"]))
    base = {r["seed"]: r for r in runs["none"]}
    top = max(r["cum_renders"][-1] for rs in runs.values() for r in rs)
    grid = list(range(n_prompts, top + n_prompts, n_prompts))
    out: dict[str, Any] = {}
    for p, rs in runs.items():
        per_run = []
        for r in rs:
            b = base[r["seed"]]
            saved, hit = saving_at_equal_best(b["curve"], b["cum_renders"], r["curve"], r["cum_renders"], r["renders"])
            # its best within the unpruned run's renders in T trials: the equal-renders budget
            at_equal = best_by_renders(r, [b["cum_renders"][-1]])[0]
            per_run.append({"seed": r["seed"], "saving_at_equal_best": round(saved, 4), "reached_unpruned_best": hit,
                            "best_at_equal_renders": at_equal, "best_at_budget": r["curve"][-1], "renders": r["renders"],
                            "trials_run": r["trials_run"], "pruned": r.get("pruned", 0), "judge_accuracy": r["judge_accuracy"],
                            "incumbent_trial": r["incumbent_trial"], "wall_seconds": r["wall_seconds"]})
        def med(k: str, rows: list[dict[str, Any]] = per_run) -> float:
            return statistics.median(x[k] for x in rows)

        out[p] = {"batch": args.prune_batch if p != "none" else n_prompts, "trials": len(rs[0]["curve"]),
                  "best_at_budget": med("best_at_budget"), "best_at_equal_renders": med("best_at_equal_renders"),
                  "best_at_T": statistics.median(r["curve"][args.trials - 1] for r in rs),
                  "renders": med("renders"), "renders_at_T": statistics.median(r["cum_renders"][args.trials - 1] for r in rs),
                  "pruned_trials": med("pruned"), "saving_at_equal_best": med("saving_at_equal_best"),
                  "reached_unpruned_best": f"{sum(x['reached_unpruned_best'] for x in per_run)}/{len(per_run)}",
                  "judge_accuracy": med("judge_accuracy"), "mean_wall_seconds": statistics.mean(x["wall_seconds"] for x in per_run),
                  "curve": [round(statistics.median(r["curve"][min(i, len(r["curve"]) - 1)] for r in rs), 5)
                            for i in range(len(rs[0]["curve"]))],
                  "by_renders": [round(statistics.median(c), 5) for c in zip(*(best_by_renders(r, grid) for r in rs), strict=True)],
                  "per_run": per_run}
    return {"mode": "pruning", "world": str(world), "world_seed": json.loads((world / "world.json").read_text())["seed"],
            "default": DEFAULT, "strategy": args.pruning_strategy, "trials": args.trials, "pruned_budget": args.pruned_budget,
            "models": args.models, "prompts": n_prompts, "seeds": seeds, "seed_set": args.seed_set, "render_grid": grid,
            "rule": "saving at equal best: 1 - renders until the pruned run first reached the unpruned run's final best / "
                    "renders until the unpruned run first reached it (same seed); a run that never reaches it is charged "
                    "all its renders. best_at_equal_renders: the pruned run's best within the unpruned run's renders in T trials",
            "pruners": out}


def renders_to(run: dict[str, Any], goal: float) -> int | None:
    return next((r for v, r in zip(run["curve"], run["cum_renders"], strict=True) if v >= goal), None)


def bench_world(args, seeds: list[int], names: list[str], workdir: Path) -> dict[str, Any]:
    """``--world DIR``: every strategy through the real pipeline on a built world (see module doc)."""
    from astolfo_opt.world.check import WorldEval

    world = checked_world(args.world)
    kept, _ = world_pool_subset(world, args.models)
    runs: dict[str, list[dict[str, Any]]] = {n: [] for n in names}
    for seed in seeds:
        for name in names:
            runs[name].append(kept_world_run(args, name, seed, workdir, trials=args.trials))
    ev = WorldEval(world, device=args.device)
    for rs in runs.values():
        for r in rs:
            r.update(judge_incumbent(ev, world, r["incumbent_recipe"]))
    # best-known objective: the best any strategy reached with that seed (same world, same pool, same prompts)
    best_known = {seed: max(r["curve"][-1] for rs in runs.values() for r in rs if r["seed"] == seed) for seed in seeds}
    summary = {}
    for name, rs in runs.items():
        curves = [r["curve"] for r in rs]
        goal = {k: v - 0.05 * abs(v) for k, v in best_known.items()}  # 95% of it when positive, as the issue states
        to95 = [renders_to(r, goal[r["seed"]]) for r in rs]
        t95 = [trials_to(r["curve"], goal[r["seed"]]) for r in rs]
        cap = max(r["cum_renders"][-1] for r in rs)
        summary[name] = {
            "best_at_budget": statistics.median(c[-1] for c in curves),
            "curve": [round(statistics.median(c[i] for c in curves), 5) for i in range(args.trials)],
            "trials_to_95": _median_or_none(t95, args.trials), "renders_to_95": _median_or_none(to95, cap),
            "reached_95": sum(x is not None for x in to95),
            "judge_accuracy": statistics.median(r["judge_accuracy"] for r in rs),
            "judge_heldout": statistics.median(r["judge_heldout"] for r in rs),
            "incumbent_objective": statistics.median(r["incumbent_objective"] for r in rs),
            "renders": statistics.median(r["renders"] for r in rs), "runs": len(rs),
            "time_split": {k: round(statistics.median(r["time_split"].get(k, 0.0) for r in rs), 2) for k in rs[0]["time_split"]},
            "mean_wall_seconds": statistics.mean(r["wall_seconds"] for r in rs),
            "per_run": [{k: r[k] for k in ("seed", "incumbent_trial", "incumbent_objective", "judge_accuracy", "judge_heldout",
                                             "renders", "wall_seconds")} | {"best_at_budget": r["curve"][-1],
                                                                            "handed_over": r.get("handed_over")} for r in rs],
        }
    return {"mode": "world", "default": DEFAULT, "trials": args.trials, "models": args.models, "seeds": seeds,
            "seed_set": args.seed_set, "world": str(world), "world_seed": json.loads((world / "world.json").read_text())["seed"],
            "pool": kept, "budget": "trials; each trial renders the study's prompt set, a reused duplicate renders nothing",
            "sampler_set": SAMPLER_SET, "best_known": {str(k): v for k, v in best_known.items()},
            # trial 0 of every strategy: the uniform average (the study's first warm start; greedy's start point)
            "uniform_objective": {str(seed): statistics.median(r["first_objective"] for rs in runs.values() for r in rs
                                                               if r["seed"] == seed and r.get("first_objective") is not None)
                                  for seed in seeds},
            "best_known_rule": "per seed, the best objective any strategy reached at T (same world, pool and prompts); "
                               "'to 95' = first reaching best_known - 0.05 |best_known| (95% of it when positive)",
            "objective": "scorer=world: CLIP similarity + aesthetic head, min-max normalised, weights 1:1",
            "strategies": summary}


# ------------------------------------------------------------------------------------------------ outputs
def markdown_table(result: dict[str, Any]) -> str:
    """The README table of a result JSON (``python experiments/bench_search.py --table FILE``)."""
    if "strategies" in result:
        lines = ["| strategy | trials to 0.95 | to 0.90 | to 0.85 | to 0.80 | best at T (median) | min - max | runs |",
                 "|---|---|---|---|---|---|---|---|"]
        for n, s in result["strategies"].items():
            t = s["trials_to"]
            name = f"**{n}** (default)" if n == result.get("default") else n
            lines.append(f"| {name} | {t['0.95'] or '-'} | {t['0.9'] or '-'} | {t['0.85'] or '-'} | {t['0.8'] or '-'} | "
                         f"{s['best_at_budget']:.3f} | {s['best_at_budget_min']:.3f} - {s['best_at_budget_max']:.3f} | {s['runs']} |")
        return "\n".join(lines)
    lines = ["| pruner | render steps in T trials | best at T | steps saved at equal final best (median) | reached unpruned best |",
             "|---|---|---|---|---|"]
    for n, s in result["pruners"].items():
        lines.append(f"| {n} | {s.get('render_steps_at_T', s['render_steps']):.0f} | {s['best_at_T']:.3f} | "
                     f"{100 * (s['saving_at_equal_best'] or 0):.0f}% | {s['reached_unpruned_best']} |")
    return "\n".join(lines)


def write_png(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from astolfo_opt.checkpoint.writer import atomic_write_bytes

    series = result["strategies"] if "strategies" in result else result["pruners"]
    if "render_grid" in result:  # world pruning: cost is renders, and a pruned trial costs fewer than a finished one
        series = {n: {**s, "curve": s["by_renders"]} for n, s in series.items()}
    world = "world" in result
    # world: the warm starts (uniform average, base alone) put every Optuna strategy near the best at trial 2, so the
    # axis starts there - what the strategies add after it is the interesting part; a curve that stays below says so
    lo = max(s["curve"][1] for s in series.values()) if world else None  # the base alone: every study's trial 2
    hi = max(s["curve"][-1] for s in series.values())
    fig, ax = plt.subplots(figsize=(7.5, 4.5), dpi=110)
    for i, (name, s) in enumerate(series.items()):
        lw = 2.6 if name in (result.get("default"), "none") else 1.4
        ls = ("-", "--", ":", "-.")[i % 4] if "render_grid" in result else "-"  # pruners often share a median curve
        below = lo is not None and s["curve"][-1] < lo
        xs = result.get("render_grid") or range(1, len(s["curve"]) + 1)
        ax.plot(xs, s["curve"], label=f"{name} (below: ends at {s['curve'][-1]:.3f})" if below else name, lw=lw, ls=ls)
    ax.set_xlabel("renders (prompts rendered)" if "render_grid" in result else "trial")
    if world:
        ax.set_ylabel("best objective so far (median over seeds)")
        if lo is not None and hi > lo:
            ax.set_ylim(lo - 0.15 * (hi - lo), hi + 0.1 * (hi - lo))
    else:
        ax.axhline(0.95, color="grey", ls="--", lw=0.8)
        ax.set_ylabel("best true s so far (median)")
        ax.set_ylim(min(0.0, min(min(s["curve"]) for s in series.values())), 1.0)
    title = ("pruning on the trained world" if world else "pruning (default strategy)") if "pruners" in result else (
        "search strategies on the trained world" if result.get("mode") == "world" else "search strategies")
    ax.set_title(f"{title}: N={result['models']}, T={result['trials']}, seeds {', '.join(map(str, result['seeds']))}",
                 fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left" if world else "lower right")
    import io

    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png")
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seed", default="0", help="seed or comma list of seeds (pool + target + sampler), or a named set: "
                    + ", ".join(f"{k} ({','.join(map(str, v))})" for k, v in SEED_SETS.items()))
    ap.add_argument("--models", type=int, default=12, help="finetunes in the pool (besides the base)")
    ap.add_argument("--trials", type=int, default=60, help="trial budget per strategy")
    ap.add_argument("--noise", type=float, default=0.02, help="σ of the noise the optimiser sees on s")
    ap.add_argument("--repeats", type=int, default=1, help="runs per seed (sampler / noise seed varies)")
    ap.add_argument("--repeats-of", default=None, help="per-strategy repeats, e.g. gp=1 (the slow one)")
    ap.add_argument("--strategies", default=",".join(STRATEGIES), help=f"comma list out of {', '.join(STRATEGIES)}")
    ap.add_argument("--oracle", default="gram", help="gram (exact, fast) | reference (torch merge) | kernel (astolfo_opt.merge)")
    ap.add_argument("--sampler-set", default=None, help="change shipped sampler options, e.g. 'surrogate.n_startup=36' "
                    "(';'-separated); recorded in the JSON. Tuning runs only: never on the reporting seeds")
    ap.add_argument("--world", default=None, help="world mode: a built world folder (astolfo-opt world build); every "
                    "strategy runs the real pipeline on it")
    ap.add_argument("--device", default="cpu", help="world mode: merge / render / score device")
    ap.add_argument("--mismatch", default="original", help="oracle variant (gram backend): " + ", ".join(MISMATCHES))
    ap.add_argument("--mode", default="search", choices=("search", "pruning"))
    ap.add_argument("--pruners", default="none,incumbent,median,successive_halving,hyperband", help="pruning mode: pruners to compare")
    ap.add_argument("--pruning-strategy", default=DEFAULT, help="pruning mode: the strategy run with each pruner")
    ap.add_argument("--pruned-budget", type=float, default=2.0,
                    help="pruning mode: trial budget of pruned runs as a multiple of --trials (to measure steps at equal best)")
    ap.add_argument("--prompts", type=int, default=8, help="pruning mode: prompt steps per trial")
    ap.add_argument("--prune-batch", type=int, default=2, help="world pruning mode: prompts per pruning report in the pruned "
                    "runs, as conf/render/default.yaml batches (the world renders its 12 prompts in one call otherwise)")
    ap.add_argument("--render", action="store_true", help="pruning mode: really render a tiny image per step when possible")
    ap.add_argument("--workdir", default=None, help="where pools are generated and reused (default: a temp folder)")
    ap.add_argument("--json", required=True, help="result JSON path")
    ap.add_argument("--png", default=None, help="best-so-far curves PNG path")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    if argv is None and len(sys.argv) == 3 and sys.argv[1] == "--table":
        print(markdown_table(json.loads(Path(sys.argv[2]).read_text())))
        return 0
    args = parse_args(argv)
    try:
        args.seed_set = args.seed if args.seed in SEED_SETS else None
        try:
            seeds = list(SEED_SETS[args.seed]) if args.seed_set else [int(s) for s in str(args.seed).split(",") if s.strip()]
        except ValueError:
            raise ConfigError(f"--seed {args.seed!r}: give an integer, a comma list like 0,1,2 or one of "
                              f"{', '.join(SEED_SETS)}") from None
        SAMPLER_SET.clear()
        SAMPLER_SET.update(parse_sampler_set(args.sampler_set))
        if SAMPLER_SET and args.seed_set == "reporting":
            raise ConfigError("--sampler-set on the reporting seeds: tune on --seed tuning (or other seeds), report on these")
        if args.mismatch not in MISMATCHES:
            raise ConfigError(f"--mismatch {args.mismatch!r} is unknown; use one of {', '.join(MISMATCHES)}")
        names = [s.strip() for s in args.strategies.split(",") if s.strip()]
        bad = [n for n in names if n not in STRATEGIES]
        if bad:
            raise ConfigError(f"--strategies: {bad[0]!r} is unknown; use some of {', '.join(STRATEGIES)}")
        if args.trials < 2 or args.repeats < 1:
            raise ConfigError("--trials must be >= 2 and --repeats >= 1")
        import tempfile

        from astolfo_opt.checkpoint.writer import atomic_write_text

        with tempfile.TemporaryDirectory(prefix="bench_search_") as tmp:
            workdir = Path(args.workdir) if args.workdir else Path(tmp)
            if args.world and args.mode == "pruning":
                result = bench_world_pruning(args, seeds, workdir)
            elif args.world:
                result = bench_world(args, seeds, names, workdir)
            elif args.mode == "search":
                result = bench_search(args, seeds, names, workdir)
            else:
                result = bench_pruning(args, seeds, workdir)
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(Path(args.json), json.dumps(result, indent=1))
        if args.png:
            Path(args.png).parent.mkdir(parents=True, exist_ok=True)
            write_png(result, Path(args.png))
    except AstolfoError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.world and args.mode == "pruning":
        for p, s in result["pruners"].items():
            print(f"{p:18s} best={s['best_at_budget']:.4f} at_equal_renders={s['best_at_equal_renders']:.4f} "
                  f"renders={s['renders']} saving@equal_best={s['saving_at_equal_best']} reached={s['reached_unpruned_best']} "
                  f"judge={s['judge_accuracy']:.3f}")
    elif args.world:
        for n, s in result["strategies"].items():
            print(f"{n:9s} best_at_budget={s['best_at_budget']:.4f} judge={s['judge_accuracy']:.3f} "
                  f"renders_to_95={s['renders_to_95']} trials_to_95={s['trials_to_95']}")
    elif args.mode == "search":
        for n, s in result["strategies"].items():
            print(f"{n:8s} trials_to_95={s['trials_to_95']} to0.9={s['trials_to']['0.9']} best_at_budget={s['best_at_budget']:.4f}")
        print("criteria:", result["criteria"])
    else:
        for p, s in result["pruners"].items():
            print(f"{p:18s} best@T={s['best_at_T']:.4f} best={s['best_at_budget']:.4f} steps={s['render_steps']} "
                  f"saving@equal_best={s['saving_at_equal_best']} reached={s['reached_unpruned_best']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
