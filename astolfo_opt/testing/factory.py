"""Checkpoint factory: SD1 / SD2 / SDXL files with the real key names, tiny or full size, healthy or broken.

Shared by tests, the demo and the benchmarks so all three exercise exactly the layouts real files have. Values are
deterministic per ``(seed, key)`` (a key's tensor does not depend on which other keys are written), so two models
made with the same component seed carry a bit-identical component, and a pool is "a base plus independent
deltas of a chosen spread" - the structure real finetunes of one base have. Files are streamed tensor by tensor,
so a full-size SDXL file is generated in bounded memory.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from astolfo_opt.checkpoint import spec
from astolfo_opt.checkpoint.io import open_checkpoint
from astolfo_opt.checkpoint.layout import component_of
from astolfo_opt.checkpoint.writer import SafetensorsWriter, atomic_write_bytes

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32, "fp8_e4m3": torch.float8_e4m3fn,
          "fp8_e5m2": torch.float8_e5m2}
#: prediction marker forms: ``empty`` (what v-pred SDXL files carry: an empty tensor), and two hostile ones
MARKER_FORMS = {"empty": (torch.int64, (0,)), "data": (torch.int64, (3,)), "bool": (torch.bool, (0,))}


def _seed(*parts: object) -> int:
    h = hashlib.blake2b("\x1f".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") & ((1 << 63) - 1)


def _randn(shape: Sequence[int], *parts: object) -> torch.Tensor:
    g = torch.Generator().manual_seed(_seed(*parts))
    return torch.randn(tuple(shape), generator=g, dtype=torch.float32)


def ddpm_schedule(steps: int = 1000, start: float = 0.00085, end: float = 0.012) -> dict[str, torch.Tensor]:
    """The LDM ``scaled_linear`` DDPM buffers that many SD1 / SD2 / SDXL files carry."""
    betas = torch.linspace(start**0.5, end**0.5, steps, dtype=torch.float64) ** 2
    ac = torch.cumprod(1 - betas, 0)
    acp = torch.cat([torch.ones(1, dtype=torch.float64), ac[:-1]])
    post_var = betas * (1 - acp) / (1 - ac)
    bufs = {
        "betas": betas, "alphas_cumprod": ac, "alphas_cumprod_prev": acp, "sqrt_alphas_cumprod": ac.sqrt(),
        "sqrt_one_minus_alphas_cumprod": (1 - ac).sqrt(), "log_one_minus_alphas_cumprod": (1 - ac).log(),
        "sqrt_recip_alphas_cumprod": (1 / ac).sqrt(), "sqrt_recipm1_alphas_cumprod": (1 / ac - 1).sqrt(),
        "posterior_variance": post_var, "posterior_log_variance_clipped": post_var.clamp(min=1e-20).log(),
        "posterior_mean_coef1": betas * acp.sqrt() / (1 - ac), "posterior_mean_coef2": (1 - acp) * (1 - betas).sqrt() / (1 - ac),
    }
    return {k: v.float() for k, v in bufs.items()}


def base_value(key: str, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """A plausible initial value for ``key``: unit norms, zero-ish biases, fan-in scaled weights."""
    leaf = key.rsplit(".", 1)[-1]
    if key.endswith("position_ids"):
        return torch.arange(shape[-1], dtype=torch.int64).reshape(shape)
    if leaf == "logit_scale":
        return torch.full(shape, math.log(1 / 0.07))
    is_norm = any(n in key for n in ("norm", "ln_", "layer_norm")) and len(shape) == 1
    if is_norm and leaf == "weight":
        return torch.ones(shape) + 0.02 * _randn(shape, seed, key)
    if leaf in ("bias", "in_proj_bias") or (is_norm and leaf == "bias"):
        return 0.02 * _randn(shape, seed, key)
    if "embedding" in key:
        return 0.02 * _randn(shape, seed, key)
    fan_in = math.prod(shape[1:]) if len(shape) > 1 else shape[0]
    return _randn(shape, seed, key) / math.sqrt(max(fan_in, 1))


@dataclass
class ModelSpec:
    """What to generate. Defaults give a healthy fp16 tiny SD1 model."""

    arch: str = "sd1"
    size: str = "tiny"
    seed: int = 0
    #: values are ``base(base_seed) + spread * noise(seed)``: a finetune of a shared base
    base_seed: int = 1234
    spread: float = 0.05
    dtype: str = "fp16"
    fmt: str = "safetensors"  # or "ckpt" (torch zip pickle holding {"state_dict": ...})
    #: per component, a seed that replaces ``seed`` (same value => bit-identical component across models)
    component_seeds: dict[str, int] = field(default_factory=dict)
    #: per component, a fraction of its keys to omit (1.0 = component missing): pruned files
    drop: dict[str, float] = field(default_factory=dict)
    ema: bool = False  # add LDM ``model_ema.*`` copies (SD1 / SD2 layout)
    schedule: bool = False  # add the DDPM buffers
    old_style_te: bool = False  # SD1 CLIP without ``text_model.``
    position_ids: str = "int"  # int | float | shuffled | missing
    #: key -> "nan" | "inf": plant non-finite values in that tensor
    corrupt: dict[str, str] = field(default_factory=dict)
    #: component -> model file to copy that component from, bit for bit
    copy_components: dict[str, str | Path] = field(default_factory=dict)
    #: key -> multiplier applied to that model's delta (e.g. 10.0 for a far-off outlier)
    spread_scale: dict[str, float] = field(default_factory=dict)
    metadata: dict[str, str] = field(default_factory=dict)
    #: prediction marker key (``v_pred`` / ``ztsnr``) -> form (:data:`MARKER_FORMS`); e.g. a NoobAI v-pred file:
    #: ``{"v_pred": "empty", "ztsnr": "empty"}``. ModelSpec statements go in ``metadata`` (``modelspec.*``)
    markers: dict[str, str] = field(default_factory=dict)


def _component_seed(s: ModelSpec, comp: str) -> int:
    return s.component_seeds.get(comp, s.seed)


def plan(s: ModelSpec) -> list[tuple[str, torch.dtype, tuple[int, ...]]]:
    """``(key, dtype, shape)`` of every tensor the model will hold, in file order (key names before renaming)."""
    dtype = DTYPES[s.dtype]
    out = []
    keys = spec.checkpoint_keys(s.arch, s.size)
    for ks in keys:
        comp = component_of(s.arch, ks.key) or "other"
        frac = s.drop.get(comp, 0.0)
        if frac and (frac >= 1.0 or (_seed(s.seed, "drop", ks.key) % 10_000) / 10_000 < frac):
            continue
        if ks.key.endswith("position_ids"):
            if s.position_ids == "missing":
                continue
            out.append((ks.key, torch.float32 if s.position_ids == "float" else torch.int64, ks.shape))
            continue
        out.append((ks.key, dtype, ks.shape))
    if s.ema and s.arch in ("sd1", "sd2") and s.drop.get("unet", 0.0) < 1.0:
        out += [(spec.ema_key(k.key), dtype, k.shape) for k in keys if k.key.startswith(spec.UNET_PREFIX)]
        out += [("model_ema.decay", torch.float32, ()), ("model_ema.num_updates", torch.int32, ())]
    if s.schedule:
        out += [(k, torch.float32, (1000,)) for k in spec.SCHEDULE_KEYS]
    out += [(k, *MARKER_FORMS[form]) for k, form in s.markers.items()]
    return out


def _value(s: ModelSpec, key: str, shape: tuple[int, ...], sources: Mapping[str, object]) -> torch.Tensor:
    if key.endswith("position_ids"):
        pos = torch.arange(shape[-1], dtype=torch.int64).reshape(shape)
        if s.position_ids == "float":
            return pos.float() - 1e-4 * _randn(shape, s.seed, key).abs()
        if s.position_ids == "shuffled":
            g = torch.Generator().manual_seed(_seed(s.seed, "perm"))
            return pos[:, torch.randperm(shape[-1], generator=g)]
        return pos
    if key.startswith("model_ema."):
        if key == "model_ema.decay":
            return torch.tensor(0.9999)
        if key == "model_ema.num_updates":
            return torch.tensor(1000, dtype=torch.int32)
        unet_key = next(k.key for k in spec.checkpoint_keys(s.arch, s.size) if spec.ema_key(k.key) == key) \
            if key not in _EMA_CACHE else _EMA_CACHE[key]
        return base_value(unet_key, shape, s.base_seed) * 0.999
    if key in spec.SCHEDULE_KEYS:
        return ddpm_schedule()[key]
    if key in s.markers:
        dtype, mshape = MARKER_FORMS[s.markers[key]]
        return torch.arange(math.prod(mshape)).reshape(mshape).to(dtype)
    comp = component_of(s.arch, key) or "other"
    if comp in sources:
        return sources[comp].get(key).clone()  # type: ignore[attr-defined]
    t = base_value(key, shape, s.base_seed)
    if t.is_floating_point() and not key.endswith("logit_scale"):
        scale = s.spread * s.spread_scale.get(key, s.spread_scale.get(comp, 1.0))
        if scale:
            std = float(t.std()) if t.numel() > 1 else 0.02
            t = t + scale * max(std, 0.02) * _randn(shape, _component_seed(s, comp), "delta", key)
    if key in s.corrupt:
        flat = t.reshape(-1)
        flat[:: max(1, flat.numel() // 3)] = float("nan") if s.corrupt[key] == "nan" else float("inf")
    return t


_EMA_CACHE: dict[str, str] = {}


def iter_tensors(s: ModelSpec) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(key, tensor)`` for the model described by ``s``, in file order (key names before renaming)."""
    for c in s.corrupt:
        if c not in {k.key for k in spec.checkpoint_keys(s.arch, s.size)}:
            raise ValueError(f"cannot corrupt {c}: not a key of {s.arch}")
    if s.ema:
        _EMA_CACHE.update({spec.ema_key(k.key): k.key for k in spec.checkpoint_keys(s.arch, s.size)
                           if k.key.startswith(spec.UNET_PREFIX)})
    sources = {c: open_checkpoint(p) for c, p in s.copy_components.items()}
    for key, dtype, shape in plan(s):
        yield key, _value(s, key, shape, sources).to(dtype)


