"""Trial progress bar: trials done / total, best so far, and where the time goes (merge / render / score / other).

A tqdm bar on stderr (quiet when ``enabled`` is false, e.g. in tests) plus one log line per trial, so the Hydra run
dir's log keeps the same information as the terminal.
"""

from __future__ import annotations

import logging
import math

log = logging.getLogger("astolfo_opt.search")


class TrialProgress:
    """Optuna callback: updates the bar and logs one line per finished trial."""

    def __init__(self, total: int, initial: int = 0, enabled: bool = True, directions: list[str] | None = None):
        self.total = total
        self.enabled = enabled
        self.directions = directions or ["maximize"]
        self.split = {"merge": 0.0, "render": 0.0, "score": 0.0, "other": 0.0}
        self.bar = None
        if enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=min(initial, total), desc="trials", unit="trial", dynamic_ncols=True)

    def _best(self, study) -> str:
        try:
            if len(self.directions) > 1:
                return f"pareto {len(study.best_trials)}"
            return f"best {study.best_value:.4f} (#{study.best_trial.number})"
        except ValueError:
            return "best -"

    def __call__(self, study, trial) -> None:
        t = trial.user_attrs.get("time", {}) or {}
        for k in self.split:
            v = t.get(k)
            if isinstance(v, int | float) and math.isfinite(v):
                self.split[k] += v
        tot = sum(self.split.values()) or 1.0
        share = " ".join(f"{k} {100 * v / tot:.0f}%" for k, v in self.split.items())
        best = self._best(study)
        vals = trial.values if trial.values is not None else trial.user_attrs.get("running_values")
        log.info("trial %d %s values=%s %s | %s", trial.number, trial.state.name, vals, best, share)
        if self.bar is not None:
            self.bar.set_postfix_str(f"{best} | {share}")
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
