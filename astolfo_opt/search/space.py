"""Search spaces: Optuna parameters built from a pool and the ``space`` config, and their translation to recipes.

Parameters (names are stable so studies can be resumed and compared):

- ``inc.<comp>.<group>`` int 0/1 - include a group of models for a component. A group is the set of models whose
  component is bit-identical (same content hash): they share one parameter and enter the merge once (the group's
  first model), so a text encoder shipped unchanged by five finetunes is not weighted five times. Ints rather than
  categoricals so every sampler (CMA-ES, QMC, GP included) handles them natively.
- ``w.<comp>.<group>`` float - per-group ensemble weight (``weights: true``); with ``inclusion: false`` a group
  whose weight is below ``min_weight`` is left out, which makes a purely continuous space for CMA-ES / GP.
- ``alpha.<comp>.<block>`` float - MBW anchor + ensemble: ``θ_b = (1-α_b)·anchor + α_b·ensemble`` with the
  anchor the pool base (``mbw.components``, blocks present in that component only).
- ``pair.<block>`` float - ``pairwise_mbw``: classic two-model AutoMBW ``(1-α_b)·A + α_b·B`` per UNet block
  (written as anchor A + ensemble [B], which is the same formula).
- ``method.<comp>`` categorical - with ``methods: [weighted_average, ties, dare_ties, ...]`` (more than one), the
  merge method of each searched component, from the merge-method registry. The chosen method's searchable
  parameters are *conditional* parameters ``param.<comp>.<method>.<name>`` (only a trial that chose that method has
  them; ranges from the registry, or ``method_params.<method>.<name>: [low, high]``). Non-searchable parameters (a
  DARE ``seed``) take ``method_seed`` / their defaults. Under an MBW component, α_b scales a method's λ per block.

Constraint "at least ``min_models`` groups per component": the sampler's proposal is kept as the trial's params
(Optuna records what was sampled) and the recipe is *repaired* deterministically - missing groups are added in pool
order, base first - so no trial crashes or is wasted. The violation (``k - n`` before repair) is stored as the
trial's ``constraint`` user attribute and fed to samplers that accept ``constraints_func`` (TPE, NSGA-II, GP) so
they learn to avoid the repaired region.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from astolfo_opt.checkpoint.layout import get_layout
from astolfo_opt.errors import ConfigError
from astolfo_opt.merge.methods import get_method
from astolfo_opt.search.pool import Pool

SPACE_KINDS = ("inclusion", "inclusion_mbw", "weights", "pairwise_mbw")


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_\-]", "_", name)


#: ``method.<comp>``: a component's merge method; ``param.<comp>.<method>.<name>``: that method's parameter
METHOD, METHOD_PARAM = "method.", "param."


def active_point(params: Mapping[str, Any]) -> dict[str, Any]:
    """``params`` without the parameters of methods the point did not choose (samplers that propose every known
    parameter compare points by what a trial of them would really record)."""
    out = {}
    for n, v in params.items():
        if n.startswith(METHOD_PARAM):
            comp, method = n.split(".")[1:3]
            if str(params.get(f"{METHOD}{comp}")) != method:
                continue
        out[n] = v
    return out


@dataclass(frozen=True)
class FloatParam:
    name: str
    low: float
    high: float
    step: float | None = None

    def suggest(self, trial) -> float:
        return float(trial.suggest_float(self.name, self.low, self.high, step=self.step))


@dataclass(frozen=True)
class ChoiceParam:
    name: str
    choices: tuple[str, ...]

    def suggest(self, trial) -> str:
        return str(trial.suggest_categorical(self.name, list(self.choices)))


@dataclass(frozen=True)
class BoolParam:
    name: str

    def suggest(self, trial) -> int:
        return int(trial.suggest_int(self.name, 0, 1))


@dataclass
class Group:
    """Models sharing an identical component; ``rep`` stands for all of them in the merge."""

    component: str
    models: list[str]

    @property
    def rep(self) -> str:
        return self.models[0]

    @property
    def key(self) -> str:
        return _safe(self.rep)


def spec_hash(spec: Mapping[str, Any]) -> str:
    """sha256 of the canonical JSON of a recipe spec (what defines the merge result)."""
    return hashlib.sha256(json.dumps(spec, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


@dataclass
class Candidate:
    """One point of the space, ready to evaluate: params, the recipe spec (plain JSON) and repair bookkeeping."""

    params: dict[str, Any]
    spec: dict[str, Any]
    violation: float = 0.0
    repaired: dict[str, list[str]] = field(default_factory=dict)

    @property
    def hash(self) -> str:
        return spec_hash(self.spec)

    def recipe(self):
        """The :class:`astolfo_opt.merge.recipe.Recipe` (needs the merge package)."""
        return spec_to_recipe(self.spec)


def spec_to_recipe(spec: Mapping[str, Any]):
    """The :class:`astolfo_opt.merge.recipe.Recipe` of a spec (the spec is the recipe's own dict form)."""
    from astolfo_opt.merge.recipe import Recipe

    return Recipe.from_dict(spec)


class SearchSpace:
    """Parameters of one study and the map params -> recipe spec."""

    def __init__(self, pool: Pool, cfg: Mapping[str, Any], nan_policy: str = "error", time_embed_block: str = "IN00"):
        self.pool = pool
        self.cfg = dict(cfg)
        self.kind = str(cfg.get("kind", "inclusion"))
        if self.kind not in SPACE_KINDS:
            raise ConfigError(f"space.kind={self.kind!r} is unknown; use one of {', '.join(SPACE_KINDS)}")
        self.nan_policy = nan_policy
        self.time_embed_block = time_embed_block
        self.layout = get_layout(pool.arch, pool.size or "full")
        wanted = list(cfg.get("components") or ["unet", "te0", "te1"])
        self.components = [c for c in wanted if c in self.layout.components]
        self.min_models = int(cfg.get("min_models", 1))
        self.inclusion = bool(cfg.get("inclusion", self.kind != "weights"))
        self.weights = bool(cfg.get("weights", self.kind == "weights"))
        self.weight_range = tuple(cfg.get("weight_range", [0.0 if not self.inclusion else 0.1, 1.0]))
        self.min_weight = float(cfg.get("min_weight", 0.05))
        self.include_base = bool(cfg.get("include_base", True))
        mbw = dict(cfg.get("mbw") or {})
        self.mbw_components = [c for c in (mbw.get("components") or (["unet"] if self.kind == "inclusion_mbw" else []))
                               if c in self.components]
        self.alpha_range = tuple(mbw.get("range", [0.0, 1.0]))
        self.alpha_step = mbw.get("step")
        if self.mbw_components and not pool.base:
            raise ConfigError("MBW spaces blend towards the base model: set pool.base=NAME_OR_PATH")
        self.groups: dict[str, list[Group]] = {}
        for comp in self.components:
            groups = [Group(comp, g) for g in pool.identical_groups(comp)]
            if not self.include_base and pool.base:
                groups = [g for g in groups if pool.base not in g.models]
            if not groups:
                raise ConfigError(f"no model of the pool has a {comp}; drop it from space.components")
            self.groups[comp] = groups
        self.pair: tuple[str, str] | None = None
        if self.kind == "pairwise_mbw":
            a = cfg.get("pair_a") or pool.base or pool.names[0]
            b = cfg.get("pair_b") or next((n for n in pool.names if n != a), None)
            for n, key in ((a, "space.pair_a"), (b, "space.pair_b")):
                if n not in pool.names:
                    raise ConfigError(f"{key}={n!r} is not a model of the pool ({', '.join(pool.names)})")
            if a == b:
                raise ConfigError("pairwise_mbw needs two different models: set space.pair_a and space.pair_b")
            self.pair = (a, b)
        self.methods = self._methods(cfg)
        self.method_seed = int(cfg.get("method_seed", 0))
        self.conditional: dict[tuple[str, str], list[FloatParam]] = {}
        self.params = self._build_params()

    # ---- parameters -------------------------------------------------------------------------------------------
    def blocks_of(self, comp: str) -> list[str]:
        present = {self.layout.block_of(k, self.time_embed_block) for k in self.layout.keys_of(comp)}
        return [b for b in self.layout.block_ids if b in present]

    def _methods(self, cfg: Mapping[str, Any]) -> list[str]:
        """``space.methods`` checked against the registry: methods that take any number of members (an inclusion
        space chooses how many), and a base for those that take deltas from one."""
        names = [str(m) for m in (cfg.get("methods") or ["weighted_average"])]
        for m in names:
            spec = get_method(m, "space.methods entry")
            if spec.members is not None:
                raise ConfigError(f"space.methods: {m} takes exactly {spec.members} members; an inclusion space needs "
                                  "methods over any number of models (weighted_average, ties, dare, dare_ties, geometric_median)")
            if spec.needs_base and not self.pool.base:
                raise ConfigError(f"space.methods: {m} takes deltas from the base model: set pool.base=NAME_OR_PATH")
        if len(set(names)) != len(names):
            raise ConfigError(f"space.methods lists a method twice: {names}")
        if self.kind == "pairwise_mbw" and names != ["weighted_average"]:
            raise ConfigError("space.methods: pairwise_mbw is the two-model weighted sum; use an inclusion space for other methods")
        return names

    def _method_params(self, comp: str, method: str) -> list[FloatParam]:
        over = dict((self.cfg.get("method_params") or {}).get(method) or {})
        out = []
        for p in get_method(method).params:
            if not p.searchable:
                continue
            lo, hi = (float(x) for x in over.get(p.name, (p.low, p.high)))
            if not p.low <= lo < hi <= p.high:
                raise ConfigError(f"space.method_params.{method}.{p.name}=[{lo:g}, {hi:g}] must lie within [{p.low:g}, {p.high:g}]")
            out.append(FloatParam(f"{METHOD_PARAM}{comp}.{method}.{p.name}", lo, hi, 1.0 if p.integer else None))
        return out

    def _build_params(self) -> list[FloatParam | BoolParam | ChoiceParam]:
        ps: list[FloatParam | BoolParam | ChoiceParam] = []
        lo, hi = self.alpha_range
        if self.kind == "pairwise_mbw":
            return [FloatParam(f"pair.{b}", lo, hi, self.alpha_step) for b in self.blocks_of("unet")]
        if len(self.methods) > 1:
            for comp in self.components:
                ps.append(ChoiceParam(f"{METHOD}{comp}", tuple(self.methods)))
                for m in self.methods:
                    self.conditional[(comp, m)] = self._method_params(comp, m)
        for comp in self.components:
            groups = self.groups[comp]
            if len(groups) == 1:
                continue  # nothing to choose: the single group is always in
            for g in groups:
                if self.inclusion:
                    ps.append(BoolParam(f"inc.{comp}.{g.key}"))
                if self.weights:
                    ps.append(FloatParam(f"w.{comp}.{g.key}", float(self.weight_range[0]), float(self.weight_range[1])))
        for comp in self.mbw_components:
            ps += [FloatParam(f"alpha.{comp}.{b}", lo, hi, self.alpha_step) for b in self.blocks_of(comp)]
        return ps

    @property
    def names(self) -> list[str]:
        """Every parameter name, conditional ones included (a study's identity: resuming with another list is refused)."""
        return [p.name for p in self.params] + [p.name for ps in self.conditional.values() for p in ps]

    def method_of(self, comp: str, params: Mapping[str, Any]) -> str:
        return str(params.get(f"{METHOD}{comp}", self.methods[0]))

    def active(self, params: Mapping[str, Any]) -> list[FloatParam | BoolParam | ChoiceParam]:
        """The parameters a point has: the unconditional ones and its chosen methods' parameters."""
        out: list[FloatParam | BoolParam | ChoiceParam] = list(self.params)
        for (comp, m), ps in self.conditional.items():
            if self.method_of(comp, params) == m:
                out += ps
        return out

    def distributions(self) -> dict[str, Any]:
        """Optuna distributions of every parameter, conditional ones included (for ``create_trial`` / checks)."""
        import optuna.distributions as d

        def dist(p):
            if isinstance(p, BoolParam):
                return d.IntDistribution(0, 1)
            if isinstance(p, ChoiceParam):
                return d.CategoricalDistribution(list(p.choices))
            return d.FloatDistribution(p.low, p.high, step=p.step)

        return {p.name: dist(p) for p in [*self.params, *(q for ps in self.conditional.values() for q in ps)]}

    def suggest(self, trial) -> Candidate:
        params = {p.name: p.suggest(trial) for p in self.params}
        for (comp, m), ps in self.conditional.items():  # define-by-run: only the chosen method's parameters exist
            if self.method_of(comp, params) == m:
                params.update({p.name: p.suggest(trial) for p in ps})
        return self.candidate(params)

    # ---- warm starts ------------------------------------------------------------------------------------------
    def uniform_params(self) -> dict[str, Any]:
        """Everything in with equal weight, MBW fully on the ensemble: the seeds' uniform average."""
        out: dict[str, Any] = {}
        for p in self.params:
            if isinstance(p, ChoiceParam):
                out[p.name] = "weighted_average" if "weighted_average" in p.choices else p.choices[0]
            elif isinstance(p, BoolParam):
                out[p.name] = 1
            elif p.name.startswith("w."):
                out[p.name] = p.high
            else:
                out[p.name] = 0.5 if p.name.startswith("pair.") else p.high
        for (comp, m), ps in self.conditional.items():  # a start method other than weighted_average: its defaults
            if self.method_of(comp, out) == m:
                out.update({q.name: get_method(m).param(q.name.rsplit(".", 1)[1]).default for q in ps})
        return out

    def base_params(self) -> dict[str, Any] | None:
        """The base model alone (``None`` when the space cannot express it)."""
        base = self.pool.base
        if base is None:
            return None
        out: dict[str, Any] = {}
        for p in self.params:
            if isinstance(p, ChoiceParam):
                if "weighted_average" not in p.choices:
                    return None
                out[p.name] = "weighted_average"
            elif p.name.startswith("pair."):
                if self.pair and self.pair[0] != base:
                    return None
                out[p.name] = p.low
            elif p.name.startswith("alpha."):
                out[p.name] = p.low
            else:
                _, comp, key = p.name.split(".", 2)
                g = next(g for g in self.groups[comp] if g.key == key)
                on = base in g.models
                out[p.name] = int(on) if isinstance(p, BoolParam) else (p.high if on else p.low)
        return out

    def warm_starts(self) -> list[dict[str, Any]]:
        out = [self.uniform_params()]
        b = self.base_params()
        if b is not None and b != out[0]:
            out.append(b)
        return [w for w in out if w] if self.params else []

    # ---- params -> recipe spec --------------------------------------------------------------------------------
    def candidate(self, params: Mapping[str, Any]) -> Candidate:
        params = dict(params)
        missing = [p.name for p in self.active(params) if p.name not in params]
        if missing:
            raise ConfigError(f"parameters {missing[:3]} missing: the study was made with another space config")
        spec_models: set[str] = set()
        comps: dict[str, Any] = {}
        violation = 0.0
        repaired: dict[str, list[str]] = {}
        if self.kind == "pairwise_mbw":
            a, b = self.pair  # type: ignore[misc]
            alpha = {blk: float(params[f"pair.{blk}"]) for blk in self.blocks_of("unet")}
            comps["unet"] = {"method": "weighted_average", "members": [{"model": b, "weight": 1.0}], "anchor": a,
                             "alpha": alpha, "alpha_default": 0.0}
            spec_models |= {a, b}
            for comp in self.components:
                if comp != "unet":
                    comps[comp] = {"method": "copy", "members": [{"model": a, "weight": 1.0}]}
        else:
            for comp in self.components:
                groups = self.groups[comp]
                chosen: list[tuple[str, float]] = []
                for g in groups:
                    if len(groups) == 1:
                        chosen.append((g.rep, 1.0))
                        continue
                    on = bool(params.get(f"inc.{comp}.{g.key}", 1)) if self.inclusion else True
                    w = float(params.get(f"w.{comp}.{g.key}", 1.0)) if self.weights else 1.0
                    if not self.inclusion and w < self.min_weight:
                        on = False
                    if on and w > 0:
                        chosen.append((g.rep, w))
                need = min(self.min_models, len(groups))
                if len(chosen) < need:
                    violation += need - len(chosen)
                    order = sorted(groups, key=lambda g: self.pool.base not in g.models)  # base first, then pool order
                    added = []
                    for g in order:
                        if len(chosen) >= need:
                            break
                        if g.rep not in {m for m, _ in chosen}:
                            chosen.append((g.rep, 1.0 if not self.weights else max(float(params.get(f"w.{comp}.{g.key}", 1.0)),
                                                                                  self.min_weight)))
                            added.append(g.rep)
                    repaired[comp] = added
                comps[comp] = self._entry(comp, chosen, params)
                if "anchor" in comps[comp]:
                    spec_models.add(self.pool.base)  # type: ignore[arg-type]
                spec_models |= {m for m, _ in chosen}
        fill = self.fill_base
        spec_models.add(fill)
        paths = self.pool.paths
        spec = {"models": {n: paths[n] for n in self.pool.names if n in spec_models}, "base": fill,
                "arch": self.pool.arch, "components": comps, "nan_policy": self.nan_policy,
                "time_embed_block": self.time_embed_block}
        if self.pool.allow_mixed_prediction:  # so export's merge accepts what the study was told to accept
            spec["allow_mixed_prediction"] = True
        return Candidate(params, spec, violation, repaired)

    def _entry(self, comp: str, chosen: list[tuple[str, float]], params: Mapping[str, Any]) -> dict[str, Any]:
        """One component's recipe entry: the chosen members under the chosen method (weights only where the method
        reads them), the base as anchor for MBW and for methods that take deltas from it, the method's parameters."""
        name = self.method_of(comp, params)
        m = get_method(name)
        entry: dict[str, Any] = {"method": name, "members": [{"model": x, "weight": round(w, 6) if m.weighted else 1.0}
                                                            for x, w in chosen]}
        if comp in self.mbw_components and m.mbw:
            entry["anchor"] = self.pool.base
            entry["alpha"] = {blk: float(params[f"alpha.{comp}.{blk}"]) for blk in self.blocks_of(comp)}
            entry["alpha_default"] = 1.0
        elif m.needs_base:
            entry["anchor"] = self.pool.base
        if m.params:
            given = {p.name.rsplit(".", 1)[1]: float(params[p.name]) for p in self.conditional.get((comp, name), [])}
            if any(p.name == "seed" for p in m.params):
                given.setdefault("seed", float(self.method_seed))
            entry["params"] = m.resolve(given, f"space.method_params.{name}")
        return entry

    @property
    def fill_base(self) -> str:
        """The recipe's base: fills keys pruned members lack and supplies the components that are not searched
        (the VAE). Without ``pool.base`` that is the first pool model - the file the render pipeline is built
        from - so what a trial renders and what export writes agree."""
        return self.pool.base or self.pool.names[0]

    def describe(self) -> list[str]:
        """Human-readable lines: groups per component and parameter count (printed at study start)."""
        lines = [f"space {self.kind}: {len(self.params)} parameters over {len(self.pool.models)} models ({self.pool.arch})"]
        if not self.pool.base:
            lines.append(f"  no pool.base: unsearched components (VAE) and keys pruned models lack come from {self.fill_base}")
        for comp in self.components:
            shared = [g.models for g in self.groups[comp] if len(g.models) > 1]
            extra = f"; shared: {' '.join('=' .join(s) for s in shared)}" if shared else ""
            lines.append(f"  {comp}: {len(self.groups[comp])} distinct{extra}")
        if self.mbw_components:
            lines.append(f"  MBW alpha on {', '.join(self.mbw_components)} (anchor {self.pool.base})")
        if len(self.methods) > 1:
            lines.append(f"  methods per component: {', '.join(self.methods)} (their parameters conditional)")
        if self.pair:
            lines.append(f"  pairwise MBW: (1-a)*{self.pair[0]} + a*{self.pair[1]} per UNet block")
        return lines
