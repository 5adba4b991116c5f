"""One streaming pass over a pool that yields, per merge component, the Gram matrix of the models' deltas.

Why a Gram matrix: every pairwise quantity we report (L2 distance, cosine of deltas, distance to the base, norms)
is a function of ``G = D·Dᵀ`` where ``D`` stacks the models' flattened deltas. ``G`` is ``n x n``, so it can be
accumulated key by key and chunk by chunk while only one key's tensors (one chunk of them) are in memory, and a
50-model pool is read exactly once. Without a base the deltas are taken from a per-chunk reference (the mean of the
healthy models); distances do not depend on the reference, and the Gram matrix about the pool's mean is recovered
exactly afterwards by double centering over the models that turned out usable (``centre_gram``), so a model found to
hold NaN half-way through the pass can still be dropped without a second pass.

Products are accumulated in float64: near-duplicate detection needs ``G_aa + G_bb - 2 G_ab`` to resolve differences a
thousand times smaller than the pool's typical distance, which fp32 sums over millions of elements cannot.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from astolfo_opt.checkpoint.io import CheckpointReader, open_checkpoint
from astolfo_opt.checkpoint.layout import MERGE_COMPONENTS, Layout, canonical_key, detect_architecture, detect_size, get_layout
from astolfo_opt.checkpoint.writer import atomic_write_text
from astolfo_opt.errors import AstolfoError, CheckpointError

#: bump when the cached statistics change meaning
CACHE_VERSION = 1
CACHE_FILE = "analysis.json"
#: cache entries kept (oldest dropped first) so the file stays small on machines that inspect many pools
CACHE_MAX_ENTRIES = 128
#: bytes of fp64 working memory per chunk (all models together); bounds peak memory for huge tensors
CHUNK_BUDGET_BYTES = 256 * 1024 * 1024


def cache_dir() -> Path:
    """Folder shared with the inspect cache: ``$ASTOLFO_OPT_CACHE`` or ``~/.cache/astolfo-opt``."""
    env = os.environ.get("ASTOLFO_OPT_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "astolfo-opt"


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``auto`` -> CUDA when present, else CPU; anything else is passed to torch (bad names -> one-line error)."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise AstolfoError(f"unknown device {device!r} ({e}); use auto, cpu or cuda") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise AstolfoError(f"device {device!r} requested but CUDA is not available (use device=auto or cpu)")
    return dev


@dataclass
class ComponentStats:
    """Raw result of the pass for one component: everything later analysis needs, nothing derived.

    ``gram`` and ``sumsq`` cover all pool members (rows of excluded members are meaningless); ``reference`` says
    whether deltas are from the base (``"base"``) or from per-chunk references to be centred (``"pool mean"``).
    """

    component: str
    names: list[str]
    gram: np.ndarray  # [n, n] float64, deltas about the reference
    sumsq: np.ndarray  # [n] float64, squared L2 norm of each model's weights over the used keys
    base_sumsq: float | None  # squared norm of the base's weights over the used keys
    reference: str  # "base" | "pool mean"
    keys_used: int = 0
    numel: int = 0
    skipped: dict[str, list[str]] = field(default_factory=dict)  # reason -> keys
    excluded: dict[str, str] = field(default_factory=dict)  # model name -> why it is left out of this component
    dtypes: dict[str, str] = field(default_factory=dict)  # model name -> dtype(s) its component is stored in
    # group label -> [n, n] float64 Gram over that group's keys (only when the pass was given ``group_of``; the
    # groups partition the used keys, so their sum is ``gram``): the search surrogate's per-MBW-block matrices
    group_grams: dict[str, np.ndarray] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"component": self.component, "names": self.names, "gram": self.gram.tolist(), "sumsq": self.sumsq.tolist(),
                "base_sumsq": self.base_sumsq, "reference": self.reference, "keys_used": self.keys_used, "numel": self.numel,
                "skipped": self.skipped, "excluded": self.excluded, "dtypes": self.dtypes,
                "group_grams": {k: v.tolist() for k, v in self.group_grams.items()}}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> ComponentStats:
        return cls(component=d["component"], names=list(d["names"]), gram=np.asarray(d["gram"], dtype=np.float64).reshape(
            len(d["names"]), len(d["names"])), sumsq=np.asarray(d["sumsq"], dtype=np.float64), base_sumsq=d["base_sumsq"],
            reference=d["reference"], keys_used=int(d["keys_used"]), numel=int(d["numel"]),
            skipped={k: list(v) for k, v in d["skipped"].items()}, excluded=dict(d["excluded"]), dtypes=dict(d["dtypes"]),
            group_grams={k: np.asarray(v, dtype=np.float64).reshape(len(d["names"]), len(d["names"]))
                         for k, v in d.get("group_grams", {}).items()})

    @property
    def usable(self) -> list[int]:
        """Indices of members that enter this component's matrices."""
        return [i for i, n in enumerate(self.names) if n not in self.excluded]

    def skipped_count(self) -> int:
        return sum(len(v) for v in self.skipped.values())


