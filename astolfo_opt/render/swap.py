"""Canonical LDM/SGM key -> live diffusers parameter maps, and the merge sink that swaps weights in place.

Why trace instead of hard-coding: diffusers' single-file conversion functions (``convert_ldm_unet_checkpoint``,
``convert_ldm_vae_checkpoint``, ``convert_ldm_clip_checkpoint``, ``convert_open_clip_checkpoint``) are the reference
for how an A1111 file maps onto diffusers modules. We run them ONCE per architecture on placeholder tensors whose
values are unique element ids (on the tiny layout, which has exactly the full layout's key names and block
structure), and read back from the values which source key and which view each output came from. The result is
a small rule per key: ``reshape`` (plain rename; also turns VAE 1x1 conv attention weights into linear ones and
accepts SD2 ``proj_in`` in either conv or linear form), ``t`` (OpenCLIP ``text_projection`` is stored transposed)
or ``chunk k/n`` along dim 0 (OpenCLIP packed ``in_proj`` q/k/v split in thirds). Rules are shape-relative, so the
map traced at tiny size applies to full-size modules; target names are then fitted to the live module's own
``state_dict()`` names (transformers >= 5.6 dropped the ``text_model.`` level of ``CLIPTextModel``).

Canonical keys with no target are ignored on purpose, and only these (:data:`IGNORED_PATTERNS`):
``position_ids`` (an int64 ``arange`` buffer: never merged, never copied), OpenCLIP ``logit_scale`` (training only),
SD2's last OpenCLIP block ``resblocks.23`` and its ``text_projection`` (SD2 conditions on the penultimate layer;
diffusers' SD2 text encoder has 23 layers and no projection), plus every key outside the merge components
(``model_ema.*``, DDPM schedule buffers, prediction-type markers).
"""

from __future__ import annotations

import bisect
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from astolfo_opt.checkpoint.layout import component_of, get_layout
from astolfo_opt.checkpoint.spec import TE_PREFIXES, architecture_dims

#: canonical keys of merge components that deliberately have no diffusers target (see the module docstring)
IGNORED_PATTERNS: dict[str, list[str]] = {
    "sd1": [r"\.position_ids$"],
    "sd2": [r"\.position_ids$", r"^cond_stage_model\.model\.logit_scale$", r"^cond_stage_model\.model\.transformer\.resblocks\.23\.",
            r"^cond_stage_model\.model\.text_projection$"],
    "sdxl": [r"\.position_ids$", r"^conditioner\.embedders\.1\.model\.logit_scale$"],
}


@dataclass(frozen=True)
class Rule:
    """How one canonical tensor becomes one module tensor: ``op`` in ``reshape``, ``t``, ``chunk`` (``k`` of ``n``)."""

    target: str  # module state_dict name
    op: str
    k: int = 0
    n: int = 1

    def apply(self, t: torch.Tensor, shape: torch.Size | tuple[int, ...]) -> torch.Tensor:
        if self.op == "t":
            t = t.T
        elif self.op == "chunk":
            t = t.reshape(self.n * shape[0], -1)[self.k * shape[0]:(self.k + 1) * shape[0]]
        return t.reshape(shape)

    def source_numel(self, shape: tuple[int, ...]) -> int:
        numel = 1
        for s in shape:
            numel *= s
        return numel * self.n


@dataclass
class KeyMap:
    """One component's map: canonical key -> rules (usually one; three for a packed q/k/v)."""

    component: str
    rules: dict[str, list[Rule]] = field(default_factory=dict)
    ignored: list[str] = field(default_factory=list)

    def targets(self) -> set[str]:
        return {r.target for rs in self.rules.values() for r in rs}


def _placeholders(keys: Mapping[str, tuple[int, ...]]) -> tuple[dict[str, torch.Tensor], list[int], list[str]]:
    """Float64 tensors whose elements are globally unique ids (exact up to 2**53)."""
    out, starts, names, offset = {}, [], [], 0
    for k, shape in keys.items():
        n = 1
        for s in shape:
            n *= s
        out[k] = torch.arange(offset, offset + n, dtype=torch.float64).reshape(shape)
        starts.append(offset)
        names.append(k)
        offset += max(n, 1)
    return out, starts, names


