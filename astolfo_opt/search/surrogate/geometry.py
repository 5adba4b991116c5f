"""The weight space: per-(component, MBW block) Gram matrices of a pool's deltas, the exact distance between any two
merges of the inclusion / MBW family, and the map from search parameters to merged-weight coordinates (coefficients
from the merge-method registry)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from optuna.distributions import BaseDistribution

from astolfo_opt.errors import AstolfoError, ConfigError
from astolfo_opt.merge.methods import get_method
from astolfo_opt.merge.recipe import ComponentRecipe

log = logging.getLogger("astolfo_opt.search")


#: prefix of the inclusion bits and of the MBW alphas the weight-space surrogate understands
INC, ALPHA = "inc.", "alpha."


#: recipe families (parameter prefixes) the weight-space sampler can map to merged-weight coordinates
WEIGHT_SPACE_PREFIXES = (INC, ALPHA)


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_\-]", "_", name)


def coefficients(spec: Mapping[str, Any], names: Sequence[str], comp: str, block: str) -> list[float]:
    """Weights ``c_i`` with ``θ_b = Σ_i c_i M_i`` (models ``names``) for one component block of a recipe spec: the
    merge-method registry's coefficients (:meth:`ComponentRecipe.form`); a component absent from the spec is the
    base's. A non-linear method (TIES, DARE, ...) has none: one-line ConfigError."""
    entry = (spec.get("components") or {}).get(comp)
    return _block_coefficients(None if entry is None else ComponentRecipe.from_dict(entry, comp), spec.get("base"), names,
                               comp, block)


def _block_coefficients(cr: ComponentRecipe | None, base: str | None, names: Sequence[str], comp: str, block: str) -> list[float]:
    """:func:`coefficients` of an already parsed component (``None``: absent, the base's)."""
    idx = {n: i for i, n in enumerate(names)}
    c = [0.0] * len(names)
    if cr is None:
        c[idx[base]] = 1.0  # type: ignore[index]
        return c
    if not cr.spec.linear:
        raise ConfigError(f"oracle: component {comp} uses method {cr.method}, which is not linear (no weight-space coefficients)")
    try:
        coef = cr.form(block).coefficients(base=base)
    except ConfigError as e:
        raise ConfigError(f"oracle: component {comp}: {e}") from None
    for m, v in coef.items():
        c[idx[m]] += v
    return c


@dataclass
class WeightSpace:
    """Per-(component, MBW block) Gram matrices of the pool's deltas from a reference model (the base).

    Every recipe of the inclusion / MBW families is, per block ``k``, ``θ_k = ref_k + Σ_i u_ki d_ki`` with ``d_ki``
    the deltas and ``u`` the recipe's coefficients (weights normalised, times ``α_k`` under MBW). So the distance
    between two merges is exact from ``G_k = D_k D_kᵀ`` alone: ``‖θ¹-θ²‖² = Σ_k (u¹_k-u²_k)ᵀ G_k (u¹_k-u²_k)`` -
    no merge, no target, microseconds. ``names`` are the columns of ``u`` (every model but the reference)."""

    names: list[str]
    ref: str
    blocks: list[tuple[str, str]]
    gram: np.ndarray  # [K, n, n] float64
    ref_is_base: bool = True

    def coords(self, spec: Mapping[str, Any]) -> np.ndarray:
        """``u`` [K, n] of a recipe spec (the search core's JSON form; contracts as in the oracle's ``coefficients``)."""
        allnames = [self.ref, *self.names]
        out = np.zeros((len(self.blocks), len(self.names)))
        comps = spec.get("components") or {}
        parsed = {c: ComponentRecipe.from_dict(e, c) for c, e in comps.items()}  # once per component, not per block
        for k, (comp, blk) in enumerate(self.blocks):
            if comp not in comps and not self.ref_is_base:
                raise ConfigError(f"recipe lacks component {comp} and the pool has no base to take it from")
            out[k] = _block_coefficients(parsed.get(comp), spec.get("base"), allnames, comp, blk)[1:]
        return out

    def dist2(self, u1: np.ndarray, u2: np.ndarray) -> float:
        """Squared L2 distance between the two merges (all components and blocks together)."""
        e = np.asarray(u1, dtype=float) - np.asarray(u2, dtype=float)
        return float(np.einsum("kn,knm,km->", e, self.gram, e))

    def to_json(self) -> dict[str, Any]:
        return {"names": self.names, "ref": self.ref, "blocks": [list(b) for b in self.blocks], "gram": self.gram.tolist(),
                "ref_is_base": self.ref_is_base}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> WeightSpace:
        n = len(d["names"])
        return cls(list(d["names"]), str(d["ref"]), [(str(c), str(b)) for c, b in d["blocks"]],
                   np.asarray(d["gram"], dtype=np.float64).reshape(len(d["blocks"]), n, n), bool(d.get("ref_is_base", True)))