def centre_gram(gram: np.ndarray) -> np.ndarray:
    """Gram matrix about the members' own mean: ``C G C`` with ``C = I - 11ᵀ/n`` (exact for any common reference)."""
    n = gram.shape[0]
    c = np.eye(n) - np.full((n, n), 1.0 / n)
    return c @ gram @ c


def distances_from_gram(gram: np.ndarray) -> np.ndarray:
    """``‖a-b‖ = sqrt(G_aa + G_bb - 2 G_ab)``, clipped at 0 (rounding), exact zeros on the diagonal."""
    d = np.diag(gram)
    sq = d[:, None] + d[None, :] - 2.0 * gram
    np.fill_diagonal(sq, 0.0)
    out = np.sqrt(np.clip(sq, 0.0, None))
    return (out + out.T) / 2.0


def cosines_from_gram(gram: np.ndarray) -> np.ndarray:
    """Cosine similarity of deltas; NaN where a delta is zero (e.g. the base against itself)."""
    norms = np.sqrt(np.clip(np.diag(gram), 0.0, None))
    denom = norms[:, None] * norms[None, :]
    with np.errstate(divide="ignore", invalid="ignore"):
        cos = np.where(denom > 0, gram / np.where(denom > 0, denom, 1.0), np.nan)
    return np.clip(cos, -1.0, 1.0)


# --------------------------------------------------------------------------------------------------- pool opening


def model_names(paths: Sequence[Path]) -> list[str]:
    """File stems; colliding stems get their folder name in front so every model keeps a distinct label."""
    stems = [p.stem for p in paths]
    return [f"{p.parent.name}/{p.stem}" if stems.count(p.stem) > 1 else p.stem for p in paths]


@dataclass
class OpenedModel:
    """One pool file opened for a streaming pass: its lazy reader and canonical -> raw key map (shared by the
    distance maps here and the search's weight-space surrogate, which both stream the same Gram products)."""

    path: Path
    name: str
    reader: CheckpointReader
    keymap: dict[str, str]  # canonical -> raw


def _open(path: Path, name: str) -> tuple[OpenedModel, str, str]:
    reader = open_checkpoint(path)
    raw = reader.keys()
    arch = detect_architecture(raw)
    if arch is None:
        reader.close()
        raise CheckpointError(path, "not a Stable Diffusion checkpoint (no UNet / text encoder keys found)")
    keymap = {canonical_key(arch, k): k for k in raw}
    shapes = {k: reader.info(r).shape for k, r in keymap.items()}
    size = detect_size(arch, shapes)
    if size is None:
        reader.close()
        raise CheckpointError(path, f"{arch} checkpoint with unrecognised tensor shapes (UNet time embedding missing or odd)",
                              "only full-size (or factory tiny) SD1/SD2/SDXL files can be analysed")
    return OpenedModel(path, name, reader, keymap), arch, size


