"""The model pool a study searches over: which files, which base, which models are excluded and why.

The search space needs two facts per model that only the files can tell: the architecture / size (to know the
components and MBW blocks) and a content hash per merge component (models that ship a bit-identical component - the
common "finetune with the base text encoder" case - share one inclusion parameter, so averaging does not over-weight
that component). Non-finite tensors are found in the same pass, so a NaN model is named before a trial wastes time on
it. ``astolfo_opt.checkpoint.inspect`` computes the same facts when it is installed and is preferred; the small
fallback here keeps the search usable (and testable) without it.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from astolfo_opt.checkpoint.io import PICKLE_SUFFIXES, SAFETENSORS_SUFFIXES, open_checkpoint
from astolfo_opt.checkpoint.layout import MERGE_COMPONENTS, canonical_key, component_of, detect_architecture, detect_size
from astolfo_opt.checkpoint.writer import atomic_write_text
from astolfo_opt.errors import ConfigError, MissingFileError

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

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "path": self.path, "arch": self.arch, "size": self.size,
                "component_hashes": self.component_hashes, "nonfinite": self.nonfinite}


@dataclass
class Pool:
    """A resolved pool: models in a stable order (base first), the base name, what was excluded and why."""

    models: list[ModelFacts]
    base: str | None
    arch: str
    size: str | None
    variant: str | None = None
    excluded: dict[str, str] = field(default_factory=dict)

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


def _hash_component_tensors(reader, keys: Sequence[tuple[str, str]]) -> tuple[str, list[str]]:
    """Content hash over canonical key, dtype, shape and bytes (sorted by key, ``position_ids`` excluded), and the
    keys holding non-finite values."""
    h = hashlib.blake2b(digest_size=16)
    bad = []
    for canon, raw in sorted(keys):
        if canon.endswith("position_ids"):
            continue
        t = reader.get(raw)
        h.update(f"{canon}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).contiguous().view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        if t.is_floating_point() and t.numel() and not bool(torch.isfinite(t).all()):
            bad.append(canon)
    return h.hexdigest(), bad


def scan_model(path: str | Path) -> ModelFacts:
    """Read one file once: architecture, size, per-component content hashes and non-finite keys."""
    path = Path(path)
    with open_checkpoint(path) as r:
        keys = r.keys()
        arch = detect_architecture(keys)
        if arch is None:
            raise ConfigError(f"{path}: not a Stable Diffusion checkpoint (no UNet / text encoder keys); remove it from the pool")
        by_comp: dict[str, list[tuple[str, str]]] = {}
        shapes = {}
        for k in keys:
            c = canonical_key(arch, k)
            shapes[c] = r.info(k).shape
            comp = component_of(arch, c)
            if comp in MERGE_COMPONENTS:
                by_comp.setdefault(comp, []).append((c, k))
        hashes, nonfinite = {}, {}
        for comp, ks in by_comp.items():
            hashes[comp], bad = _hash_component_tensors(r, ks)
            if bad:
                nonfinite[comp] = bad
        return ModelFacts(path.stem, str(path.resolve()), arch, detect_size(arch, shapes), hashes, nonfinite)


def _facts_via_inspect(path: Path) -> ModelFacts | None:
    """Use ``astolfo_opt.checkpoint.inspect`` (cached, richer) when it is installed."""
    try:
        from astolfo_opt.checkpoint.inspect import inspect_model  # type: ignore[import-not-found]
    except ImportError:
        return None
    rep = inspect_model(path, scan=True)
    nonfinite: dict[str, list[str]] = {}
    for f in getattr(rep, "findings", []):
        if str(getattr(f, "kind", "")).lower() in ("nan", "inf", "nonfinite", "non_finite", "non-finite"):
            nonfinite.setdefault(f.component or "?", []).append(f.key or "?")
    size = rep.size if rep.size in ("full", "tiny") else None
    return ModelFacts(rep.name, str(Path(rep.path).resolve()), rep.arch, size, dict(rep.component_hashes), nonfinite)


def _cache_key(path: Path) -> str:
    st = path.stat()
    return f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}"


def load_facts(paths: Sequence[Path], cache_file: Path | None = None, use_inspect: bool = True) -> list[ModelFacts]:
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
        facts = (_facts_via_inspect(p) if use_inspect else None) or scan_model(p)
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
    facts = load_facts(kept, cache_file, use_inspect=bool(cfg.get("use_inspect", True)))
    archs = {f.arch for f in facts}
    want = cfg.get("architecture")
    if want and any(a != want for a in archs):
        odd = next(f for f in facts if f.arch != want)
        raise ConfigError(f"{odd.name} is {odd.arch}, pool.architecture is {want}: exclude it with pool.exclude=[{odd.name}]")
    if len(archs) > 1:
        raise ConfigError(f"the pool mixes architectures {sorted(archs)}; keep one (pool.exclude=[...] or pool.architecture=...)")
    arch = archs.pop()
    sizes = {f.size for f in facts}
    excluded = {x: "pool.exclude" for x in exclude}
    if cfg.get("nan_policy", "error") != "drop_model":
        for f in facts:
            if f.nonfinite:
                comp, keys = next(iter(f.nonfinite.items()))
                raise ConfigError(f"{f.name}: {comp} tensor {keys[0]} holds NaN/Inf; exclude it with pool.exclude=[{f.name}] "
                                  "or set pool.nan_policy=drop_model")
    order = sorted(facts, key=lambda f: (f.name != base_name,))  # base first, then file order
    return Pool(order, base_name, arch, sizes.pop() if len(sizes) == 1 else None, cfg.get("variant"), excluded)