def _rename(s: ModelSpec, key: str) -> str:
    if s.old_style_te and s.arch == "sd1" and key.startswith("cond_stage_model.transformer.text_model."):
        return "cond_stage_model.transformer." + key[len("cond_stage_model.transformer.text_model."):]
    return key


def make_checkpoint(path: str | Path, model: ModelSpec | None = None, **kwargs: object) -> Path:
    """Write one checkpoint described by ``model`` (or by ``ModelSpec(**kwargs)``) to ``path``; returns the path."""
    s = model or ModelSpec(**kwargs)  # type: ignore[arg-type]
    path = Path(path)
    meta = {"generator": "astolfo_opt.testing.factory", **s.metadata}
    if s.fmt == "ckpt":
        import io

        sd = {_rename(s, k): t for k, t in iter_tensors(s)}
        buf = io.BytesIO()
        torch.save({"state_dict": sd, "global_step": 1}, buf)
        atomic_write_bytes(path, buf.getvalue())
        return path
    with SafetensorsWriter(path, [(_rename(s, k), dt, sh) for k, dt, sh in plan(s)], meta) as w:
        for k, t in iter_tensors(s):
            w.write(_rename(s, k), t)
    return path


@dataclass
class Pool:
    """A generated pool: the base model and the finetunes around it."""

    base: Path
    models: list[Path]
    folder: Path

    @property
    def all(self) -> list[Path]:
        return [self.base, *self.models]


