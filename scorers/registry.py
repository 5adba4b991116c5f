"""Build scorers and objectives from Hydra-style configs (``_target_`` + keyword arguments).

A scorer config is a mapping such as::

    _target_: scorers.clip_similarity.ClipSimilarity
    model: ViT-L-14-quickgelu
    pretrained: /models/clip/ViT-L-14.pt

and an objective config (one file in ``conf/scorer/``) is::

    scorers:   {name: scorer config, ...}      # the scorers that make the objective
    holdout:   {name: scorer config, ...}      # optional: reported beside the objective, never optimised
    weights:   {name: float}                   # optional, default 1.0 each
    normalisation: {name: none | {kind: zscore, mean, std} | {kind: minmax, low, high}}
    multi: false                               # true: one objective per scorer (multi-objective search)

Built scorers are cached by their resolved config, and the CLIP towers below them by their loading arguments, so a
study that rebuilds its objective every trial still loads each model once. ``config_key`` (the dotted path of the
node, e.g. ``scorer.scorers.clip``) is passed to scorers whose constructor accepts it so that errors name the exact
key to set.
"""

from __future__ import annotations

import importlib
import inspect
import json
import threading
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from astolfo_opt.config import to_plain
from astolfo_opt.errors import ConfigError
from scorers.base import Scorer, is_missing

if TYPE_CHECKING:
    from scorers.objectives import Objective

_SCORERS: dict[str, Scorer] = {}
_LOCK = threading.RLock()


def _import_target(target: Any, key: str) -> Callable[..., Any]:
    if not isinstance(target, str) or "." not in target:
        raise ConfigError(f"{key}._target_ must be a dotted path such as scorers.clip_similarity.ClipSimilarity "
                          f"(got {target!r})")
    module_name, _, attr = target.rpartition(".")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ConfigError(f"{key}._target_={target}: cannot import {module_name} ({e})") from None
    obj = getattr(module, attr, None)
    if not callable(obj):
        raise ConfigError(f"{key}._target_={target}: {module_name} has no class or function {attr!r}")
    return obj


def _accepts(fn: Callable[..., Any], name: str) -> bool:
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    return name in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


def build_scorer(cfg: Mapping[str, Any], *, key: str = "scorer", cache: bool = True) -> Scorer:
    """Instantiate the scorer a ``_target_`` config describes; the same resolved config returns the same object."""
    plain = to_plain(cfg, key)
    if not isinstance(plain, Mapping):
        raise ConfigError(f"{key} must be a mapping with a _target_ (got {type(plain).__name__})")
    if "_target_" not in plain:
        raise ConfigError(f"{key} has no _target_; name the scorer class, e.g. _target_: scorers.clip_similarity.ClipSimilarity")
    kwargs = {k: v for k, v in plain.items() if not (isinstance(k, str) and k.startswith("_"))}
    target = _import_target(plain["_target_"], key)
    if "config_key" not in kwargs and _accepts(target, "config_key"):
        kwargs["config_key"] = key
    try:
        cache_key = json.dumps({"_target_": plain["_target_"], **kwargs}, sort_keys=True, default=str)
    except TypeError:
        cache_key = None
    with _LOCK:
        if cache and cache_key is not None and cache_key in _SCORERS:
            return _SCORERS[cache_key]
        try:
            scorer = target(**kwargs)
        except TypeError as e:
            raise ConfigError(f"{key}: bad arguments for {plain['_target_']}: {e}") from None
        for attr in ("name", "direction", "score"):
            if not hasattr(scorer, attr):
                raise ConfigError(f"{key}._target_={plain['_target_']} built an object without `{attr}`; "
                                  "it is not a scorer (see scorers.base.Scorer)")
        if cache and cache_key is not None:
            _SCORERS[cache_key] = scorer
        return scorer


def _build_named(section: Any, key: str) -> dict[str, Scorer]:
    if is_missing(section) or section == {}:
        return {}
    if not isinstance(section, Mapping):
        raise ConfigError(f"{key} must map scorer names to scorer configs")
    out: dict[str, Scorer] = {}
    for name, sub in section.items():
        if sub is None:  # a scorer switched off from the command line (`~scorer.scorers.clip` or `=null`)
            continue
        if not isinstance(sub, Mapping):
            raise ConfigError(f"{key}.{name} must be a scorer config with a _target_")
        sub = dict(sub)
        sub.setdefault("name", name)
        out[str(name)] = build_scorer(sub, key=f"{key}.{name}")
    return out


def build_objective(cfg: Mapping[str, Any], *, key: str = "scorer") -> Objective:
    """Build :class:`scorers.objectives.Objective` from an objective config (see the module docstring)."""
    from scorers.objectives import Objective

    plain = to_plain(cfg, key)
    if not isinstance(plain, Mapping) or "scorers" not in plain:
        raise ConfigError(f"{key} must have a `scorers:` mapping of named scorer configs (see conf/scorer/*.yaml)")
    known = {"scorers", "holdout", "weights", "normalisation", "multi", "name", "defaults"}
    unknown = sorted(set(plain) - known)
    if unknown:
        raise ConfigError(f"{key}: unknown keys {unknown}; allowed: {sorted(known - {'defaults'})}")
    main = _build_named(plain["scorers"], f"{key}.scorers")
    if not main:
        raise ConfigError(f"{key}.scorers is empty; configure at least one scorer")
    holdout = _build_named(plain.get("holdout"), f"{key}.holdout")
    return Objective(list(main.values()), weights=plain.get("weights"), normalisation=plain.get("normalisation"),
                     multi=bool(plain.get("multi", False)), holdout=list(holdout.values()) or None,
                     name=str(plain.get("name") or "objective"))


def clear_cache() -> None:
    """Forget built scorers, resident towers and heads (tests; or to free memory between studies)."""
    from scorers import laion_aesthetic, tower

    with _LOCK:
        _SCORERS.clear()
    tower.clear_towers()
    with laion_aesthetic._HEADS_LOCK:
        laion_aesthetic._HEADS.clear()
