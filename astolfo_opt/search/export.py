"""Export a trial as a ``.safetensors`` checkpoint, re-merged with the streaming writer, and prove it is the same merge.

The recipe stored with the trial (user attr ``recipe``) is merged again by the kernel straight into
``SafetensorsSink`` (temp file + rename), tee'd into a :class:`HashingSink`. The per-component hashes must equal the
ones recorded while the trial was rendered and scored (``component_hashes``); otherwise the pool files changed since
the study (or the merge ran on another device kind / dtype) and the export is refused (``verify=False`` skips the
check). Metadata: the recipe, study, trial number, params, values, per-scorer scores, scorer names and the prompt-set
hash, beside what the merge sink adds itself (A1111 ``sd_merge_*`` keys).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState

from astolfo_opt.checkpoint.writer import clean_stale_partials, partial_path
from astolfo_opt.errors import AstolfoError, ConfigError

DTYPES = {"fp16": "float16", "fp32": "float32", "bf16": "bfloat16"}


@dataclass
class ExportResult:
    path: Path
    study: str
    trial: int
    values: list[float] | None
    component_hashes: dict[str, str]
    #: None (not checked), "identical" (same bytes) or "equal up to incremental-merge rounding in ..."
    verified: str | None
    metadata: dict[str, str]


def select_trial(study: optuna.Study, which: str | int = "best") -> optuna.trial.FrozenTrial:
    """``best`` (single objective: best value; multi-objective: the first Pareto trial) or a trial number."""
    if str(which) == "best":
        try:
            if len(study.directions) > 1:
                best = sorted(study.best_trials, key=lambda t: t.number)
                if not best:
                    raise ValueError
                return best[0]
            return study.best_trial
        except ValueError:
            raise ConfigError(f"study {study.study_name!r} has no completed trial yet (run the search first)") from None
    try:
        n = int(which)
    except ValueError:
        raise ConfigError(f"--trial {which!r}: give best or a trial number") from None
    trials = {t.number: t for t in study.get_trials(deepcopy=False)}
    if n not in trials:
        raise ConfigError(f"study {study.study_name!r} has no trial {n} (trials 0..{max(trials, default=-1)})")
    t = trials[n]
    if "recipe" not in t.user_attrs:
        raise ConfigError(f"trial {n} has no recorded recipe (state {t.state.name}); pick a completed trial")
    return t


def trial_metadata(study: optuna.Study, t: optuna.trial.FrozenTrial) -> dict[str, str]:
    ua = t.user_attrs
    meta = {
        "astolfo_opt_study": study.study_name,
        "astolfo_opt_trial": str(t.number),
        "astolfo_opt_state": t.state.name,
        "astolfo_opt_params": json.dumps(t.params, sort_keys=True),
        "astolfo_opt_values": json.dumps(t.values if t.values is not None else ua.get("running_values")),
        "astolfo_opt_objectives": json.dumps(ua.get("objective_names")),
        "astolfo_opt_scores": json.dumps(ua.get("scores", {}), sort_keys=True),
        "astolfo_opt_scorers": json.dumps(ua.get("scorer_names", [])),
        "astolfo_opt_prompt_set_hash": str(ua.get("prompt_set_hash")),
        "astolfo_opt_recipe_hash": str(ua.get("recipe_hash")),
        "astolfo_opt_tensor_hash": str(ua.get("tensor_hash")),
    }
    if ua.get("holdout"):
        meta["astolfo_opt_holdout"] = json.dumps(ua["holdout"], sort_keys=True)
    return meta


def export_trial(storage: Any, study_name: str, out: str | Path, *, trial: str | int = "best", device: str = "auto",
                 verify: bool = True) -> ExportResult:
    """Re-merge a trial's recipe into ``out`` (streaming, atomic) and check the tensor hashes against the trial's."""
    import torch

    from astolfo_opt.merge.kernel import merge
    from astolfo_opt.merge.sinks import SafetensorsSink, merge_metadata
    from astolfo_opt.search.evaluator import HashingSink, TeeSink, fingerprints_close
    from astolfo_opt.search.space import spec_to_recipe

    try:
        study = optuna.load_study(study_name=study_name, storage=storage)
    except KeyError:
        names = [s.study_name for s in optuna.get_all_study_summaries(storage)]
        raise ConfigError(f"no study {study_name!r} in this storage (studies: {', '.join(names) or 'none'})") from None
    t = select_trial(study, trial)
    if t.state not in (TrialState.COMPLETE, TrialState.PRUNED):
        raise ConfigError(f"trial {t.number} is {t.state.name}; export a COMPLETE (or PRUNED) trial")
    spec = json.loads(t.user_attrs["recipe"])
    for name, p in spec["models"].items():
        if not Path(p).is_file():
            raise ConfigError(f"model {name} of trial {t.number} is gone: {p} (restore the pool file to export)")
    recipe = spec_to_recipe(spec)
    out = Path(out)
    meta = trial_metadata(study, t)
    dtype = getattr(torch, DTYPES[str(t.user_attrs.get("out_dtype", "fp16"))])
    hasher = HashingSink(spec["arch"])
    out.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_partials(out.parent)
    # Written complete under a hidden staging name, checked, and only then renamed onto ``out``: a failed check (or a
    # kill) never replaces an earlier export at that name.
    staging = partial_path(out)
    try:
        sink = SafetensorsSink(staging, merge_metadata(recipe, meta, title=f"{study_name} trial {t.number}"))
        merge(recipe, TeeSink(sink, hasher), device=device, out_dtype=dtype)
        recorded = t.user_attrs.get("component_hashes") or {}
        prints = t.user_attrs.get("fingerprints") or {}
        verified: str | None = None
        stand_in = not (study.user_attrs.get("objective") or {}).get("hashes_tensors", True)  # hashes of recipes, not tensors
        if verify and recorded and not stand_in:
            differ = [c for c, h in recorded.items() if hasher.hashes.get(c) != h]
            bad = [c for c in differ if not (c in prints and fingerprints_close(prints[c], hasher.fingerprints.get(c, {})))]
            if bad:
                raise AstolfoError(f"export of trial {t.number}: merged {', '.join(bad)} differ from what the trial scored "
                                   "(pool files changed, or another device/dtype); no file written (--no-verify to export anyway)")
            verified = "identical" if not differ else f"equal up to incremental-merge rounding in {', '.join(differ)}"
        os.replace(staging, out)
    finally:
        staging.unlink(missing_ok=True)
    return ExportResult(out, study_name, t.number, list(t.values) if t.values else None, dict(hasher.hashes), verified, meta)
