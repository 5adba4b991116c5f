"""Merge planning: what each output key needs, decided before any tensor is read.

The open models of a recipe (:class:`ModelSet`: one reader and canonical-key index per file), the output layout
(:func:`layout_for`), the planned output tensors in layout order (:func:`plan_output`: required keys, optional keys
some source has, pass-through keys from the base), which model a pass-through key comes from, and the pool's
prediction-type check. The executor (:mod:`.execute`) runs a plan; the kernel (:mod:`.kernel`) computes each key.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from astolfo_opt.checkpoint.io import CheckpointReader, open_checkpoint
from astolfo_opt.checkpoint.layout import (
    MERGE_COMPONENTS,
    PASSTHROUGH_COMPONENTS,
    Layout,
    LayoutEntry,
    block_of,
    canonical_key,
    component_of,
    detect_architecture,
    detect_size,
    get_layout,
)
from astolfo_opt.checkpoint.prediction import MARKER_KEYS, Prediction, effective_prediction, pool_prediction, prediction_of
from astolfo_opt.errors import CheckpointError, ConfigError
from astolfo_opt.merge.recipe import Recipe

log = logging.getLogger(__name__)


DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32, "fp64": torch.float64,
          "fp8_e4m3": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}


@dataclass(frozen=True)
class PlannedTensor:
    key: str
    component: str
    dtype: torch.dtype
    shape: tuple[int, ...]


@dataclass
class MergeStats:
    models: int = 0
    keys: int = 0
    seconds: float = 0.0
    bytes_read: int = 0
    tensors_read: int = 0
    components: list[str] = field(default_factory=list)
    models_read: set[str] = field(default_factory=set)

    def summary(self) -> str:
        return (f"merged {self.keys} keys from {self.models} models in {self.seconds:.2f} s "
                f"({self.bytes_read / 1e9:.2f} GB read)")


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        d = torch.device(device)
    except (RuntimeError, TypeError):
        d = None
    if d is None or d.type not in ("cpu", "cuda"):
        raise ConfigError(f"device={device!r} is not supported: use auto, cpu or cuda (cuda:N)")
    if d.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device=cuda was requested but CUDA is not available (use device=auto or cpu)")
    return d


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ConfigError(f"dtype={dtype!r} must be one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


class ModelSet:
    """Open readers for a recipe's models with a canonical-key index each (opened once, reused by every merge)."""

    def __init__(self, models: dict[str, str], arch: str | None = None):
        self.paths: dict[str, Path] = {}
        self.readers: dict[str, CheckpointReader] = {}
        self.index: dict[str, dict[str, str]] = {}  # model -> canonical -> raw key
        self.arch = arch
        self.extend(models)

    def extend(self, models: dict[str, str]) -> None:
        """Open the readers of ``models`` not open yet (the trial loop's recipes name different subsets of one pool:
        each file's header is parsed once per study, not once per trial)."""
        archs = {}
        try:
            for name, path in models.items():
                if name in self.readers:
                    continue
                path = Path(path)
                r = open_checkpoint(path)
                self.paths[name], self.readers[name] = path, r
                a = detect_architecture(r.keys())
                if a is None:
                    raise CheckpointError(path, "not a Stable Diffusion checkpoint (no UNet / text encoder keys found)")
                archs[name] = a
                self.index[name] = {canonical_key(a, k): k for k in r.keys()}  # noqa: SIM118 - readers are not iterable
        except BaseException:
            self.close()
            raise
        found = sorted(set(archs.values()))
        if self.arch is None and len(found) > 1:
            mixed = ", ".join(f"{n}={a}" for n, a in archs.items())
            self.close()
            raise ConfigError(f"the models mix architectures ({mixed}); merge only models of one architecture")
        if self.arch is None and found:
            self.arch = found[0]
        for name, a in archs.items():
            if a != self.arch:
                self.close()
                raise CheckpointError(self.paths[name], f"is {a}, the merge is {self.arch}")

    def prediction(self, model: str) -> Prediction:
        """What ``model``'s file states about its prediction type (headers only)."""
        return prediction_of(self.readers[model])

    def serves(self, models: dict[str, str]) -> bool:
        """True when no name of ``models`` is open with another file (then :meth:`extend` can reuse this set)."""
        return all(n not in self.paths or self.paths[n] == Path(p) for n, p in models.items())

    def has(self, model: str, key: str) -> bool:
        return key in self.index[model]

    def info(self, model: str, key: str):
        return self.readers[model].info(self.index[model][key])

    def read(self, model: str, key: str, out: torch.Tensor | None = None) -> torch.Tensor:
        return self.readers[model].read(self.index[model][key], out)

    def mappable(self, model: str) -> bool:
        return self.readers[model].format == "safetensors"

    def view(self, model: str, key: str) -> torch.Tensor:
        """A read-only view into the file mapping (never write to it)."""
        return self.readers[model].get(self.index[model][key])

    def release(self, model: str, key: str) -> None:
        """Unmap ``key``'s pages of ``model`` from this process (see ``SafetensorsReader.release``)."""
        self.readers[model].release(self.index[model][key])

    def close(self) -> None:
        for r in self.readers.values():
            r.close()


