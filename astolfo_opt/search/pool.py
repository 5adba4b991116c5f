"""The model pool a study searches over: which files, which base, which models are excluded and why.

The search space needs two facts per model that only the files can tell: the architecture / size (to know the
components and MBW blocks) and a content hash per merge component (models that ship a bit-identical component - the
common "finetune with the base text encoder" case - share one inclusion parameter, so averaging does not over-weight
that component). Non-finite tensors are found in the same pass, so a NaN model is named before a trial wastes time on
it. ``astolfo_opt.checkpoint.inspect`` computes these facts; this module only caches and applies them.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from astolfo_opt.checkpoint.io import PICKLE_SUFFIXES, SAFETENSORS_SUFFIXES
from astolfo_opt.checkpoint.prediction import pool_prediction
from astolfo_opt.checkpoint.spec import SIZES
from astolfo_opt.checkpoint.writer import atomic_write_text
from astolfo_opt.errors import ConfigError, MissingFileError

log = logging.getLogger(__name__)

MODEL_SUFFIXES = SAFETENSORS_SUFFIXES + PICKLE_SUFFIXES


@dataclass
class ModelFacts:
    """What the search needs to know about one model file."""

    name: str
    path: str
    arch: str
    size: str | None
    component_hashes: dict[str, str]
    #: component -> keys holding NaN / Inf
    nonfinite: dict[str, list[str]] = field(default_factory=dict)
    #: what the model is used as: stated by markers / ModelSpec, else the architecture's default (None: SD2 unstated)
    prediction_type: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "path": self.path, "arch": self.arch, "size": self.size,
                "component_hashes": self.component_hashes, "nonfinite": self.nonfinite, "prediction_type": self.prediction_type}


@dataclass
class Pool:
    """A resolved pool: models in a stable order (base first), the base name, what was excluded and why."""

    models: list[ModelFacts]
    base: str | None
    arch: str
    size: str | None
    variant: str | None = None
    excluded: dict[str, str] = field(default_factory=dict)
    #: the pool's one prediction type (None: unknown, or a mix allowed by pool.allow_mixed_prediction)
    prediction: str | None = None
    allow_mixed_prediction: bool = False

    @property
    def names(self) -> list[str]:
        return [m.name for m in self.models]

    @property
    def paths(self) -> dict[str, str]:
        return {m.name: m.path for m in self.models}

    def model(self, name: str) -> ModelFacts:
        for m in self.models:
            if m.name == name:
                return m
        raise KeyError(name)

    def identical_groups(self, component: str) -> list[list[str]]:
        """Models grouped by identical ``component`` content, in pool order (a model lacking it is left out)."""
        groups: dict[str, list[str]] = {}
        for m in self.models:
            h = m.component_hashes.get(component)
            if h is not None:
                groups.setdefault(h, []).append(m.name)
        return list(groups.values())


def scan_model(path: Path) -> ModelFacts:
    """The facts of one file, from :func:`astolfo_opt.checkpoint.inspect.inspect_model` (the one scanner: structure,
    hashes and NaN / Inf in one streaming pass). A file that cannot be merged with its layout (wrong shapes) is
    refused here, before the first trial, with the file and key named."""
    from astolfo_opt.checkpoint.inspect import inspect_model

    rep = inspect_model(path, scan=True, cache=False)  # the pool keeps its own (path, size, mtime) cache
    rep.raise_for_errors()
    size = rep.size if rep.size in SIZES else None
    return ModelFacts(rep.name, str(Path(rep.path).resolve()), rep.arch, size, dict(rep.component_hashes), rep.nonfinite_keys(),
                      rep.effective_prediction)


def _cache_key(path: Path) -> str:
    st = path.stat()
    return f"v2|{path.resolve()}|{st.st_size}|{st.st_mtime_ns}"  # v2: facts carry the prediction type


def load_facts(paths: Sequence[Path], cache_file: Path | None = None) -> list[ModelFacts]:
    """Facts of every file, cached by (path, size, mtime) in ``cache_file`` so a resumed study does not rehash."""
    cache: dict[str, Any] = {}
    if cache_file is not None and cache_file.is_file():
        try:
            cache = json.loads(cache_file.read_text())
        except (OSError, ValueError):
            cache = {}
    out, dirty = [], False
    for p in paths:
        key = _cache_key(p)
        if key in cache:
            out.append(ModelFacts(**cache[key]))
            continue
        facts = scan_model(p)
        cache[key] = facts.to_json()
        dirty = True
        out.append(facts)
    if dirty and cache_file is not None:
        atomic_write_text(cache_file, json.dumps(cache, indent=1))
    return out


def expand_paths(folder: str | os.PathLike | None, files: Sequence[str | os.PathLike] | None) -> list[Path]:
    """Model files of a folder (sorted) plus listed files, deduplicated, in that order."""
    out: list[Path] = []
    if folder:
        d = Path(folder).expanduser()
        if not d.is_dir():
            raise MissingFileError(d, "pool.folder", "pool folder")
        out += sorted(p for p in d.iterdir() if p.is_file() and p.suffix in MODEL_SUFFIXES and not p.name.startswith("."))
    for f in files or []:
        p = Path(f).expanduser()
        if not p.is_file():
            raise MissingFileError(p, "pool.files", "model file")
        out.append(p)
    seen, uniq = set(), []
    for p in out:
        r = p.resolve()
        if r not in seen:
            seen.add(r)
            uniq.append(p)
    return uniq


def resolve_pool(cfg: Mapping[str, Any], cache_file: Path | None = None) -> Pool:
    """Turn the ``pool`` config group into a :class:`Pool`.

    ``base`` may be a path or a model name of the pool; a base outside the folder is added. Excluded names leave
    the pool with a reason; a model with NaN / Inf values that is not excluded stops the run with the exact
    override that excludes it, unless ``nan_policy`` is ``drop_model`` (the kernel then skips it key by key).
    """
    paths = expand_paths(cfg.get("folder"), cfg.get("files"))
    base_cfg = cfg.get("base")
    base_name: str | None = None
    if base_cfg:
        bp = Path(str(base_cfg)).expanduser()
        if bp.suffix in MODEL_SUFFIXES:
            if not bp.is_file():
                raise MissingFileError(bp, "pool.base", "base model")
            if bp.resolve() not in {p.resolve() for p in paths}:
                paths.insert(0, bp)
            base_name = bp.stem
        else:
            base_name = str(base_cfg)
    if not paths:
        raise ConfigError("the pool is empty: set pool.folder=DIR or pool.files=[a.safetensors,b.safetensors]")
    names = [p.stem for p in paths]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ConfigError(f"two pool files share the name {dupes[0]!r}; model names are file stems - rename one")
    if base_name is not None and base_name not in names:
        raise ConfigError(f"pool.base={base_name!r} is not a model of the pool ({', '.join(names)}); give a name or a path")
    exclude = [str(x) for x in (cfg.get("exclude") or [])]
    unknown = [x for x in exclude if x not in names]
    if unknown:
        raise ConfigError(f"pool.exclude names unknown model {unknown[0]!r} (pool: {', '.join(names)})")
    if base_name in exclude:
        raise ConfigError(f"pool.exclude removes the base {base_name!r}; choose another pool.base")
    kept = [p for p in paths if p.stem not in exclude]
    facts = load_facts(kept, cache_file)
    archs = {f.arch for f in facts}
    want = cfg.get("architecture")
    if want and any(a != want for a in archs):
        odd = next(f for f in facts if f.arch != want)
        raise ConfigError(f"{odd.name} is {odd.arch}, pool.architecture is {want}: exclude it with pool.exclude=[{odd.name}]")
    if len(archs) > 1:
        by_arch: dict[str, list[str]] = {}
        for f in facts:
            by_arch.setdefault(f.arch, []).append(f.name)
        odd = sorted(by_arch.values(), key=len)[0]  # the minority is what to drop
        listing = "; ".join(f"{a}: {', '.join(n)}" for a, n in sorted(by_arch.items()))
        raise ConfigError(f"the pool mixes architectures ({listing}); keep one, e.g. pool.exclude=[{','.join(odd)}]")
    arch = archs.pop()
    sizes = {f.size for f in facts}
    excluded = {x: "pool.exclude" for x in exclude}
    if cfg.get("nan_policy", "error") != "drop_model":
        for f in facts:
            if f.nonfinite:
                comp, keys = next(iter(f.nonfinite.items()))
                raise ConfigError(f"{f.name}: {comp} tensor {keys[0]} holds NaN/Inf; exclude it with pool.exclude=[{f.name}] "
                                  "or set pool.nan_policy=drop_model")
    allow_mixed = bool(cfg.get("allow_mixed_prediction", False))
    try:
        prediction = pool_prediction({f.name: f.prediction_type for f in facts}, "pool.allow_mixed_prediction=true")
    except ConfigError as e:
        if not allow_mixed:
            raise
        log.warning("%s (searching anyway: pool.allow_mixed_prediction=true)", e)
        prediction = None
    order = sorted(facts, key=lambda f: (f.name != base_name,))  # base first, then file order
    return Pool(order, base_name, arch, sizes.pop() if len(sizes) == 1 else None, cfg.get("variant"), excluded,
                prediction, allow_mixed)