def open_pool(paths: Sequence[Path], base: Path | None) -> tuple[list[OpenedModel], OpenedModel | None, Layout]:
    """Open every file lazily (headers only) and check they share one architecture and size."""
    if not paths:
        raise AstolfoError("the pool is empty: give at least two model files")
    names = model_names(paths)
    opened, kinds = [], {}
    try:
        for p, n in zip(paths, names, strict=True):
            o, arch, size = _open(Path(p), n)
            opened.append(o)
            kinds.setdefault((arch, size), []).append(n)
        base_o = None
        if base is not None:
            base_o, arch, size = _open(Path(base), "base:" + Path(base).stem)
            kinds.setdefault((arch, size), []).append(f"{Path(base).name} (base)")
    except Exception:
        for o in opened:
            o.reader.close()
        raise
    if len(kinds) > 1:
        for o in opened + ([base_o] if base_o else []):
            o.reader.close()
        desc = "; ".join(f"{a}/{s}: {', '.join(ns[:4])}{'...' if len(ns) > 4 else ''}" for (a, s), ns in kinds.items())
        raise AstolfoError(f"the pool mixes architectures ({desc}); analyse one architecture at a time")
    (arch, size), = kinds
    return opened, base_o, get_layout(arch, size)


# --------------------------------------------------------------------------------------------------- the pass


def plan_component(comp: str, layout: Layout, models: list[OpenedModel], base: OpenedModel | None
                    ) -> tuple[list[str], dict[str, list[str]], dict[str, str], OpenedModel | None]:
    """Which canonical keys of ``comp`` every usable model (and the base) holds with matching sizes.

    A member holding none of the component's keys (a pruned file without VAE, say) is excluded from the component
    instead of shrinking it to nothing for everyone; partly pruned members make the missing keys skipped for all.
    """
    keys = [k for k in layout.keys_of(comp) if layout.entries[k].dtype == "float"]
    excluded = {m.name: "component absent from the file" for m in models if not any(k in m.keymap for k in keys)}
    present = [m for m in models if m.name not in excluded]
    if base is not None and not any(k in base.keymap for k in keys):
        base = None  # the caller falls back to the pool mean for this component
    holders = present + ([base] if base is not None else [])
    used, skipped = [], {}
    for k in keys:
        have = [m for m in holders if k in m.keymap]
        if not have:
            continue  # optional key nobody carries: not a pruning artefact
        if len(have) < len(holders):
            who = "base" if base is not None and base not in have else "some models"
            skipped.setdefault(f"missing in {who}", []).append(k)
            continue
        numels = {int(np.prod(m.reader.info(m.keymap[k]).shape, dtype=np.int64)) for m in have}
        if len(numels) > 1:
            skipped.setdefault("size differs between models", []).append(k)
            continue
        if not m_is_float(have, k):
            skipped.setdefault("not a float tensor", []).append(k)
            continue
        used.append(k)
    return used, skipped, excluded, base


def m_is_float(members: list[OpenedModel], key: str) -> bool:
    return all(m.reader.info(m.keymap[key]).dtype.is_floating_point for m in members)


def flat_tensor(m: OpenedModel, key: str) -> torch.Tensor:
    """One tensor of ``m`` by canonical key, flattened (its own dtype: callers cast per chunk)."""
    return m.reader.get(m.keymap[key]).reshape(-1)


def chunk_products(x: torch.Tensor, ref: torch.Tensor | None, alive: list[bool]
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[int]]:
    """``(D·Dᵀ, D·ref, ref·ref, newly dead rows)`` for one chunk ``x`` [n, m] (fp64), ``D = x - ref`` on live rows.

    The common case (every value finite) costs one subtraction and one matmul: non-finite values are detected from
    the Gram diagonal (a NaN/Inf row makes its own square non-finite) and only then located row by row.
    """
    dead: list[int] = []
    while True:
        live = [a and i not in dead for i, a in enumerate(alive)]
        if all(live):
            r = x.mean(0) if ref is None else ref
            d = x - r
        else:
            idx = torch.tensor([i for i, a in enumerate(live) if a], device=x.device, dtype=torch.long)
            r = (x.index_select(0, idx).mean(0) if idx.numel() else torch.zeros_like(x[0])) if ref is None else ref
            d = (x - r).index_fill_(0, torch.tensor([i for i, a in enumerate(live) if not a], device=x.device), 0.0)
        g = d @ d.T
        if bool(torch.isfinite(g.diagonal()).all()):
            return g, d @ r, r @ r, dead
        finite = torch.isfinite(x).all(dim=1).tolist()
        dead += [i for i, (a, f) in enumerate(zip(live, finite, strict=True)) if a and not f]