def _classify(out: torch.Tensor, src: torch.Tensor, src_start: int) -> tuple[str, int, int]:
    if out.numel() == src.numel() and torch.equal(out.reshape(-1), src.reshape(-1)):
        return "reshape", 0, 1
    if src.ndim == 2 and tuple(out.shape) == (src.shape[1], src.shape[0]) and torch.equal(out, src.T):
        return "t", 0, 1
    flat = out.reshape(-1)
    start = int(flat[0].item()) - src_start
    n_out = out.numel()
    if src.numel() % n_out == 0 and start % n_out == 0 and torch.equal(flat, src.reshape(-1)[start:start + n_out]):
        return "chunk", start // n_out, src.numel() // n_out
    raise AssertionError("conversion produced a tensor that is not a rename, transpose or row block of one source")


def _convert(arch: str, comp: str, sd: dict[str, torch.Tensor], module: Any, config: Mapping[str, Any],
             size: str = "tiny") -> dict[str, torch.Tensor]:
    from diffusers.loaders import single_file_utils as sfu

    if comp == "unet":
        return sfu.convert_ldm_unet_checkpoint(sd, dict(config))
    if comp == "vae":
        return sfu.convert_ldm_vae_checkpoint(sd, dict(config))
    prefix = TE_PREFIXES[arch][comp]
    if architecture_dims(arch, size)[comp]["kind"] == "clip_l":
        return sfu.convert_ldm_clip_checkpoint(sd, remove_prefix=prefix.replace("text_model.", ""))
    return sfu.convert_open_clip_checkpoint(module, sd, prefix=prefix)


def _fit_name(name: str, want: set[str]) -> str | None:
    if name in want:
        return name
    if name.startswith("text_model.") and name[len("text_model."):] in want:
        return name[len("text_model."):]
    if "text_model." + name in want:
        return "text_model." + name
    return None


def trace_size(arch: str, size: str = "tiny") -> str:
    """The layout a map is traced on: the module's own size when it is small (``tiny``, ``world``), ``tiny`` for
    ``full`` (same key names and block structure; placeholders at full size would take gigabytes). ``world`` needs its
    own trace: its channel multipliers differ, so it has other ``skip_connection`` keys."""
    return size if size in ("tiny", "world") else "tiny"


def trace_key_map(arch: str, comp: str, module: torch.nn.Module, config: Mapping[str, Any], size: str = "tiny") -> KeyMap:
    """Build the key map of ``comp`` by running diffusers' conversion on id-valued placeholders (small layout).

    ``module`` is the live module (only its ``state_dict()`` names are used) and ``config`` its diffusers config; the
    conversion reads only block counts from it, which tiny and full sizes share, so the live config serves both."""
    size = trace_size(arch, size)
    layout = get_layout(arch, size)
    keys = {k: e.shape for k, e in layout.entries.items() if e.component == comp and e.dtype == "float"}
    sd, starts, names = _placeholders(keys)
    tiny_module = _tiny_module_for_trace(arch, comp, module, size)
    conv = _convert(arch, comp, sd, tiny_module, config, size)
    want = set(module.state_dict().keys())
    km = KeyMap(comp)
    used: set[str] = set()
    for name, out in conv.items():
        if not isinstance(out, torch.Tensor) or not out.is_floating_point() or out.numel() == 0:
            continue
        target = _fit_name(name, want)
        if target is None:
            if name.endswith("position_ids"):
                continue
            raise AssertionError(f"{arch} {comp}: converted key {name} has no parameter in {type(module).__name__}")
        i = bisect.bisect_right(starts, int(out.reshape(-1)[0].item())) - 1
        src_key = names[i]
        op, k, n = _classify(out, sd[src_key], starts[i])
        km.rules.setdefault(src_key, []).append(Rule(target, op, k, n))
        used.add(src_key)
    km.ignored = [k for k in layout.keys_of(comp) if k not in used]
    patterns = [re.compile(p) for p in IGNORED_PATTERNS[arch]]
    surprising = [k for k in km.ignored if not any(p.search(k) for p in patterns)]
    if surprising:
        raise AssertionError(f"{arch} {comp}: keys without a diffusers target that are not documented as ignored: {surprising[:5]}")
    return km


def _tiny_module_for_trace(arch: str, comp: str, module: torch.nn.Module, size: str = "tiny") -> Any:
    """OpenCLIP conversion reads ``hidden_size`` from the model config when a file lacks ``text_projection``: give it
    an object with the traced layout's width so the split of its placeholders is correct."""
    if comp in ("te0", "te1") and architecture_dims(arch, size)[comp]["kind"] == "open_clip":
        width = architecture_dims(arch, size)[comp]["width"]

        class _Cfg:
            hidden_size = width

        class _Holder:
            config = _Cfg()

        return _Holder()
    return module


def key_map(arch: str, comp: str, module: torch.nn.Module, config: Mapping[str, Any], size: str = "tiny") -> KeyMap:
    """The (cached) key map of a component for a module with these state_dict names (``size``: the module's)."""
    sig = (arch, comp, type(module).__name__, tuple(module.state_dict().keys()), trace_size(arch, size))
    if sig not in _KEYMAP_CACHE:
        _KEYMAP_CACHE[sig] = trace_key_map(arch, comp, module, config, size)
    return _KEYMAP_CACHE[sig]


_KEYMAP_CACHE: dict[tuple, KeyMap] = {}


class SwapSink:
    """Merge sink (``begin`` / ``consume`` / ``end``) that copies canonical tensors into the live modules' parameters.

    Built once per pipeline: ``targets`` resolves every canonical key to the parameter objects it feeds, so a swap is
    a dictionary lookup and a ``copy_`` per tensor (dtype / device conversion included) under ``torch.no_grad()``.
    Only components that are emitted are touched; parameters keep their storage (``data_ptr``) across swaps."""

    def __init__(self, arch: str, targets: dict[str, list[tuple[torch.nn.Parameter, Rule]]], component_keys: dict[str, set[str]]):
        self.arch = arch
        self._targets = targets
        self._component_keys = component_keys
        self._cuda = any(p.is_cuda for rs in targets.values() for p, _ in rs)
        self.seen: set[str] = set()
        self._written: set[str] = set()
        self.ignored: list[str] = []
        self.components: list[str] = []
        #: per component touched by the last swap, canonical keys that were not emitted (their old values stay)
        self.not_updated: dict[str, list[str]] = {}

    def begin(self, plan: list[Any]) -> None:
        self.seen = set()
        self._written = set()
        self.ignored = []
        self.components = sorted({p.component for p in plan if p.component in self._component_keys})

    def direct_target(self, key: str) -> torch.Tensor | None:
        """A flat view of the one parameter ``key`` fills by a plain reshape, for the merge kernel to write its
        final narrowing pass into (fused, while the slice is in cache) instead of a second full pass in
        :meth:`consume`. ``None`` for keys with a transpose / q-k-v split or several targets (they are copied).
        Called from merge worker threads: read-only lookups only."""
        rules = self._targets.get(key)
        if rules is None or len(rules) != 1:
            return None
        param, rule = rules[0]
        if rule.op != "reshape" or not param.is_contiguous():
            return None
        return param.detach().view(-1)

    def mark_written(self, key: str) -> None:
        """The kernel wrote ``key`` through :meth:`direct_target`: :meth:`consume` only records it."""
        self._written.add(key)

    def consume(self, key: str, tensor: torch.Tensor) -> None:
        rules = self._targets.get(key)
        if rules is None:
            self.ignored.append(key)  # non-merge keys and the documented no-target keys
            return
        if key in self._written:
            self._written.discard(key)
        else:
            with torch.no_grad():
                for param, rule in rules:
                    param.copy_(rule.apply(tensor, param.shape))
        self.seen.add(key)
        comp = component_of(self.arch, key)
        if comp and comp not in self.components:
            self.components.append(comp)

    def end(self) -> None:
        if self._cuda:
            torch.cuda.synchronize()  # the swap is complete before the next render reads the weights
        self.not_updated = {c: sorted(self._component_keys[c] - self.seen) for c in self.components
                            if self._component_keys[c] - self.seen}

    def abort(self) -> None:
        """A failed merge leaves the touched components partly updated; the next complete swap repairs them."""
        self.not_updated = {c: sorted(self._component_keys[c] - self.seen) for c in self.components}