def make_pool(folder: str | Path, n: int = 4, arch: str = "sd1", size: str = "tiny", seed: int = 0,
              spreads: Sequence[float] | None = None, dtype: str = "fp16",
              overrides: Mapping[int, Mapping[str, object]] | None = None, base_seed: int = 1234) -> Pool:
    """``n`` finetunes of one base (``base.safetensors`` holds the base itself, spread 0) in ``folder``.

    ``spreads`` sets each model's delta size (default: varied 0.03-0.08); ``overrides[i]`` passes extra
    :class:`ModelSpec` fields to model ``i`` (pruned, NaN, copied component, outlier...).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    spreads = list(spreads) if spreads is not None else [0.03 + 0.05 * ((i * 7) % n) / max(n - 1, 1) for i in range(n)]
    base = make_checkpoint(folder / "base.safetensors", ModelSpec(arch=arch, size=size, seed=base_seed, base_seed=base_seed,
                                                                  spread=0.0, dtype=dtype))
    models = []
    for i in range(n):
        fields = {"arch": arch, "size": size, "seed": seed * 1000 + i + 1, "base_seed": base_seed, "spread": spreads[i],
                  "dtype": dtype, **(overrides or {}).get(i, {})}
        ext = ".ckpt" if fields.get("fmt") == "ckpt" else ".safetensors"
        models.append(make_checkpoint(folder / f"m{i:02d}{ext}", ModelSpec(**fields)))  # type: ignore[arg-type]
    return Pool(base=base, models=models, folder=folder)