_WS_MEMO: dict[str, WeightSpace] = {}


def weight_space_from_files(paths: Mapping[str, str], base: str | None, components: Sequence[str], time_embed_block: str | None,
                            device: str = "cpu", cache: bool = True) -> WeightSpace:
    """Block Gram matrices of a pool from its files: the weight-space analysis's own streaming pass
    (:func:`astolfo_opt.analysis.distances.accumulate`, grouped by MBW block), cached in memory and in the analysis
    cache folder by file identity (path, size, mtime). Members the pass leaves out of a component (absent, non-finite)
    are logged; keys non-finite in the reference are skipped as in ``inspect``."""

    from astolfo_opt.analysis.distances import accumulate, cache_dir, file_identity, open_pool, plan_component, resolve_device
    from astolfo_opt.checkpoint.writer import atomic_write_text

    ref = base if base in paths else next(iter(paths))
    names = [n for n in paths if n != ref]
    ident = {"v": 2, "models": [[n, *file_identity(Path(paths[n]))] for n in names], "ref": [ref, *file_identity(Path(paths[ref]))],
             "components": list(components), "teb": time_embed_block}
    key = hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()
    if key in _WS_MEMO:
        return _WS_MEMO[key]
    cfile = cache_dir() / "block_grams.json"
    if cache:
        with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
            entry = json.loads(cfile.read_text()).get(key)
            if entry is not None:
                ws = WeightSpace.from_json(entry)
                _WS_MEMO[key] = ws
                return ws
    t0 = time.perf_counter()
    models, ref_o, layout = open_pool([Path(paths[n]) for n in names], Path(paths[ref]))
    try:
        comps = [c for c in components if c in layout.components]
        for comp in comps:  # headers only: refuse before the pass, not after it
            if plan_component(comp, layout, models, ref_o)[3] is None:
                raise ConfigError(f"weight-space surrogate: the reference model {ref} has no {comp}")
        stats = accumulate(models, ref_o, layout, comps, resolve_device(device),
                           group_of=lambda k: layout.block_of(k, time_embed_block) or "BASE")
    finally:
        for o in [*models, ref_o]:
            o.reader.close()
    grams: dict[tuple[str, str], Any] = {}
    for comp, st in stats.items():
        for who, why in st.excluded.items():
            log.warning("weight-space surrogate: %s is left out of %s (%s); its distances there are not measured", who, comp, why)
        out = [i for i, nm in enumerate(st.names) if nm in st.excluded]
        for blk, g in st.group_grams.items():
            g[out, :] = 0.0  # the pass stops filling a member's rows where it finds the fault: blank them all, so
            g[:, out] = 0.0  # the geometry does not depend on which key happened to come first
            grams[(comp, blk)] = g
    n = len(names)
    blocks = [b for b in dict.fromkeys((c, blk) for c in components for blk in ["BASE", *layout.block_ids]) if b in grams]
    ws = WeightSpace(names, ref, blocks, np.stack([grams[b] for b in blocks]), ref_is_base=ref == base)
    log.info("weight-space surrogate: block Gram matrices of %d models x %d blocks from one pass over the files (%.1fs)",
             n + 1, len(blocks), time.perf_counter() - t0)
    _WS_MEMO[key] = ws
    if cache:
        with contextlib.suppress(OSError, ValueError, AstolfoError):
            try:
                entries = json.loads(cfile.read_text())
            except (OSError, ValueError):
                entries = {}
            entries = dict(list(entries.items())[-15:])  # a handful of pools: the file stays small
            entries[key] = ws.to_json()
            cfile.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(cfile, json.dumps(entries))
    return ws


class Unsupported(Exception):
    """The space or recipe family is outside what the weight-space surrogate can map (the sampler falls back)."""


@dataclass
class _Comp:
    """One merge component of the recipe family: which block rows it owns, its bits and alphas."""

    name: str
    rows: list[int]  # indices into WeightSpace.blocks
    bits: list[str] = field(default_factory=list)  # inc.* parameter names
    bit_col: list[int] = field(default_factory=list)  # column in u of each bit's model; -1 = the reference (base)
    fixed: np.ndarray | None = None  # ensemble coefficients when the component has no bits
    mbw: bool = False
    alpha: list[str | None] = field(default_factory=list)  # per row: alpha parameter or None (alpha_default)
    alpha_default: float = 1.0
    method: str = "weighted_average"


