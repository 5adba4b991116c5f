"""The Optuna objective: params -> recipe -> evaluator batches -> report / prune -> values + user attrs + artifacts.

User attributes of every trial (what the dashboard and ``export`` read):

- ``recipe`` (JSON spec), ``recipe_hash`` (sha256 of it), ``constraint`` (min-models violation before repair),
  ``repaired`` (models added by the repair);
- ``tensor_hash`` and ``component_hashes`` of the merged tensors, ``out_dtype`` (export must reproduce them);
- ``scores`` (mean raw score per scorer), ``per_prompt`` (rows: prompt, seed, raw scores, values),
  ``objective_names``, ``scorer_names``, ``prompt_set_hash``;
- ``time`` (seconds: merge, render, score, other, total), ``merge`` (changed components, bytes read);
- ``worker`` (host, pid, process start) and ``heartbeat`` (unix time, refreshed every batch) so a resumed run can
  tell a dead worker's RUNNING trial and mark it FAIL (see ``study.fail_dead_trials``);
- ``scored_with``: ``automatic`` or the calibration (``objective.calibration``) the value was computed with;
- ``cached_from`` when the same recipe was already evaluated: its values are reused instead of re-rendering.

A pruned trial keeps its partial ``scores`` / ``per_prompt`` and ``running_values``.
"""

from __future__ import annotations

import json
import os
import socket
import time
from typing import Any

import optuna
from optuna.trial import TrialState

from astolfo_opt.search.evaluator import Evaluator, TrialContext
from astolfo_opt.search.space import SearchSpace

MAX_PROMPT_ROWS = 256
COUNTED_STATES = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING, TrialState.WAITING)


class SurplusTrial(Exception):
    """Raised when concurrent workers together started more than ``n_trials``: the extra trial ends FAIL (not counted)
    before evaluating anything, so the study holds exactly ``n_trials`` counted trials."""


def worker_identity() -> dict[str, Any]:
    import psutil

    pid = os.getpid()
    return {"host": socket.gethostname(), "pid": pid, "started": round(psutil.Process(pid).create_time(), 2)}


def _means(rows: list[dict[str, Any]]) -> dict[str, float]:
    acc: dict[str, list[float]] = {}
    for r in rows:
        for k, v in r["scores"].items():
            acc.setdefault(k, []).append(float(v))
    return {k: sum(v) / len(v) for k, v in acc.items() if v}


class TrialObjective:
    """Callable objective for ``study.optimize``."""

    def __init__(self, space: SearchSpace, evaluator: Evaluator, *, pruning: bool = True, artifacts=None,
                 n_trials: int | None = None, reuse_duplicates: bool = True, title: str = ""):
        self.space = space
        self.evaluator = evaluator
        self.multi = len(evaluator.directions) > 1
        self.pruning = pruning and not self.multi  # Optuna cannot prune multi-objective trials
        self.artifacts = artifacts
        self.n_trials = n_trials
        self.reuse_duplicates = reuse_duplicates
        self.title = title
        self.identity = worker_identity()
        self.evaluations = 0  # evaluator runs by this objective (cached duplicates not counted)
        self.numbers: list[int] = []  # trials this objective ran (surplus ones excluded)

    def _check_surplus(self, trial: optuna.Trial) -> None:
        if self.n_trials is None:
            return
        ahead = [t for t in trial.study.get_trials(deepcopy=False, states=COUNTED_STATES) if t.number < trial.number]
        if len(ahead) >= self.n_trials:
            trial.set_user_attr("surplus", True)
            raise SurplusTrial(f"trial {trial.number}: n_trials={self.n_trials} already reached by other workers")

    def _duplicate_of(self, trial: optuna.Trial, h: str):
        for t in trial.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
            if t.user_attrs.get("recipe_hash") == h and t.values is not None and "cached_from" not in t.user_attrs:
                return t
        return None

    def __call__(self, trial: optuna.Trial) -> float | list[float]:
        t_start = time.perf_counter()
        self._check_surplus(trial)
        self.numbers.append(trial.number)
        trial.set_user_attr("worker", self.identity)
        trial.set_user_attr("scored_with", self.evaluator.scored_with)
        trial.set_user_attr("heartbeat", time.time())
        cand = self.space.suggest(trial)
        h = cand.hash
        trial.set_user_attr("recipe", json.dumps(cand.spec, sort_keys=True))
        trial.set_user_attr("recipe_hash", h)
        trial.set_user_attr("constraint", float(cand.violation))
        if cand.repaired:
            trial.set_user_attr("repaired", cand.repaired)
        if self.reuse_duplicates and (dup := self._duplicate_of(trial, h)) is not None:
            for k in ("tensor_hash", "component_hashes", "fingerprints", "scores", "objective_names", "scorer_names",
                      "prompt_set_hash", "out_dtype", "holdout"):
                if k in dup.user_attrs:
                    trial.set_user_attr(k, dup.user_attrs[k])
            trial.set_user_attr("cached_from", dup.number)
            trial.set_user_attr("time", {"merge": 0.0, "render": 0.0, "score": 0.0,
                                         "other": time.perf_counter() - t_start, "total": time.perf_counter() - t_start})
            return dup.values if self.multi else dup.values[0]
        ctx = TrialContext(number=trial.number)
        rows: list[dict[str, Any]] = []
        images: list[Any] = []
        labels: list[str] = []
        values: list[float] = []
        self.evaluations += 1
        ev = self.evaluator

        def finish(state: str) -> None:
            if self.artifacts is not None:
                shown = values[0] if values else float("nan")
                self.artifacts.upload(trial, cand.spec, images, labels,
                                      f"{self.title} trial {trial.number} {state} {ev.names[0]}={shown:.4f}")
            total = time.perf_counter() - t_start
            tm = dict(ctx.timings)
            tm["other"] = max(total - sum(tm.values()), 0.0)
            tm["total"] = total
            trial.set_user_attr("time", {k: round(v, 4) for k, v in tm.items()})
            trial.set_user_attr("scores", _means(rows))
            trial.set_user_attr("per_prompt", rows[:MAX_PROMPT_ROWS])
            trial.set_user_attr("running_values", values)
            trial.set_user_attr("objective_names", list(ev.names))
            trial.set_user_attr("scorer_names", list(ev.scorer_names))
            trial.set_user_attr("prompt_set_hash", ev.prompt_set_hash)
            trial.set_user_attr("out_dtype", ev.out_dtype)
            if ctx.component_hashes:
                trial.set_user_attr("component_hashes", ctx.component_hashes)
                trial.set_user_attr("tensor_hash", ctx.tensor_hash)
            if ctx.fingerprints:
                trial.set_user_attr("fingerprints", ctx.fingerprints)
            if ctx.merge_info:
                trial.set_user_attr("merge", ctx.merge_info)
            if ctx.extras.get("holdout"):
                trial.set_user_attr("holdout", ctx.extras["holdout"])  # reported, never optimised
        for batch in ev.evaluate(cand, ctx):
            rows += batch.rows
            images += batch.images
            labels += batch.labels
            values = list(batch.values)
            trial.set_user_attr("heartbeat", time.time())
            if self.pruning:
                trial.report(values[0], batch.step)
                if trial.should_prune():
                    finish("pruned")
                    raise optuna.TrialPruned(f"pruned at step {batch.step} with {values[0]:.4f}")
        if not values:
            raise RuntimeError("the evaluator produced no batch (empty prompt set?)")
        finish("complete")
        return values if self.multi else values[0]