def accumulate(models: list[OpenedModel], base: OpenedModel | None, layout: Layout, components: Sequence[str], device: torch.device,
               progress: bool = True, group_of: Callable[[str], str] | None = None) -> dict[str, ComponentStats]:
    """The streaming pass: for each component and key (layout order) read that tensor from every member once.

    ``group_of`` (canonical key -> label, e.g. its MBW block) also keeps one Gram per label in
    :attr:`ComponentStats.group_grams`: the search surrogate needs the pool's geometry block by block, and one pass
    serves both (per-key Grams are formed anyway; adding them to a second matrix is free).
    """
    from tqdm.auto import tqdm

    n = len(models)
    plans = {c: plan_component(c, layout, models, base) for c in components}
    total = sum(len(p[0]) for p in plans.values())
    out: dict[str, ComponentStats] = {}
    with tqdm(total=total, desc="weight-space pass", unit="key", disable=not progress, leave=False) as bar:
        for comp in components:
            used, skipped, excluded, cbase = plans[comp]
            absent = set(excluded)
            alive = [m.name not in excluded for m in models]
            gram = torch.zeros((n, n), dtype=torch.float64, device=device)
            sumsq = torch.zeros(n, dtype=torch.float64, device=device)
            base_sumsq = torch.zeros((), dtype=torch.float64, device=device)
            dtypes: dict[str, set[str]] = {m.name: set() for m in models}
            keys_used, numel_used = 0, 0
            groups: dict[str, torch.Tensor] = {}
            chunk = max(1 << 14, CHUNK_BUDGET_BYTES // (8 * 3 * (n + 1)))
            for key in used:
                bt = flat_tensor(cbase, key) if cbase is not None else None
                # members without the component hold none of its keys: zero rows, masked out by ``alive``
                tensors = [None if m.name in absent else flat_tensor(m, key) for m in models]
                for m, t in zip(models, tensors, strict=True):
                    if t is not None:
                        dtypes[m.name].add(str(t.dtype).removeprefix("torch."))
                numel = next(t for t in tensors if t is not None).numel()
                kg = torch.zeros((n, n), dtype=torch.float64, device=device)
                kc = torch.zeros(n, dtype=torch.float64, device=device)
                kr = torch.zeros((), dtype=torch.float64, device=device)
                base_ok = True
                for s in range(0, numel, chunk):
                    e = min(numel, s + chunk)
                    x = torch.stack([torch.zeros(e - s, dtype=torch.float64, device=device) if t is None
                                     else t[s:e].to(device, non_blocking=True).double() for t in tensors])
                    ref = bt[s:e].to(device, non_blocking=True).double() if bt is not None else None
                    if ref is not None:
                        r2 = ref @ ref
                        if not bool(torch.isfinite(r2)):
                            base_ok = False
                            break
                    g, c, r2, dead = chunk_products(x, ref, alive)
                    for i in dead:
                        excluded[models[i].name] = f"non-finite values in {key}"
                        alive[i] = False
                    kg += g
                    kc += c
                    kr += r2
                bar.update(1)
                if not base_ok:
                    skipped.setdefault("non-finite in base", []).append(key)
                    continue
                gram += kg
                if group_of is not None:
                    g_acc = groups.get(label := group_of(key))
                    groups[label] = kg if g_acc is None else g_acc.add_(kg)
                sumsq += kg.diagonal() + 2.0 * kc + kr  # ‖x‖² = ‖d‖² + 2<d, ref> + ‖ref‖²
                base_sumsq += kr
                keys_used += 1
                numel_used += numel
            ref_kind = "base" if cbase is not None else "pool mean" if base is None else "pool mean (the base lacks this component)"
            out[comp] = ComponentStats(
                component=comp, names=[m.name for m in models], gram=gram.cpu().numpy(), sumsq=sumsq.cpu().numpy(),
                base_sumsq=float(base_sumsq) if cbase is not None else None, reference=ref_kind, keys_used=keys_used,
                numel=numel_used, skipped=skipped, excluded=excluded,
                dtypes={k: "+".join(sorted(v)) for k, v in dtypes.items()},
                group_grams={k: v.cpu().numpy() for k, v in groups.items()})
    return out


# --------------------------------------------------------------------------------------------------- cache


def file_identity(path: Path) -> list[Any]:
    """What makes a cached result valid: the resolved path, its size and modification time (ns)."""
    st = path.stat()
    return [str(path.resolve()), st.st_size, st.st_mtime_ns]


def cache_key(paths: Sequence[Path], base: Path | None, component: str) -> str:
    ident = {"v": CACHE_VERSION, "component": component, "models": [file_identity(Path(p)) for p in paths],
             "base": file_identity(Path(base)) if base is not None else None}
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()


def load_cache() -> dict[str, Any]:
    """The cache file's entries (empty when absent, unreadable or from another version: it is only a cache)."""
    path = cache_dir() / CACHE_FILE
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict) or data.get("version") != CACHE_VERSION or not isinstance(data.get("entries"), dict):
        return {}
    return data["entries"]


