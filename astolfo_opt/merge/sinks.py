"""Where merged tensors go: a streaming ``.safetensors`` file, a dict, nowhere (timing), or a hash."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import torch

from astolfo_opt import __version__
from astolfo_opt.checkpoint.hashing import legacy_model_hash
from astolfo_opt.checkpoint.writer import SafetensorsWriter, clean_stale_partials
from astolfo_opt.merge.plan import PlannedTensor
from astolfo_opt.merge.recipe import Recipe

#: ModelSpec keys of the base that a merge does not inherit: we set them, or they describe the base's own bytes
MODELSPEC_NOT_INHERITED = ("modelspec.sai_model_spec", "modelspec.architecture", "modelspec.implementation",
                           "modelspec.prediction_type", "modelspec.title", "modelspec.date", "modelspec.description",
                           "modelspec.merged_from", "modelspec.hash_sha256", "modelspec.thumbnail", "modelspec.author")


def modelspec_metadata(recipe: Recipe, title: str | None = None) -> dict[str, str]:
    """Stability's ModelSpec keys for a merge: architecture (and SD2's variant), implementation, prediction type
    (``epsilon`` / ``v``), title, date, the merged models and our recipe hash; other ``modelspec.*`` keys of the base
    (or first model) are passed through untouched (resolution, usage hints, unknown keys). Headers only.

    The date is now (UTC), or ``SOURCE_DATE_EPOCH`` when set, so a reproducible build can pin it."""
    import datetime
    import os

    from astolfo_opt.checkpoint.io import open_checkpoint
    from astolfo_opt.checkpoint.layout import detect_architecture
    from astolfo_opt.checkpoint.prediction import EPSILON, MODELSPEC_ARCH, effective_prediction, pool_prediction, prediction_of
    from astolfo_opt.errors import AstolfoError

    arch, types, inherited = None, {}, {}
    source = recipe.base or next(iter(recipe.models))
    for name, path in recipe.models.items():
        with open_checkpoint(path) as r:
            a = detect_architecture(r.keys())
            arch = arch or a
            types[name] = effective_prediction(a, prediction_of(r).type)
            if name == source:
                inherited = {k: v for k, v in r.metadata.items() if k.startswith("modelspec.") and k not in MODELSPEC_NOT_INHERITED}
    try:
        pred = pool_prediction(types)
    except AstolfoError:  # a mixed pool merged on purpose: say nothing rather than something wrong
        pred = None
    epoch = os.environ.get("SOURCE_DATE_EPOCH")
    when = datetime.datetime.fromtimestamp(int(epoch), datetime.UTC) if epoch and epoch.isdigit() else datetime.datetime.now(datetime.UTC)
    out = {"modelspec.sai_model_spec": "1.0.0", **inherited}
    arch_id = MODELSPEC_ARCH.get(arch) or MODELSPEC_ARCH.get((arch, pred))
    if arch_id:
        out["modelspec.architecture"] = arch_id
    if arch:
        out["modelspec.implementation"] = "sgm" if arch == "sdxl" else "ldm"
    if pred:
        out["modelspec.prediction_type"] = "epsilon" if pred == EPSILON else "v"
    rhash = recipe.hash()
    out["modelspec.title"] = title or f"astolfo-opt merge {rhash[:10]}"
    out["modelspec.date"] = when.isoformat(timespec="seconds")
    involved = dict.fromkeys(m for c in recipe.components.values() for m in c.involved())
    out["modelspec.merged_from"] = ", ".join(involved or recipe.models)
    out["modelspec.description"] = f"merged by astolfo-opt; recipe sha256 {rhash}"
    return out


def merge_metadata(recipe: Recipe, extra: Mapping[str, object] | None = None,
                   hashes: Mapping[str, str] | None = None, title: str | None = None) -> dict[str, str]:
    """Provenance stored in an exported checkpoint: our recipe, A1111's merge fields, ModelSpec keys
    (:func:`modelspec_metadata`, ``title`` among them), tool version, caller extras.

    ``sd_merge_models`` is keyed like A1111's: by the model's sha256 when the caller knows it (``hashes[name]``,
    e.g. from ``inspect_model``), else by A1111's cheap legacy 8-hex hash (64 KiB of the file): hashing every input
    in full would add seconds per GB to each export."""
    models: dict[str, dict[str, object]] = {}
    for name, path in sorted(recipe.models.items()):
        try:
            legacy = legacy_model_hash(path)
        except OSError:
            legacy = None
        key = (hashes or {}).get(name) or legacy or name
        models[key] = {"name": Path(path).name, "model": name, "legacy_hash": legacy, "sd_merge_recipe": None}
    meta = {
        "recipe": recipe.to_json(),
        "recipe_hash": recipe.hash(),
        "sd_merge_recipe": json.dumps(recipe.a1111_recipe(), sort_keys=True),
        "sd_merge_models": json.dumps(models, sort_keys=True),
        "astolfo_opt_version": __version__,
        "format": "pt",
        **modelspec_metadata(recipe, title),
    }
    for k, v in (extra or {}).items():
        meta[str(k)] = v if isinstance(v, str) else json.dumps(v, sort_keys=True, default=str)
    return meta


class SafetensorsSink:
    """Stream the merge into ``path``: header from the plan up front, tensors written as produced, temp + rename."""

    def __init__(self, path: str | Path, metadata: Mapping[str, str] | None = None):
        self.path = Path(path)
        self.metadata = dict(metadata or {})
        self._writer: SafetensorsWriter | None = None
        clean_stale_partials(self.path.parent)

    def begin(self, plan: list[PlannedTensor]) -> None:
        self._writer = SafetensorsWriter(self.path, [(p.key, p.dtype, p.shape) for p in plan], self.metadata)

    def consume(self, key: str, tensor: torch.Tensor) -> None:
        assert self._writer is not None
        self._writer.write(key, tensor)

    def end(self) -> None:
        assert self._writer is not None
        self._writer.commit()

    def abort(self) -> None:
        if self._writer is not None:
            self._writer.abort()


class CollectSink:
    """Keep every tensor (on CPU) in ``.tensors``: tests and small merges."""

    def __init__(self) -> None:
        self.tensors: dict[str, torch.Tensor] = {}
        self.plan: list[PlannedTensor] = []

    def begin(self, plan: list[PlannedTensor]) -> None:
        self.plan = list(plan)

    def consume(self, key: str, tensor: torch.Tensor) -> None:
        self.tensors[key] = tensor.detach().to("cpu", copy=True)

    def end(self) -> None:
        pass


class NullSink:
    """Discard everything: measures pure merge compute."""

    def begin(self, plan: list[PlannedTensor]) -> None:
        self.count = 0

    def consume(self, key: str, tensor: torch.Tensor) -> None:
        self.count += 1

    def end(self) -> None:
        pass
