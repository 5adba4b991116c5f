"""The offline renderer: a diffusers pipeline built once per study, whose weights are swapped in place per trial.

Why build modules ourselves instead of ``from_single_file``: the same traced key map (``swap.py``) that loads the
base checkpoint also serves every later swap, so the swap path is exercised by every build; modules are created on
the ``meta`` device and their parameters assigned straight from the (memory-mapped) file, so a full-size build never
pays for a random initialisation. Configs come from the shipped folders (``configs/<variant>[-tiny]/``) and the
tokenizer from open_clip's BPE file: nothing touches the network (``HF_HUB_OFFLINE=1`` is set defensively too).
``config_dir()`` materialises a complete folder for ``from_single_file(path, config=DIR, local_files_only=True)``.

The variant (which config folder, hence which prediction type and noise schedule) is read from the file when it
says: v-prediction markers or ModelSpec metadata (``checkpoint.prediction``) pick ``sdxl-v`` / ``sd2-v`` / ``sd2-eps``;
a v model sampled as epsilon renders noise, and the search would then optimise noise.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
import os
import shutil
from collections.abc import Iterator, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # defensive: every load below is local already

import torch  # noqa: E402
from PIL import Image  # noqa: E402

from astolfo_opt.checkpoint.io import open_checkpoint  # noqa: E402
from astolfo_opt.checkpoint.layout import canonical_key, detect_architecture, detect_size, get_layout  # noqa: E402
from astolfo_opt.checkpoint.prediction import Prediction, prediction_of  # noqa: E402
from astolfo_opt.errors import CheckpointError, ConfigError  # noqa: E402
from astolfo_opt.merge.plan import resolve_device  # noqa: E402
from astolfo_opt.render.make_configs import VARIANTS, folder_name  # noqa: E402
from astolfo_opt.render.prompts import Prompt  # noqa: E402
from astolfo_opt.render.settings import SCHEDULERS, RenderSettings  # noqa: E402
from astolfo_opt.render.swap import KeyMap, Rule, SwapSink, key_map  # noqa: E402
from astolfo_opt.render.tokenizer import cache_root, load_tokenizer, vocab_dir  # noqa: E402

log = logging.getLogger(__name__)

#: merge component -> diffusers pipeline attribute
MODULE_OF = {"unet": "unet", "te0": "text_encoder", "te1": "text_encoder_2", "vae": "vae"}
DEFAULT_VARIANT = {"sd1": "sd1", "sdxl": "sdxl"}
#: (architecture, prediction type the file states) -> the variant picked when none is given
PREDICTION_VARIANT = {(arch, pred): v for v, (arch, pred, _) in VARIANTS.items()}
#: ``guidance_rescale`` used when the settings leave it unset and the scheduler has zero terminal SNR: diffusers'
#: recommended value (0.7, from "Common Diffusion Noise Schedules and Sample Steps are Flawed", sec. 3.4); without
#: it CFG over-exposes zero-terminal-SNR models. Epsilon / non-ZTSNR variants keep diffusers' default 0.
ZTSNR_GUIDANCE_RESCALE = 0.7


def resolve_variant(arch: str, variant: str | None, path: str | Path = "checkpoint", config_key: str = "pool.variant",
                    prediction: str | None = None) -> str:
    """The render variant for a file of ``arch``.

    ``prediction`` is what the file itself states (``checkpoint.prediction``: "epsilon" | "v_prediction" | None). Without
    an explicit ``variant`` it picks the variant (``sdxl-v`` for v-prediction SDXL, ``sd2-v`` / ``sd2-eps``); SD2 that
    states nothing must be told (768-v and 512-base have the same keys). An explicit variant always wins, since the
    user may know better than a stale marker, but one that contradicts the file is logged as a warning naming both."""
    if variant in (None, "", "auto"):
        if prediction is not None:
            picked = PREDICTION_VARIANT.get((arch, prediction))
            if picked is None:
                raise ConfigError(f"{path}: the file states prediction type {prediction} but there is no {arch} render variant "
                                  f"for it (variants: {', '.join(VARIANTS)}); set {config_key} to render it anyway")
            return picked
        if arch == "sd2":
            raise ConfigError(f"{path}: SD2 checkpoints are either v-prediction (768-v) or epsilon (512-base) and the file "
                              f"does not say which: set {config_key}=sd2-v or {config_key}=sd2-eps")
        return DEFAULT_VARIANT[arch]
    if variant not in VARIANTS:
        raise ConfigError(f"{config_key}={variant!r} is unknown; use one of {', '.join(VARIANTS)}")
    if VARIANTS[variant][0] != arch:
        raise ConfigError(f"{config_key}={variant!r} is for {VARIANTS[variant][0]} but {path} is an {arch} checkpoint")
    if prediction is not None and VARIANTS[variant][1] != prediction:
        log.warning("%s: %s=%s renders with prediction type %s, but the file states prediction type %s (variant %s); "
                    "the images are likely noise", path, config_key, variant, VARIANTS[variant][1], prediction,
                    PREDICTION_VARIANT.get((arch, prediction), "none"))
    return variant


def _config_folder(variant: str, size: str):
    return resources.files("astolfo_opt.render").joinpath("configs", folder_name(variant, size))


def load_config(variant: str, size: str, sub: str) -> dict[str, Any]:
    """One shipped config (``unet/config.json``, ``scheduler/scheduler_config.json``...) as a dict."""
    return json.loads(_config_folder(variant, size).joinpath(sub).read_text())


def config_dir(variant: str, size: str = "full") -> Path:
    """A complete diffusers config folder (shipped JSON + generated tokenizer vocab) in the cache, for
    ``from_single_file(path, config=DIR, local_files_only=True)``. Content-addressed, built once."""
    src = Path(str(_config_folder(variant, size)))
    files = sorted(p for p in src.rglob("*") if p.is_file())
    h = hashlib.sha256()
    for p in files:
        h.update(str(p.relative_to(src)).encode() + b"\0" + p.read_bytes())
    target = cache_root() / "diffusers-configs" / f"{folder_name(variant, size)}-{h.hexdigest()[:12]}"
    if (target / ".complete").is_file():
        return target
    tmp = target.with_name(target.name + f".partial-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp)
    vocab = vocab_dir()
    for tok in ("tokenizer", "tokenizer_2"):
        if (tmp / tok).is_dir():
            for name in ("vocab.json", "merges.txt"):
                shutil.copyfile(vocab / name, tmp / tok / name)
    (tmp / ".complete").write_text("ok\n")
    try:
        tmp.rename(target)
    except OSError:  # another process won the race
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _build_modules(arch: str, variant: str, size: str) -> dict[str, torch.nn.Module]:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    mods: dict[str, torch.nn.Module] = {}
    with torch.device("meta"):
        mods["unet"] = UNet2DConditionModel.from_config(load_config(variant, size, "unet/config.json"))
        mods["vae"] = AutoencoderKL.from_config(load_config(variant, size, "vae/config.json"))
        for comp, sub in (("te0", "text_encoder"), ("te1", "text_encoder_2")):
            if comp == "te1" and arch != "sdxl":
                continue
            cfg = load_config(variant, size, f"{sub}/config.json")
            cls = CLIPTextModelWithProjection if cfg["architectures"][0] == "CLIPTextModelWithProjection" else CLIPTextModel
            cfg = {k: v for k, v in cfg.items() if k not in ("architectures", "model_type", "torch_dtype")}
            mods[comp] = cls(CLIPTextConfig(**cfg))
    return mods


def _set_tensor(module: torch.nn.Module, name: str, value: torch.Tensor, param: bool) -> None:
    owner_name, _, leaf = name.rpartition(".")
    owner = module.get_submodule(owner_name) if owner_name else module
    if param:
        owner._parameters[leaf] = torch.nn.Parameter(value, requires_grad=False)
    else:
        owner._buffers[leaf] = value


class RenderPipeline:
    """A resident diffusers pipeline plus the parameter map that lets merged weights be swapped in place."""

    def __init__(self, pipe: Any, modules: dict[str, torch.nn.Module], maps: dict[str, KeyMap], *, arch: str, variant: str,
                 size: str, device: torch.device, dtype: torch.dtype, checkpoint: Path, filled: list[str],
                 prediction: Prediction | None = None):
        self.pipe = pipe
        self.modules = modules
        self.maps = maps
        self.arch, self.variant, self.size = arch, variant, size
        self.device, self.dtype = device, dtype
        self.checkpoint = checkpoint
        #: optional keys the base file lacked, zero-filled at build (a swap that emits them overwrites them)
        self.filled = filled
        #: what the base file states about its prediction type (None: not read, e.g. a hand-built pipeline)
        self.prediction = prediction
        self._targets: dict[str, list[tuple[torch.nn.Parameter, Rule]]] = {}
        for comp, km in maps.items():
            params = dict(modules[comp].named_parameters())
            for key, rules in km.rules.items():
                self._targets[key] = [(params[r.target], r) for r in rules]
        self._component_keys = {comp: set(km.rules) for comp, km in maps.items()}
        self._scheduler_config = dict(pipe.scheduler.config)
        self._schedulers: dict[str, Any] = {}

    def __repr__(self) -> str:
        return f"RenderPipeline({self.variant!r}, size={self.size!r}, device={self.device}, dtype={self.dtype})"

    # ------------------------------------------------------------------------------------------------- weights
    def swap_sink(self) -> SwapSink:
        """A merge sink writing canonical tensors into the live parameters (only the components it receives)."""
        return SwapSink(self.arch, self._targets, self._component_keys)

    def parameters_of(self, component: str) -> dict[str, torch.nn.Parameter]:
        return dict(self.modules[component].named_parameters())

    # ------------------------------------------------------------------------------------------------- render
    @property
    def prediction_type(self) -> str:
        """What the pipeline samples as (the variant's prediction type, not necessarily what the file states)."""
        return VARIANTS[self.variant][1]

    @property
    def ztsnr(self) -> bool:
        """Whether the noise schedule has zero terminal SNR (``sdxl-v``)."""
        return bool(self._scheduler_config.get("rescale_betas_zero_snr"))

    def guidance_rescale(self, settings: RenderSettings) -> float:
        """The ``guidance_rescale`` passed to diffusers: the setting, else 0.7 on a zero-terminal-SNR schedule, else 0."""
        if settings.guidance_rescale is not None:
            return float(settings.guidance_rescale)
        return ZTSNR_GUIDANCE_RESCALE if self.ztsnr else 0.0

    def scheduler(self, name: str) -> Any:
        """The diffusers scheduler for a settings name, built from the shipped scheduler config (cached), so it keeps
        the variant's prediction type, zero-terminal-SNR betas and timestep spacing. A scheduler class that cannot
        take zero terminal SNR (PNDM) would silently drop it and render a schedule the model was not trained on, so it
        is refused for such a variant."""
        if name not in self._schedulers:
            if name not in SCHEDULERS:
                raise ConfigError(f"render.scheduler={name!r} is unknown; use one of {', '.join(SCHEDULERS)}")
            import diffusers

            cls_name, extra = SCHEDULERS[name]
            cls = getattr(diffusers, cls_name)
            if self.ztsnr and "rescale_betas_zero_snr" not in inspect.signature(cls.__init__).parameters:
                ok = [n for n, (c, _) in SCHEDULERS.items()
                      if "rescale_betas_zero_snr" in inspect.signature(getattr(diffusers, c).__init__).parameters]
                raise ConfigError(f"render.scheduler={name} cannot sample the zero-terminal-SNR schedule of variant {self.variant}; "
                                  f"use one of {', '.join(ok)}")
            self._schedulers[name] = cls.from_config(self._scheduler_config, **extra)
        return self._schedulers[name]

    def render_batches(self, prompts: Sequence[Prompt], settings: RenderSettings) -> Iterator[list[tuple[Prompt, Image.Image]]]:
        """Render ``settings.batch_size`` prompts per pipeline call; each prompt's noise comes from a CPU generator
        seeded with its own seed, so the noise does not depend on batch size, order or other prompts (images are
        bit-identical for the same batch size; batching itself may change float rounding)."""
        self.pipe.scheduler = self.scheduler(settings.scheduler)
        prompts = list(prompts)
        for i in range(0, len(prompts), settings.batch_size):
            chunk = prompts[i:i + settings.batch_size]
            kwargs: dict[str, Any] = dict(
                prompt=[p.prompt for p in chunk], negative_prompt=[p.negative for p in chunk], width=settings.width,
                height=settings.height, num_inference_steps=settings.steps, guidance_scale=float(settings.guidance_scale),
                guidance_rescale=self.guidance_rescale(settings), output_type="pil",
                generator=[torch.Generator("cpu").manual_seed(int(p.seed)) for p in chunk])
            if settings.clip_skip and self.arch in ("sd1", "sd2"):
                kwargs["prompt_embeds"] = self.clip_skip_embeds(kwargs.pop("prompt"), int(settings.clip_skip))
                kwargs["negative_prompt_embeds"] = self.clip_skip_embeds(kwargs.pop("negative_prompt"), int(settings.clip_skip))
            elif settings.clip_skip:
                kwargs["clip_skip"] = int(settings.clip_skip)
            with torch.inference_mode():
                images = self.pipe(**kwargs).images
            yield list(zip(chunk, images, strict=True))

    def clip_skip_embeds(self, texts: list[str], clip_skip: int) -> torch.Tensor:
        """SD1 / SD2 prompt embeddings with clip skip, by diffusers' convention (hidden state ``-(clip_skip + 1)``, then
        the final layer norm). Computed here because diffusers' SD pipeline reaches for
        ``text_encoder.text_model.final_layer_norm``, which transformers 5.x's flattened ``CLIPTextModel`` lacks, so
        passing ``clip_skip`` through crashes; SDXL's pipeline takes a hidden state without that attribute."""
        tok, te = self.pipe.tokenizer, self.pipe.text_encoder
        ids = tok(texts, padding="max_length", max_length=tok.model_max_length, truncation=True, return_tensors="pt")
        mask = ids.attention_mask.to(self.device) if getattr(te.config, "use_attention_mask", False) else None
        with torch.inference_mode():
            hidden = te(ids.input_ids.to(self.device), attention_mask=mask, output_hidden_states=True).hidden_states
            norm = te.text_model.final_layer_norm if hasattr(te, "text_model") else te.final_layer_norm
            return norm(hidden[-(clip_skip + 1)]).to(te.dtype)

    def render(self, prompts: Sequence[Prompt], settings: RenderSettings) -> list[Image.Image]:
        return [img for batch in self.render_batches(prompts, settings) for _, img in batch]


def build_pipeline(checkpoint: str | Path, *, variant: str | None = None, device: str | torch.device = "auto",
                   dtype: torch.dtype | None = None, config_key: str = "pool.variant") -> RenderPipeline:
    """Build the pipeline once from a local checkpoint (tiny or full picked from its shapes); no network.

    ``dtype`` defaults to fp16 on CUDA and fp32 on CPU. Without ``variant`` it is picked from what the file states
    (:func:`resolve_variant`). Missing required weights raise a one-line :class:`CheckpointError` naming the file; SD2
    stating no prediction type and given no ``variant`` raises a :class:`ConfigError` naming ``config_key``."""
    path = Path(checkpoint).expanduser()
    if not path.is_file():
        raise CheckpointError(path, "file not found", "give the path of a local .safetensors / .ckpt model")
    dev = resolve_device(device)
    dtype = dtype or (torch.float16 if dev.type == "cuda" else torch.float32)
    reader = open_checkpoint(path)
    try:
        raw_keys = list(reader.keys())
        arch = detect_architecture(raw_keys)
        if arch is None:
            raise CheckpointError(path, "not a Stable Diffusion checkpoint (no SD1 / SD2 / SDXL keys found)")
        index = {canonical_key(arch, k): k for k in raw_keys}
        size = detect_size(arch, {c: tuple(reader.info(r).shape) for c, r in index.items()})
        if size is None:
            raise CheckpointError(path, f"UNet shapes match no known {arch} size", "the renderer supports full-size SD1 / SD2 / SDXL")
        prediction = prediction_of(reader)
        for problem in prediction.problems:
            log.warning("%s: %s", path, problem)
        variant = resolve_variant(arch, variant, path, config_key, prediction=prediction.type)
        modules = _build_modules(arch, variant, size)
        layout = get_layout(arch, size)
        maps: dict[str, KeyMap] = {}
        filled: list[str] = []
        for comp, module in modules.items():
            cfg = load_config(variant, size, f"{ {'te0': 'text_encoder', 'te1': 'text_encoder_2'}.get(comp, comp)}/config.json")
            km = key_map(arch, comp, module, cfg, size)
            maps[comp] = km
            metas = dict(module.named_parameters())
            missing = []
            for key, rules in km.rules.items():
                raw = index.get(key)
                if raw is None:
                    entry = layout.entries.get(key)
                    if entry is not None and entry.optional:
                        filled.append(key)
                        for r in rules:
                            _set_tensor(module, r.target, torch.zeros(metas[r.target].shape, dtype=dtype, device=dev), True)
                        continue
                    missing.append(key)
                    continue
                t = reader.get(raw)
                for r in rules:
                    shape = tuple(metas[r.target].shape)
                    if t.numel() != r.source_numel(shape):
                        raise CheckpointError(path, f"tensor {raw} has shape {tuple(t.shape)}, which does not fit {variant} "
                                              f"({size}) {MODULE_OF[comp]}.{r.target} {shape}",
                                              "is the file corrupt or another architecture?")
                    value = torch.empty(shape, dtype=dtype, device=dev)
                    value.copy_(r.apply(t, shape))
                    _set_tensor(module, r.target, value, True)
            if missing:
                raise CheckpointError(path, f"{len(missing)} {comp} weight(s) missing, e.g. {missing[0]}",
                                      "a pruned file cannot be rendered alone: use a complete model as the pool base")
            for name, buf in list(module.named_buffers()):
                if buf.is_meta:
                    if not name.endswith("position_ids"):  # pragma: no cover - a new buffer in a future transformers
                        raise CheckpointError(path, f"internal: buffer {name} of {comp} has no value")
                    _set_tensor(module, name, torch.arange(buf.shape[-1], device=dev).expand(buf.shape).clone(), False)
            left = [n for n, p in module.named_parameters() if p.is_meta]
            if left:  # pragma: no cover - the traced map and the module disagree
                raise CheckpointError(path, f"internal: {len(left)} {comp} parameter(s) have no source, e.g. {left[0]}")
            module.eval().requires_grad_(False)
        if filled:
            log.warning("%s: %d optional weight(s) absent, zero-filled (e.g. %s)", path, len(filled), filled[0])
    finally:
        reader.close()
    pipe = _assemble(arch, variant, size, modules)
    return RenderPipeline(pipe, modules, maps, arch=arch, variant=variant, size=size, device=dev, dtype=dtype,
                          checkpoint=path, filled=filled, prediction=prediction)


def _assemble(arch: str, variant: str, size: str, modules: dict[str, torch.nn.Module]) -> Any:
    from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline

    scheduler = EulerDiscreteScheduler.from_config(load_config(variant, size, "scheduler/scheduler_config.json"))
    if arch == "sdxl":
        pipe = StableDiffusionXLPipeline(vae=modules["vae"], text_encoder=modules["te0"], text_encoder_2=modules["te1"],
                                         tokenizer=load_tokenizer("eos"), tokenizer_2=load_tokenizer("bang"), unet=modules["unet"],
                                         scheduler=scheduler, force_zeros_for_empty_prompt=True, add_watermarker=False)
    else:
        pipe = StableDiffusionPipeline(vae=modules["vae"], text_encoder=modules["te0"], unet=modules["unet"], scheduler=scheduler,
                                       tokenizer=load_tokenizer("bang" if arch == "sd2" else "eos"), safety_checker=None,
                                       feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe
