"""Checkpoint layouts: which keys an SD1 / SD2 / SDXL file holds, their component and their MBW block.

The layouts are data (``layouts/{arch}.{size}.json``, regenerated with ``python -m astolfo_opt.checkpoint.layout``
from ``spec.py`` + ``rules.yaml``; a test keeps them in sync). Everything else in the package asks this module, and
only this module, what a key means.
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import cache, cached_property
from importlib import resources
from typing import Any

import yaml

from astolfo_opt.checkpoint import spec

#: components a recipe merges, in output order
MERGE_COMPONENTS = ("unet", "te0", "te1", "vae")
#: components that are never averaged: EMA copies are dropped, schedule buffers / markers come from the base
PASSTHROUGH_COMPONENTS = ("schedule", "marker")
_UNET = spec.UNET_PREFIX


@cache
def rules() -> dict[str, Any]:
    """The shipped ``rules.yaml`` (component prefixes, aliases, detection, block counts)."""
    return yaml.safe_load(resources.files("astolfo_opt.checkpoint.layouts").joinpath("rules.yaml").read_text())


@dataclass(frozen=True)
class LayoutEntry:
    key: str
    shape: tuple[int, ...]
    dtype: str  # "float" or a fixed dtype name
    optional: bool
    component: str
    block: str


def block_ids(arch: str) -> list[str]:
    """MBW block ids of ``arch`` in supermerger order: BASE, IN00.., M00, OUT.."""
    b = rules()["blocks"][arch]
    return ["BASE", *(f"IN{i:02d}" for i in range(b["inputs"])), "M00", *(f"OUT{i:02d}" for i in range(b["outputs"]))]


def block_of(arch: str, key: str, time_embed_block: str | None = None) -> str:
    """MBW block id of a canonical key; everything outside the UNet is ``BASE``."""
    if not key.startswith(_UNET):
        return "BASE"
    rest = key[len(_UNET):]
    if m := re.match(r"input_blocks\.(\d+)\.", rest):
        return f"IN{int(m.group(1)):02d}"
    if rest.startswith("middle_block."):
        return "M00"
    if m := re.match(r"output_blocks\.(\d+)\.", rest):
        return f"OUT{int(m.group(1)):02d}"
    if rest.startswith("out."):
        return f"OUT{rules()['blocks'][arch]['outputs'] - 1:02d}"
    if rest.startswith(("time_embed.", "label_emb.")):
        return time_embed_block or rules()["time_embed_block"]
    return "BASE"


def component_of(arch: str, key: str) -> str | None:
    """Component of a canonical key, or ``None`` for a key this architecture does not know."""
    for comp, prefixes in rules()["components"][arch].items():
        if key.startswith(tuple(prefixes)):
            return comp
    if key in spec.SCHEDULE_KEYS:
        return "schedule"
    if arch == "sdxl" and key in {k.key for k in spec.SDXL_MARKER_KEYS}:
        return "marker"
    return None


def canonical_key(arch: str, key: str) -> str:
    """Rename legacy key spellings (old SD1 CLIP without ``text_model.``) to the canonical one."""
    for alias in rules()["aliases"].get(arch, []):
        if key.startswith(alias["from"]) and not key.startswith(alias["unless"]):
            return alias["to"] + key[len(alias["from"]):]
    return key


def detect_architecture(keys: Iterable[str]) -> str | None:
    """The architecture a set of keys belongs to (``None`` when it is not a Stable Diffusion checkpoint)."""
    keys = list(keys)
    for rule in rules()["detect"]:
        if any(k.startswith(rule["has"]) for k in keys):
            return rule["arch"]
    return None


class Layout:
    """The expected keys of one architecture at one size, in output order (unet, te0, te1, vae, extras)."""

    def __init__(self, arch: str, size: str, entries: list[LayoutEntry]):
        self.arch = arch
        self.size = size
        self.entries: dict[str, LayoutEntry] = {e.key: e for e in entries}

    def __repr__(self) -> str:
        return f"Layout({self.arch!r}, {self.size!r}, {len(self.entries)} keys)"

    @cached_property
    def components(self) -> list[str]:
        """Merge components present in this architecture, in order."""
        present = {e.component for e in self.entries.values()}
        return [c for c in MERGE_COMPONENTS if c in present]

    @cached_property
    def block_ids(self) -> list[str]:
        return block_ids(self.arch)

    def keys_of(self, component: str) -> list[str]:
        return [k for k, e in self.entries.items() if e.component == component]

    def required_keys(self, component: str | None = None) -> list[str]:
        return [k for k, e in self.entries.items() if not e.optional and (component is None or e.component == component)]

    def component_of(self, key: str) -> str | None:
        e = self.entries.get(key)
        return e.component if e else component_of(self.arch, key)

    def block_of(self, key: str, time_embed_block: str | None = None) -> str:
        return block_of(self.arch, key, time_embed_block)

    def canonical_key(self, key: str) -> str:
        return canonical_key(self.arch, key)

    def expected_shape(self, key: str) -> tuple[int, ...] | None:
        e = self.entries.get(key)
        return e.shape if e else None


def build_entries(arch: str, size: str) -> list[LayoutEntry]:
    """Generate a layout from ``spec`` + ``rules`` (used to write the data files, and by their sync test)."""
    specs = list(spec.checkpoint_keys(arch, size)) + spec.schedule_keys()
    if arch == "sdxl":
        specs += list(spec.SDXL_MARKER_KEYS)
    if arch in ("sd1", "sd2"):
        unet = [k for k in specs if k.key.startswith(_UNET)]
        specs += [spec.KeySpec(spec.ema_key(k.key), k.shape, k.dtype, True) for k in unet]
        specs += [spec.KeySpec("model_ema.decay", (), "float32", True), spec.KeySpec("model_ema.num_updates", (), "int32", True)]
    out = []
    for k in specs:
        comp = component_of(arch, k.key)
        if comp is None:  # pragma: no cover - generator and rules disagree
            raise AssertionError(f"rules.yaml does not place generated key {k.key}")
        out.append(LayoutEntry(k.key, tuple(k.shape), k.dtype, k.optional, comp, block_of(arch, k.key)))
    return out


def _data_path(arch: str, size: str):
    return resources.files("astolfo_opt.checkpoint.layouts").joinpath(f"{arch}.{size}.json")


def layout_to_json(entries: list[LayoutEntry], arch: str, size: str) -> str:
    """Compact, diff-friendly JSON: one line per key."""
    rows = ",\n".join(json.dumps([e.key, list(e.shape), e.dtype, e.optional, e.component, e.block]) for e in entries)
    return (f'{{"arch": "{arch}", "size": "{size}", "columns": ["key", "shape", "dtype", "optional", "component", '
            f'"block"],\n"keys": [\n{rows}\n]}}\n')


@cache
def get_layout(arch: str, size: str = "full") -> Layout:
    """The shipped layout of ``arch`` at ``size`` (``full`` = the released model, ``tiny`` = test widths)."""
    spec.architecture_dims(arch, size)  # validates both names with a clear message
    data = json.loads(_data_path(arch, size).read_text())
    entries = [LayoutEntry(k, tuple(s), dt, opt, comp, blk) for k, s, dt, opt, comp, blk in data["keys"]]
    return Layout(arch, size, entries)


def detect_size(arch: str, shapes: Mapping[str, tuple[int, ...]]) -> str | None:
    """Which shipped size a file's shapes match (by its UNet time embedding), ``None`` if neither."""
    probe = _UNET + "time_embed.0.weight"
    if probe not in shapes:
        return None
    for size in spec.sizes_of(arch):
        if get_layout(arch, size).expected_shape(probe) == tuple(shapes[probe]):
            return size
    return None


def main() -> None:  # pragma: no cover - developer tool
    """Regenerate the layout data files from spec.py + rules.yaml."""
    folder = sys.argv[1] if len(sys.argv) > 1 else str(resources.files("astolfo_opt.checkpoint.layouts"))
    for arch in spec.ARCHITECTURES:
        for size in spec.sizes_of(arch):
            path = f"{folder}/{arch}.{size}.json"
            with open(path, "w") as f:
                f.write(layout_to_json(build_entries(arch, size), arch, size))
            print("wrote", path)


if __name__ == "__main__":  # pragma: no cover
    main()
