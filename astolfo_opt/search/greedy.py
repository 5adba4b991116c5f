"""Greedy component-wise forward selection: the seeds' manual procedure, automated, as the baseline to beat.

Start from the uniform average (every model in). Then, component by component, try toggling each model's inclusion
(one evaluation each), keep the best toggle if it beats the incumbent, and sweep again until a full pass brings no
improvement or the evaluation budget (``n_trials``) is spent. Every evaluation is an ordinary trial of the same study
(params enqueued, same objective, same storage), so greedy and Optuna samplers are compared trial for trial in the
dashboard. Only the inclusion parameters are toggled; MBW / weight parameters stay at their uniform values.
Single worker, single objective (the first objective is used when several are configured).
"""

from __future__ import annotations

import logging
from typing import Any

import optuna
from optuna.trial import TrialState

from astolfo_opt.errors import ConfigError
from astolfo_opt.search.space import SearchSpace

log = logging.getLogger("astolfo_opt.search")


def _evaluate(study: optuna.Study, objective, params: dict[str, Any], callbacks) -> float | None:
    study.enqueue_trial(params, user_attrs={"strategy": "greedy"})
    study.optimize(objective, n_trials=1, callbacks=list(callbacks), show_progress_bar=False)
    t = study.trials[-1]
    if t.state == TrialState.COMPLETE and t.values:
        return float(t.values[0])
    return None  # pruned / failed: never better than the incumbent


def run_greedy(study: optuna.Study, space: SearchSpace, objective, n_trials: int, callbacks=()) -> dict[str, Any]:
    """Run greedy selection within a total of ``n_trials`` trials in ``study``; returns a summary dict."""
    toggles = [p for p in space.names if p.startswith("inc.")]
    if not toggles:
        raise ConfigError("strategy=greedy toggles model inclusion: use space=inclusion or space=inclusion_mbw")
    sign = 1.0 if study.directions[0] == optuna.study.StudyDirection.MAXIMIZE else -1.0
    done = len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)))
    budget = n_trials - done
    incumbent = space.uniform_params()
    evals = 0
    best = None
    if budget > 0:
        best = _evaluate(study, objective, incumbent, callbacks)
        evals += 1
    history = [(dict(incumbent), best)]
    improved = True
    while improved and evals < budget:
        improved = False
        for comp in space.components:
            names = [p for p in toggles if p.startswith(f"inc.{comp}.")]
            cand_best, cand_params = None, None
            for name in names:
                if evals >= budget:
                    break
                trial_params = dict(incumbent)
                trial_params[name] = 1 - int(trial_params[name])
                v = _evaluate(study, objective, trial_params, callbacks)
                evals += 1
                if v is not None and (cand_best is None or sign * v > sign * cand_best):
                    cand_best, cand_params = v, trial_params
            if cand_best is not None and (best is None or sign * cand_best > sign * best):
                best, incumbent, improved = cand_best, cand_params, True
                history.append((dict(incumbent), best))
                log.info("greedy: %s improved to %.4f", comp, best)
    return {"evaluations": evals, "best_value": best, "best_params": incumbent, "history": history}
