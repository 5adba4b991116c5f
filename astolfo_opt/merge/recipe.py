"""Merge recipes as data: which models, which method per component, which MBW block weights.

A recipe is what a trial *is*, what export rebuilds and what a checkpoint's metadata records, so it is a plain
dataclass tree with a lossless YAML / JSON form and a canonical hash (key order and float spelling do not change it).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from astolfo_opt.errors import ConfigError
from astolfo_opt.merge.methods import Linear, MergeMethod, get_method, method_names

NAN_POLICIES = ("error", "drop_model")
COMPONENTS = ("unet", "te0", "te1", "vae")


@dataclass
class Member:
    model: str
    weight: float = 1.0


@dataclass
class ComponentRecipe:
    """How one component is built: ``method`` (a name in the merge-method registry, :mod:`astolfo_opt.merge.methods`,
    which says what it means), its ``members`` (with weights), an optional ``anchor`` (the MBW anchor of
    ``weighted_average``; the base that TIES / DARE take deltas from), per-block ``alpha`` (blocks missing from it use
    ``alpha_default``), ``block_weights[model][block]`` overriding a member's weight per block, and ``params`` (the
    method's own parameters, e.g. ``density`` / ``lambda`` for TIES; defaults filled in by :meth:`validate`).
    """

    method: str = "weighted_average"
    members: list[Member] = field(default_factory=list)
    anchor: str | None = None
    alpha: dict[str, float] = field(default_factory=dict)
    alpha_default: float = 1.0
    block_weights: dict[str, dict[str, float]] | None = None
    params: dict[str, float] = field(default_factory=dict)

    @property
    def spec(self) -> MergeMethod:
        """The registered method (a one-line ConfigError for an unknown name)."""
        return get_method(self.method, "recipe method")

    def validate(self, component: str, models: Mapping[str, str], base: str | None = None) -> None:
        where = f"recipe.components.{component}"
        m = get_method(self.method, f"{where}.method")
        if m.members is not None and len(self.members) != m.members:
            raise ConfigError(f"{where}: method {self.method} takes exactly {m.members} members, got {len(self.members)}")
        if not self.members:
            raise ConfigError(f"{where}: no members (include at least one model)")
        for name in [x.model for x in self.members] + ([self.anchor] if self.anchor else []):
            if name not in models:
                raise ConfigError(f"{where}: model {name!r} is not listed in recipe.models")
        if m.weighted and sum(x.weight for x in self.members) <= 0 and not self.block_weights:
            raise ConfigError(f"{where}: member weights sum to {sum(x.weight for x in self.members)}; they must be positive")
        if not m.weighted and (self.block_weights or any(x.weight != 1.0 for x in self.members)) and m.members is None:
            raise ConfigError(f"{where}: method {self.method} does not weight its members (drop weights / block_weights)")
        if self.anchor and not m.anchor:
            raise ConfigError(f"{where}: anchor is not read by method {self.method} (only by "
                              f"{', '.join(n for n in method_names() if get_method(n).anchor)})")
        if m.needs_base and not (self.anchor or base):
            raise ConfigError(f"{where}: method {self.method} takes deltas from a base: set {where}.anchor or recipe.base")
        if self.alpha and not m.mbw:
            raise ConfigError(f"{where}: method {self.method} has no per-block alpha (drop alpha)")
        self.params = m.resolve(self.params, f"{where}.params")

    def form(self, block: str) -> Linear:
        """This component's coefficients in ``block`` (linear methods only: see :class:`Linear`)."""
        return self.spec.form([(x.model, self.weight_for(x.model, block)) for x in self.members], anchor=self.anchor,
                              alpha=self.alpha_for(block), params=self.params)

    @classmethod
    def from_dict(cls, c: Mapping[str, Any], name: str = "?") -> ComponentRecipe:
        """One component of a recipe's dict form (``Recipe.to_dict()["components"][name]``)."""
        method = c.get("method", "weighted_average")
        members = [Member(str(m["model"]), float(m.get("weight", 1.0))) if isinstance(m, Mapping) else Member(str(m), 1.0)
                   for m in c.get("members", [])]
        return cls(
            method=method, members=members, anchor=c.get("anchor"),
            alpha={str(k): float(v) for k, v in (c.get("alpha") or {}).items()},
            alpha_default=float(c.get("alpha_default", get_method(method, f"recipe.components.{name}.method").alpha_default)),
            block_weights={str(m): {str(b): float(v) for b, v in bw.items()} for m, bw in c["block_weights"].items()}
            if c.get("block_weights") else None,
            params={str(k): v for k, v in (c.get("params") or {}).items()},
        )

    def alpha_for(self, block: str) -> float:
        return float(self.alpha.get(block, self.alpha_default))

    def weight_for(self, model: str, block: str) -> float:
        """Weight of ``model`` in ``block`` (per-block override, else its member weight)."""
        if self.block_weights and model in self.block_weights and block in self.block_weights[model]:
            return float(self.block_weights[model][block])
        for m in self.members:
            if m.model == model:
                return float(m.weight)
        return 0.0

    def involved(self) -> list[str]:
        return [m.model for m in self.members] + ([self.anchor] if self.anchor else [])