def store_cache(new: dict[str, ComponentStats]) -> None:
    """Merge ``new`` (cache key -> stats) into the cache file; atomic, and a failure to write is not an error."""
    entries = load_cache()
    now = time.time()
    for k, stats in new.items():
        entries[k] = {"time": now, "stats": stats.to_json()}
    if len(entries) > CACHE_MAX_ENTRIES:
        keep = sorted(entries, key=lambda k: entries[k].get("time", 0.0), reverse=True)[:CACHE_MAX_ENTRIES]
        entries = {k: entries[k] for k in keep}
    try:
        cache_dir().mkdir(parents=True, exist_ok=True)
        atomic_write_text(cache_dir() / CACHE_FILE, json.dumps({"version": CACHE_VERSION, "entries": entries}))
    except (OSError, AstolfoError):
        pass


def pool_stats(paths: Sequence[Path], base: Path | None, components: Sequence[str] | None, device: str | torch.device = "auto",
               progress: bool = True, cache: bool = True) -> tuple[Layout, dict[str, ComponentStats], list[str]]:
    """Per-component statistics of the pool, from the cache when every file is unchanged, else from one pass.

    Returns ``(layout, stats, cached_components)``.
    """
    paths = [Path(p) for p in paths]
    models, base_o, layout = open_pool(paths, base)
    try:
        comps = list(layout.components) if components is None else list(components)
        unknown = [c for c in comps if c not in MERGE_COMPONENTS]
        if unknown:
            raise AstolfoError(f"unknown component(s) {', '.join(unknown)}; choose from {', '.join(MERGE_COMPONENTS)}")
        comps = [c for c in comps if c in layout.components]
        if not comps:
            raise AstolfoError(f"none of the requested components ({', '.join(components or [])}) exist in {layout.arch} models; "
                               f"choose from {', '.join(layout.components)}")
        stats: dict[str, ComponentStats] = {}
        keys = {c: cache_key(paths, base, c) for c in comps} if cache else {}
        if cache:
            entries = load_cache()
            for c in comps:
                e = entries.get(keys[c])
                if e is not None:
                    with contextlib.suppress(KeyError, TypeError, ValueError):
                        stats[c] = ComponentStats.from_json(e["stats"])
        hits = [c for c in comps if c in stats]
        todo = [c for c in comps if c not in stats]
        if todo:
            fresh = accumulate(models, base_o, layout, todo, resolve_device(device), progress)
            stats.update(fresh)
            if cache:
                store_cache({keys[c]: fresh[c] for c in todo})
        return layout, {c: stats[c] for c in comps}, hits
    finally:
        for o in models + ([base_o] if base_o else []):
            o.reader.close()