class ParamMap:
    """Space parameters -> merged-weight coordinates ``u`` [K, n], mirroring ``SearchSpace.candidate`` for the
    inclusion / inclusion_mbw families (built from one evaluated recipe spec; :class:`SurrogateSampler` checks it
    against the recipes of the finished trials and falls back when they disagree)."""

    def __init__(self, ws: WeightSpace, dists: Mapping[str, BaseDistribution], spec: Mapping[str, Any], min_models: int = 1):
        self.ws, self.dists, self.min_models = ws, dict(dists), max(int(min_models), 1)
        odd = [n for n in dists if not n.startswith(WEIGHT_SPACE_PREFIXES)]
        if odd:
            raise Unsupported(f"parameter {odd[0]} (only inc.* / alpha.* spaces have a weight-space map)")
        col = {_safe(m): i for i, m in enumerate(ws.names)}
        col[_safe(ws.ref)] = -1
        comps = spec.get("components") or {}
        self.comps: list[_Comp] = []
        seen: set[str] = set()
        for comp in dict.fromkeys(c for c, _ in ws.blocks):
            rows = [k for k, (c, _) in enumerate(ws.blocks) if c == comp]
            entry = comps.get(comp)
            bits = sorted(n for n in dists if n.startswith(f"{INC}{comp}."))
            if entry is None:
                if bits:
                    raise Unsupported(f"component {comp} has inclusion bits but is absent from the recipe")
                continue
            cr = ComponentRecipe.from_dict(entry, comp)
            probe = cr.form(ws.blocks[rows[0]][1]) if cr.spec.linear else None
            if probe is None or not probe.normalise or cr.block_weights:
                # the relaxation below is the registry's normalised form (an ensemble, optionally anchored): u = α·w/Σw
                raise Unsupported(f"component {comp}: method {cr.method!r}{' with block_weights' if cr.block_weights else ''} "
                                  "is not an ensemble (normalised linear) form")
            c = _Comp(comp, rows, method=cr.method)
            for b in bits:
                key = b.split(".", 2)[2]
                if key not in col:
                    raise Unsupported(f"{b}: no model of the weight space is named {key}")
                c.bits.append(b)
                c.bit_col.append(col[key])
            if not bits:  # the registry's coefficients without the anchor blend (α is applied per row)
                fixed = np.zeros(len(ws.names))
                for m, v in cr.spec.form([(x.model, x.weight) for x in cr.members]).coefficients().items():
                    if m != ws.ref:
                        fixed[ws.names.index(m)] += v
                c.fixed = fixed
            anchor = entry.get("anchor")
            if anchor is not None:
                if anchor != ws.ref:
                    raise Unsupported(f"component {comp}: MBW anchor {anchor} is not the reference model {ws.ref}")
                c.mbw = True
                c.alpha_default = float(entry.get("alpha_default", 1.0))
                c.alpha = [f"{ALPHA}{comp}.{ws.blocks[k][1]}" if f"{ALPHA}{comp}.{ws.blocks[k][1]}" in dists else None for k in rows]
            seen |= set(c.bits) | {a for a in c.alpha if a}
            self.comps.append(c)
        left = sorted(set(dists) - seen)
        if left:
            raise Unsupported(f"parameter {left[0]} does not act on a component of the weight space")

    def coords(self, params: Mapping[str, Any]) -> np.ndarray | None:
        """``u`` of a parameter point (the registry's coefficients of the recipe the space builds from it, without the
        reference's own column); ``None`` when it has fewer than ``min_models`` members (the space would repair it)."""
        out = np.zeros((len(self.ws.blocks), len(self.ws.names)))
        names = [*self.ws.names, self.ws.ref]  # bit_col -1 is the reference
        for c in self.comps:
            method = get_method(c.method)
            if c.bits:
                on = [names[j] for b, j in zip(c.bits, c.bit_col, strict=True) if int(params[b])]
                if len(on) < min(self.min_models, len(c.bits)):
                    return None
                members = [(m, 1.0) for m in on]
            else:
                members = [(m, float(v)) for m, v in zip(self.ws.names, c.fixed, strict=True) if v]  # type: ignore[arg-type]
            for i, k in enumerate(c.rows):
                a = (float(params[c.alpha[i]]) if c.alpha[i] else c.alpha_default) if c.mbw else 1.0  # type: ignore[index]
                coef = method.form(members, anchor=self.ws.ref if c.mbw else None, alpha=a).coefficients()
                out[k] = [coef.get(m, 0.0) for m in self.ws.names]
        return out