def _num(x: float) -> float:
    """Canonical number: always a float rounded to 12 significant digits, so ``1``, ``1.0`` and ``0.1 + 0.2`` vs
    ``0.3`` spell the same recipe (YAML reads ``1`` as int, JSON writes ``1.0``: the hash must not care)."""
    return float(f"{float(x):.12g}")


@dataclass
class Recipe:
    models: dict[str, str]
    components: dict[str, ComponentRecipe] = field(default_factory=dict)
    base: str | None = None
    arch: str | None = None
    nan_policy: str = "error"
    time_embed_block: str = "IN00"
    #: merge a pool that mixes v-prediction and epsilon models anyway (refused by default: the result is broken)
    allow_mixed_prediction: bool = False

    # ------------------------------------------------------------------ construction
    @classmethod
    def average(cls, paths: Iterable[str | Path], components: Iterable[str] = COMPONENTS, base: str | None = None) -> Recipe:
        """The uniform N-way merge of every component (the workflow's starting point)."""
        models: dict[str, str] = {}
        for p in paths:
            name = Path(p).stem
            i = 1
            while name in models:
                i += 1
                name = f"{Path(p).stem}_{i}"
            models[name] = str(p)
        members = [Member(n, 1.0) for n in models]
        return cls(models=models, base=base, components={c: ComponentRecipe("weighted_average", list(members)) for c in components})

    def validate(self) -> Recipe:
        if not self.models:
            raise ConfigError("recipe.models is empty: list at least one model file")
        if self.base is not None and self.base not in self.models:
            raise ConfigError(f"recipe.base={self.base!r} is not listed in recipe.models")
        if self.nan_policy not in NAN_POLICIES:
            raise ConfigError(f"recipe.nan_policy={self.nan_policy!r} must be one of {', '.join(NAN_POLICIES)}")
        if self.time_embed_block not in ("IN00", "BASE"):
            raise ConfigError(f"recipe.time_embed_block={self.time_embed_block!r} must be IN00 or BASE")
        for comp, cr in self.components.items():
            if comp not in COMPONENTS:
                raise ConfigError(f"recipe.components.{comp}: unknown component (use {', '.join(COMPONENTS)})")
            cr.validate(comp, self.models, self.base)
        return self

    # ------------------------------------------------------------------ (de)serialisation
    def to_dict(self) -> dict[str, Any]:
        comps: dict[str, Any] = {}
        for name in sorted(self.components):
            c = self.components[name]
            spec = c.spec
            members = sorted(c.members, key=lambda m: m.model) if spec.members is None else c.members  # a set, or slots
            d: dict[str, Any] = {"method": c.method, "members": [{"model": m.model, "weight": _num(m.weight)} for m in members]}
            if c.anchor is not None:
                d["anchor"] = c.anchor
            if c.alpha:
                d["alpha"] = {b: _num(v) for b, v in sorted(c.alpha.items())}
            if c.alpha_default != 1.0 or spec.writes_alpha:
                d["alpha_default"] = _num(c.alpha_default)
            if c.block_weights:
                d["block_weights"] = {m: {b: _num(v) for b, v in sorted(bw.items())} for m, bw in sorted(c.block_weights.items())}
            if spec.params:  # every parameter, defaults included: a default changing later cannot change the merge
                d["params"] = {k: _num(v) for k, v in sorted(spec.resolve(c.params, f"recipe.components.{name}.params").items())}
            comps[name] = d
        out = {"models": dict(sorted(self.models.items())), "base": self.base, "arch": self.arch,
               "nan_policy": self.nan_policy, "time_embed_block": self.time_embed_block, "components": comps}
        if self.allow_mixed_prediction:  # only when set: every earlier recipe keeps its hash
            out["allow_mixed_prediction"] = True
        return out

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Recipe:
        if not isinstance(d, Mapping) or "models" not in d:
            raise ConfigError("a recipe needs a `models:` mapping of name -> file path")
        comps = {name: ComponentRecipe.from_dict(c, name) for name, c in (d.get("components") or {}).items()}
        return cls(models={str(k): str(v) for k, v in d["models"].items()}, components=comps, base=d.get("base"),
                   arch=d.get("arch"), nan_policy=d.get("nan_policy", "error"), time_embed_block=d.get("time_embed_block", "IN00"),
                   allow_mixed_prediction=bool(d.get("allow_mixed_prediction", False)))

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> Recipe:
        return cls.from_dict(json.loads(text))

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @classmethod
    def from_yaml(cls, text: str) -> Recipe:
        return cls.from_dict(yaml.safe_load(text))

    @classmethod
    def load(cls, path: str | Path) -> Recipe:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"recipe file not found: {p}")
        try:
            text = p.read_text()
            r = cls.from_json(text) if p.suffix == ".json" else cls.from_yaml(text)
        except (yaml.YAMLError, json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
            raise ConfigError(f"{p}: not a valid recipe ({e.__class__.__name__}: {str(e).splitlines()[0][:120]})") from None
        base_dir = p.parent
        r.models = {k: str(v if Path(v).is_absolute() else base_dir / v) for k, v in r.models.items()}
        return r

    # ------------------------------------------------------------------ identity
    def hash(self) -> str:
        """Canonical sha256 of everything that defines the merged tensors."""
        return hashlib.sha256(self.to_json().encode()).hexdigest()

    def component_hash(self, component: str) -> str:
        """Hash of what defines one component's tensors (its recipe, the files it reads, policies)."""
        c = self.components.get(component)
        spec: dict[str, Any] = {"nan_policy": self.nan_policy, "time_embed_block": self.time_embed_block,
                                "base": self.models.get(self.base) if self.base else None}
        if c is None:
            spec["copy_of_base"] = True
        else:
            d = self.to_dict()["components"][component]
            d["members"] = [{"path": self.models[m["model"]], "weight": m["weight"]} for m in d["members"]]
            if "anchor" in d:
                d["anchor"] = self.models[d["anchor"]]
            if "block_weights" in d:
                d["block_weights"] = {self.models[m]: bw for m, bw in d["block_weights"].items()}
            spec["recipe"] = d
        return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()

    def a1111_recipe(self) -> dict[str, Any]:
        """The ``sd_merge_recipe`` metadata A1111's checkpoint merger writes (closest equivalent fields)."""
        unet = self.components.get("unet")
        return {"type": "astolfo-opt", "primary_model_hash": None,
                "interp_method": unet.method if unet else "copy", "multiplier": unet.alpha_default if unet else 1.0,
                "models": {c: [m.model for m in r.members] for c, r in self.components.items()},
                "save_as_half": None, "bake_in_vae": None}