def layout_for(models: ModelSet) -> Layout:
    """The shipped layout for the first model's size; for a size we do not ship (a custom-width model), a layout
    built from the union of the canonical keys the models hold (all optional: each key is emitted when a source of
    its component has it), with the first holder's shapes."""
    first_name = next(iter(models.readers))
    first = models.readers[first_name]
    shapes = {c: first.info(raw).shape for c, raw in models.index[first_name].items()}
    size = detect_size(models.arch, shapes)
    if size is not None:
        return get_layout(models.arch, size)
    order = [*MERGE_COMPONENTS, *PASSTHROUGH_COMPONENTS]
    seen: dict[str, LayoutEntry] = {}
    for name, index in models.index.items():
        for key, raw in index.items():
            comp = component_of(models.arch, key)
            if key in seen or comp not in order:
                continue
            info = models.readers[name].info(raw)
            seen[key] = LayoutEntry(key, tuple(info.shape), str(info.dtype).removeprefix("torch."), True, comp,
                                    block_of(models.arch, key))
    entries = sorted(seen.values(), key=lambda e: order.index(e.component))  # stable: file order within a component
    log.warning("%s: UNet widths match no shipped %s layout; merging the union of the models' keys", first.path, models.arch)
    return Layout(models.arch, "custom", entries)


def plan_output(recipe: Recipe, models: ModelSet, layout: Layout, out_dtype: torch.dtype,
                components: Iterable[str] | None = None) -> list[PlannedTensor]:
    """Output keys in layout order: required keys, plus optional ones some source has; pass-through from the base."""
    wanted = set(components) if components is not None else None
    plan = []
    for key, e in layout.entries.items():
        comp = e.component
        if comp == "ema":
            continue  # EMA copies are dropped: the merge is of the live weights
        if comp in PASSTHROUGH_COMPONENTS:
            src = None if wanted is not None else passthrough_source(recipe, models, key)
            if src is not None:
                plan.append(PlannedTensor(key, comp, models.info(src, key).dtype, e.shape))
            continue
        if wanted is not None and comp not in wanted:
            continue
        sources = _sources(recipe, comp)
        if not sources:
            continue  # not in the recipe and no base to copy it from: the output has no such component
        if e.optional and not any(models.has(m, key) for m in sources):
            continue
        if key.endswith("position_ids"):
            plan.append(PlannedTensor(key, comp, torch.int64, e.shape))
            continue
        plan.append(PlannedTensor(key, comp, out_dtype, e.shape))
    return plan


def passthrough_source(recipe: Recipe, models: ModelSet, key: str) -> str | None:
    """The model whose ``key`` is copied unchanged (schedule buffers, markers): the base. A prediction marker
    (``v_pred`` / ``ztsnr``) also comes from any model that has it when the base does not (``merge --average`` of
    v-pred files has no base): dropping it would turn v-prediction weights into a file every tool samples as epsilon.
    The pool check (:func:`check_prediction`) has already refused a pool where only some models carry it."""
    if recipe.base is not None and models.has(recipe.base, key):
        return recipe.base
    if key in MARKER_KEYS:
        return next((m for m in recipe.models if models.has(m, key)), None)
    return None


def check_prediction(recipe: Recipe, models: ModelSet, allow: str = "allow_mixed_prediction: true (recipe) or "
                     "--allow-mixed-prediction") -> str | None:
    """The recipe's one prediction type (v_prediction / epsilon / None: unknown); a pool that mixes them is a
    one-line :class:`ConfigError` unless ``recipe.allow_mixed_prediction`` (then a warning)."""
    types = {n: effective_prediction(models.arch, models.prediction(n).type) for n in recipe.models}
    try:
        return pool_prediction(types, allow)
    except ConfigError as e:
        if not recipe.allow_mixed_prediction:
            raise
        log.warning("%s (merging anyway: allow_mixed_prediction is set)", e)
        return None


def _sources(recipe: Recipe, comp: str) -> list[str]:
    cr = recipe.components.get(comp)
    names = cr.involved() if cr else []
    return [*names, recipe.base] if recipe.base and recipe.base not in names else names

