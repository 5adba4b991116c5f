"""``run_search(cfg)``: one study from a resolved config - pool -> space -> evaluator -> study -> trials -> summary.

Hydra (``astolfo-opt search``), the demo and the tests all call this with the composed config (``conf/config.yaml``
and its groups), so there is one code path. It never parses arguments and never exits the process.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from astolfo_opt.config import to_plain
from astolfo_opt.errors import ConfigError

log = logging.getLogger("astolfo_opt.search")


def section(cfg: Any, key: str, default: Any = None) -> Any:
    """A config section as plain Python (OmegaConf resolved), naming the key when a value is missing."""
    node = cfg.get(key, default) if isinstance(cfg, Mapping) or hasattr(cfg, "get") else default
    return to_plain(node, key)


@dataclass
class SearchResult:
    study_name: str
    storage: str
    run_dir: Path
    n_trials: int
    ran_here: int
    evaluations: int
    states: dict[str, int]
    best_number: int | None
    best_values: list[float] | None
    best_params: dict[str, Any] | None
    #: summed seconds over trials that ran here: merge, render, score, other, total (trial wall time)
    time_split: dict[str, float] = field(default_factory=dict)
    space_lines: list[str] = field(default_factory=list)
    greedy: dict[str, Any] | None = None

    def lines(self) -> list[str]:
        out = [f"study {self.study_name} ({self.storage}): {self.states}"]
        if self.best_number is not None:
            out.append(f"best trial #{self.best_number}: {self.best_values} {self.best_params}")
        tot = self.time_split.get("total") or 0.0
        if tot:
            shares = ", ".join(f"{k} {v:.1f}s ({100 * v / tot:.0f}%)" for k, v in self.time_split.items() if k != "total")
            out.append(f"time over {self.ran_here} trials here ({tot:.1f}s): {shares}")
        return out


def _add_file_log(run_dir: Path) -> logging.Handler | None:
    """Log to ``run_dir/search.log`` when Hydra is not already writing a job log (demo, tests, API use)."""
    root = logging.getLogger()
    if any(isinstance(h, logging.FileHandler) for h in root.handlers + log.handlers):
        return None
    h = logging.FileHandler(run_dir / "search.log")
    h.setFormatter(logging.Formatter("[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"))
    log.addHandler(h)
    log.setLevel(logging.INFO)
    return h


def run_search(cfg: Any) -> SearchResult:
    """Run (or resume / join) the study described by ``cfg``; returns a summary."""
    import optuna
    from optuna.trial import TrialState

    from astolfo_opt.search.calibration import ObjectiveForm
    from astolfo_opt.search.evaluator import build_evaluator
    from astolfo_opt.search.objective import TrialObjective
    from astolfo_opt.search.pool import resolve_pool
    from astolfo_opt.search.progress import TrialProgress
    from astolfo_opt.search.space import SearchSpace
    from astolfo_opt.search.study import enqueue_warm_starts, make_pruner, make_sampler, make_storage, open_study, run_trials

    optuna.logging.set_verbosity(optuna.logging.WARNING)  # one line per trial comes from TrialProgress instead
    study_name = str(section(cfg, "study_name") or "default")
    run_dir = Path(str(section(cfg, "run_dir") or f"runs/{study_name}"))
    run_dir.mkdir(parents=True, exist_ok=True)
    handler = _add_file_log(run_dir)
    try:
        n_trials = int(section(cfg, "n_trials", 20))
        seed = section(cfg, "seed", 0)
        seed = None if seed is None else int(seed)
        pool_cfg = section(cfg, "pool", {}) or {}
        pool = resolve_pool(pool_cfg, cache_file=run_dir / "pool_facts.json")
        for name, why in pool.excluded.items():
            log.info("pool: %s excluded (%s)", name, why)
        space = SearchSpace(pool, section(cfg, "space", {}) or {}, nan_policy=str(pool_cfg.get("nan_policy", "error")),
                            time_embed_block=str(section(cfg, "time_embed_block", "IN00")))
        for line in space.describe():
            log.info("%s", line)
        ev_cfg = section(cfg, "evaluator", {}) or {}
        plain = {"evaluator": ev_cfg, "seed": seed or 0, "device": section(cfg, "device", "auto"), "pool": pool_cfg,
                 "render": section(cfg, "render", {}) if ev_cfg.get("kind", "pipeline") == "pipeline" else {},
                 "scorer": cfg.get("scorer") if hasattr(cfg, "get") else None}
        evaluator = build_evaluator(str(ev_cfg.get("kind", "pipeline")), space, plain)
        cal_file = (section(cfg, "objective", {}) or {}).get("calibration")
        auto_name, calibration = study_name, None
        if cal_file:
            from astolfo_opt.search.calibration import CalibratedEvaluator, Calibration

            calibration = Calibration.load(cal_file)
            evaluator = CalibratedEvaluator(evaluator, calibration)
            study_name = f"{study_name}+cal-{calibration.hash[:8]}"
            log.info("objective.calibration=%s: continuing study %s as %s", cal_file, auto_name, study_name)
        log.info("%s", evaluator.describe())
        multi = len(evaluator.directions) > 1
        storage, storage_desc = make_storage(section(cfg, "storage", {}) or {}, run_dir)
        if calibration is not None:  # the study it continues must exist, before anything is created
            try:
                src = optuna.load_study(study_name=auto_name, storage=storage)
            except KeyError:
                raise ConfigError(f"objective.calibration continues a study, and there is no study {auto_name!r} in {storage_desc} "
                                  f"(the calibration was fitted on study {calibration.source.get('study')!r}: set study_name)") from None
        strategy = str((section(cfg, "strategy", {}) or {}).get("name", "optuna"))
        sampler_cfg = section(cfg, "sampler", {}) or {}
        sampler = make_sampler(sampler_cfg, seed, multi=multi, constraints=space.min_models > 1)
        pruner_cfg = section(cfg, "pruner", {}) or {}
        pruner = make_pruner(pruner_cfg, multi=multi)
        study = open_study(study_name, storage, evaluator.directions, sampler, pruner, metric_names=evaluator.names)
        prev = study.user_attrs.get("space_params")
        if prev is not None and list(prev) != space.names:
            raise ConfigError(f"study {study_name!r} was created with another search space ({len(prev)} params, now "
                              f"{len(space.names)}); use a new study_name or the same space/pool config")
        if prev is None:
            study.set_user_attr("space_params", space.names)
            study.set_user_attr("space", section(cfg, "space", {}) or {})
            study.set_user_attr("pool", {"models": pool.paths, "base": pool.base, "arch": pool.arch, "size": pool.size,
                                         "excluded": pool.excluded, "prediction": pool.prediction})
            form = getattr(evaluator, "objective", None)
            study.set_user_attr("objective", {"names": evaluator.names, "directions": evaluator.directions,
                                              "scorers": evaluator.scorer_names, "prompt_set_hash": evaluator.prompt_set_hash,
                                              "evaluator": ev_cfg.get("kind", "pipeline"),
                                              "hashes_tensors": getattr(evaluator, "hashes_tensors", True),
                                              "render_variant": getattr(evaluator, "variant", None),
                                              "scored_with": getattr(evaluator, "scored_with", "automatic"),
                                              **(ObjectiveForm.of_objective(form).as_attr() if form is not None else {})})
            if calibration is not None:
                study.set_user_attr("calibration", {**calibration.to_json(), "continues": auto_name})
        if calibration is not None and len(study.trials) == 0:
            from astolfo_opt.search.calibration import copy_rescored

            k = copy_rescored(src, study, calibration)
            log.info("re-scored %d trials of %s with the calibrated objective (no rendering)", k, auto_name)
        artifacts = None
        if bool(section(cfg, "artifacts", True)):
            from astolfo_opt.search.artifacts import ArtifactWriter

            artifacts = ArtifactWriter(run_dir / "artifacts")
        objective = TrialObjective(space, evaluator, pruning=pruner_cfg.get("name", "none") != "none", artifacts=artifacts,
                                   n_trials=None if strategy == "greedy" else n_trials,
                                   reuse_duplicates=bool(section(cfg, "reuse_duplicates", True)), title=study_name)
        fresh = len(study.trials) == 0
        if strategy == "optuna" and fresh and bool(section(cfg, "warm_start", True)):
            k = enqueue_warm_starts(study, space.warm_starts(), n_trials)
            log.info("enqueued %d warm starts (uniform average, base alone)", k)
        done_before = len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)))
        progress = TrialProgress(n_trials, done_before, enabled=bool(section(cfg, "progress", True)), directions=evaluator.directions)
        grace = float((section(cfg, "storage", {}) or {}).get("grace_period") or 300)
        t0 = time.perf_counter()
        greedy_summary = None
        try:
            if strategy == "optuna":
                run_trials(study, objective, n_trials, grace_period=grace, callbacks=[progress],
                           max_in_process=section(cfg, "max_trials_per_worker"))
            elif strategy == "greedy":
                from astolfo_opt.search.greedy import run_greedy

                if multi:
                    raise ConfigError("strategy=greedy is single-objective: set scorer.multi=false")
                greedy_summary = run_greedy(study, space, objective, n_trials, callbacks=[progress])
            else:
                raise ConfigError(f"strategy.name={strategy!r} is unknown; use optuna or greedy")
        finally:
            progress.close()
            evaluator.close()
        wall = time.perf_counter() - t0
        ran = set(objective.numbers)
        mine = [t for t in study.get_trials(deepcopy=False) if t.number in ran]
        split = {"merge": 0.0, "render": 0.0, "score": 0.0, "other": 0.0, "total": 0.0}
        for t in mine:
            tm = t.user_attrs.get("time") or {}
            if t.duration is not None:
                tm = {**tm, "total": t.duration.total_seconds()}
                tm["other"] = max(tm["total"] - sum(float(tm.get(k, 0.0)) for k in ("merge", "render", "score")), 0.0)
            for k in split:
                v = tm.get(k)
                if isinstance(v, int | float) and math.isfinite(v):
                    split[k] += float(v)
        states: dict[str, int] = {}
        for t in study.get_trials(deepcopy=False):
            states[t.state.name] = states.get(t.state.name, 0) + 1
        best_number = best_values = best_params = None
        try:
            if multi:
                bt = study.best_trials
                if bt:
                    best_number, best_values, best_params = bt[0].number, list(bt[0].values), dict(bt[0].params)
            else:
                b = study.best_trial
                best_number, best_values, best_params = b.number, list(b.values), dict(b.params)
        except ValueError:
            pass
        res = SearchResult(study_name, storage_desc, run_dir, n_trials, len(mine), objective.evaluations, states,
                           best_number, best_values, best_params, split, space.describe(), greedy_summary)
        log.info("finished in %.1fs", wall)
        for line in res.lines():
            log.info("%s", line)
        return res
    finally:
        if handler is not None:
            log.removeHandler(handler)
            handler.close()
