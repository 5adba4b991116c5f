"""A resident CLIP model (image + text towers) shared by every scorer that is built on it.

Why a separate object: CLIP similarity and the LAION aesthetic head both need the ViT-L/14 image embedding of each
rendered image. Loading ViT-L/14 twice would cost ~1.7 GB and encoding twice doubles the scoring time, so towers are
cached by their loading config (:func:`get_tower`) and :mod:`scorers.objectives` encodes once per tower.

Two backends, both strictly local (nothing is ever downloaded):

* ``open_clip``: ``model`` is any open_clip architecture name (built-in or registered from a JSON file given as
  ``model_config``) and ``pretrained`` a local weights file. Pretrained *tags* such as ``openai`` or
  ``laion2b_s32b_b82k`` are refused because open_clip would download them. OpenAI weights need the ``-quickgelu``
  architecture variant (e.g. ``ViT-L-14-quickgelu``).
* ``transformers``: ``hf_dir`` is a local ``CLIPModel`` folder (``config.json`` + weights); image preprocessing and
  tokenizer files come from ``processor_dir`` (default: ``hf_dir``), as PickScore ships them separately.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from astolfo_opt.errors import CheckpointError, ConfigError
from scorers.base import is_missing, require_dir, require_file, resolve_device, resolve_dtype

if TYPE_CHECKING:
    from PIL import Image

#: Shipped open_clip architecture JSON files (the tiny random test model lives here); registered on first use.
MODEL_CONFIG_DIR = Path(__file__).with_name("model_configs")

_TOWERS: dict[tuple, ClipTower] = {}
_LOCK = threading.Lock()
_REGISTERED: set[str] = set()


def register_model_config(path: str | Path) -> None:
    """Make the architectures in a JSON file (or a folder of them) known to open_clip, once per path."""
    import open_clip

    p = Path(path).expanduser().resolve()
    if str(p) in _REGISTERED:
        return
    open_clip.add_model_config(p)
    _REGISTERED.add(str(p))


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0][:300] if text else type(e).__name__


class ClipTower:
    """One loaded CLIP model in eval mode, with image encoding counters and a per-prompt text-embedding cache.

    Use :func:`get_tower` rather than the constructor so that equal configs share one resident model.
    """

    def __init__(self, *, model: str | None = None, pretrained: str | None = None, hf_dir: str | None = None,
                 processor_dir: str | None = None, model_config: str | None = None, device: str | torch.device = "auto",
                 dtype: str | None = "auto", batch_size: int = 16, config_key: str = "scorer"):
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        if int(batch_size) < 1:
            raise ConfigError(f"{config_key}.batch_size must be >= 1 (got {batch_size})")
        self.batch_size = int(batch_size)
        self.config_key = config_key
        #: number of :meth:`encode_images` calls and of images pushed through the image tower (tests count these)
        self.image_encode_calls = 0
        self.images_encoded = 0
        self.text_cache_hits = 0
        self.text_cache_misses = 0
        self._text_cache: dict[str, torch.Tensor] = {}
        self._lock = threading.Lock()
        if not is_missing(hf_dir):
            if not is_missing(pretrained) or not is_missing(model):
                raise ConfigError(f"{config_key}: give either hf_dir (transformers CLIP folder) or model + pretrained "
                                  "(open_clip), not both")
            self._load_transformers(hf_dir, processor_dir)
        else:
            self._load_open_clip(model, pretrained, model_config)
        self.model.eval().requires_grad_(False)

    # ----------------------------------------------------------------------------------------------------- loading
    def _load_open_clip(self, model: str | None, pretrained: str | None, model_config: str | None) -> None:
        import open_clip

        key = self.config_key
        register_model_config(MODEL_CONFIG_DIR)
        if not is_missing(model_config):
            register_model_config(require_file(model_config, f"{key}.model_config", "open_clip model config"))
        if is_missing(model):
            raise ConfigError(f"{key}.model is required: an open_clip architecture name such as ViT-L-14-quickgelu "
                              f"(or set {key}.hf_dir to a transformers CLIP folder)")
        model = str(model)
        if ":" in model.split("/")[0] and not model.startswith("local-dir:"):
            raise ConfigError(f"{key}.model={model!r} would download from a hub; use an architecture name with a local "
                              f"{key}.pretrained file")
        if model not in open_clip.list_models():
            raise ConfigError(f"{key}.model={model!r} is not an open_clip architecture; pick one of open_clip.list_models() "
                              f"or register a JSON config with {key}.model_config=/path/to/arch.json")
        if not is_missing(pretrained):
            p = Path(str(pretrained)).expanduser()
            tags = set(open_clip.list_pretrained_tags_by_model(model)) | {t for _, t in open_clip.list_pretrained()}
            if not p.is_file() and (str(pretrained) in tags or ("/" not in str(pretrained) and not p.suffix)):
                raise ConfigError(f"{key}.pretrained={pretrained!r} looks like an open_clip download tag; astolfo-opt never "
                                  f"downloads: download the weights yourself and set {key}.pretrained=/path/to/weights")
        path = require_file(pretrained, f"{key}.pretrained", "weights file")
        try:
            net, _, preprocess = open_clip.create_model_and_transforms(
                model, pretrained=str(path), device="cpu", pretrained_text=False, pretrained_image=False)
        except Exception as e:  # open_clip raises RuntimeError / KeyError / pickle errors for unusable files
            problem, hint = f"cannot load as open_clip {model}: {_first_line(e)}", f"check {key}.model matches the weights"
            if "torchscript" in str(e).lower():  # OpenAI's original ViT-*.pt files are JIT archives: unsafe to load
                problem = "is a TorchScript archive (OpenAI's original format), which cannot be loaded with weights_only"
                hint = "use the open_clip safetensors export (open_clip_model.safetensors) or a transformers CLIP folder via hf_dir"
            raise CheckpointError(path, problem, hint) from None
        self.backend = "open_clip"
        self.model_name = model
        self.source = str(path)
        self.model = net.to(self.device, self.dtype)
        self._preprocess = preprocess
        self._tokenizer = open_clip.get_tokenizer(model)
        self.embed_dim = int(net.text_projection.shape[1] if isinstance(net.text_projection, torch.Tensor)
                             else net.visual.output_dim)
        self.logit_scale = float(net.logit_scale.detach().float().exp().item())

    def _load_transformers(self, hf_dir: str, processor_dir: str | None) -> None:
        from transformers import AutoTokenizer, CLIPImageProcessor, CLIPModel

        key = self.config_key
        d = require_dir(hf_dir, f"{key}.hf_dir", "CLIP model directory", needs=("config.json",))
        pkey = f"{key}.processor_dir" if not is_missing(processor_dir) else f"{key}.hf_dir"
        pd = require_dir(processor_dir if not is_missing(processor_dir) else hf_dir, pkey, "CLIP processor directory",
                         needs=("preprocessor_config.json",))
        try:
            net = CLIPModel.from_pretrained(str(d), local_files_only=True, dtype=torch.float32)
        except Exception as e:
            raise CheckpointError(d, f"cannot load as a transformers CLIPModel: {_first_line(e)}") from None
        try:
            self._image_processor = CLIPImageProcessor.from_pretrained(str(pd), local_files_only=True)
            self._hf_tokenizer = AutoTokenizer.from_pretrained(str(pd), local_files_only=True)
        except Exception as e:
            raise CheckpointError(pd, f"cannot load CLIP processor / tokenizer files: {_first_line(e)}",
                                  "it needs preprocessor_config.json and tokenizer files") from None
        self.backend = "transformers"
        self.model_name = net.config.model_type
        self.source = str(d)
        self.model = net.to(self.device, self.dtype)
        self.embed_dim = int(net.config.projection_dim)
        self.logit_scale = float(net.logit_scale.detach().float().exp().item())
        self._max_len = int(net.config.text_config.max_position_embeddings)

    # ---------------------------------------------------------------------------------------------------- encoding
    @staticmethod
    def _features(out: Any) -> torch.Tensor:
        """transformers >= 5 returns a model output whose pooler_output is the projected embedding; older a tensor."""
        return out if isinstance(out, torch.Tensor) else out.pooler_output

    @torch.inference_mode()
    def _encode_image_batch(self, images: Sequence[Image.Image]) -> torch.Tensor:
        rgb = [im.convert("RGB") for im in images]
        if self.backend == "open_clip":
            x = torch.stack([self._preprocess(im) for im in rgb]).to(self.device, self.dtype)
            feats = self.model.encode_image(x)
        else:
            x = self._image_processor(images=rgb, return_tensors="pt")["pixel_values"].to(self.device, self.dtype)
            feats = self._features(self.model.get_image_features(pixel_values=x))
        return torch.nn.functional.normalize(feats.float(), dim=-1)

    @torch.inference_mode()
    def _encode_text_batch(self, prompts: Sequence[str]) -> torch.Tensor:
        if self.backend == "open_clip":
            tokens = self._tokenizer(list(prompts)).to(self.device)
            feats = self.model.encode_text(tokens)
        else:
            enc = self._hf_tokenizer(list(prompts), padding="max_length", truncation=True, max_length=self._max_len,
                                     return_tensors="pt")
            feats = self._features(self.model.get_text_features(input_ids=enc["input_ids"].to(self.device),
                                                                attention_mask=enc["attention_mask"].to(self.device)))
        return torch.nn.functional.normalize(feats.float(), dim=-1)

    def encode_images(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """``[N, embed_dim]`` fp32 L2-normalised image embeddings (on the tower's device), in ``batch_size`` chunks."""
        with self._lock:
            self.image_encode_calls += 1
            self.images_encoded += len(images)
            if not images:
                return torch.empty(0, self.embed_dim, device=self.device)
            chunks = [self._encode_image_batch(images[i:i + self.batch_size]) for i in range(0, len(images), self.batch_size)]
            return torch.cat(chunks)

    def encode_texts(self, prompts: Sequence[str]) -> torch.Tensor:
        """``[N, embed_dim]`` normalised text embeddings; each distinct prompt is encoded once per tower lifetime
        (the prompt set is fixed for a whole study, so after the first trial text encoding costs nothing)."""
        with self._lock:
            todo = list(dict.fromkeys(p for p in prompts if p not in self._text_cache))
            self.text_cache_hits += sum(1 for p in prompts if p in self._text_cache)
            self.text_cache_misses += len(todo)
            for i in range(0, len(todo), self.batch_size):
                chunk = todo[i:i + self.batch_size]
                for p, e in zip(chunk, self._encode_text_batch(chunk), strict=True):
                    self._text_cache[p] = e
            if not prompts:
                return torch.empty(0, self.embed_dim, device=self.device)
            return torch.stack([self._text_cache[p] for p in prompts])

    def __repr__(self) -> str:
        return f"ClipTower({self.backend}:{self.model_name}, {self.source}, {self.device}, {self.dtype})"


def _tower_key(kwargs: dict[str, Any]) -> tuple:
    """Cache key: what determines the loaded weights and where they run (not the config key used in messages)."""
    device = resolve_device(kwargs.get("device", "auto"))
    dtype = resolve_dtype(kwargs.get("dtype", "auto"), device)

    def norm(v: Any) -> str | None:
        return None if is_missing(v) else str(Path(str(v)).expanduser().resolve())

    model = kwargs.get("model")
    return (None if is_missing(model) else str(model), norm(kwargs.get("pretrained")), norm(kwargs.get("hf_dir")),
            norm(kwargs.get("processor_dir")), norm(kwargs.get("model_config")), str(device), str(dtype),
            int(kwargs.get("batch_size", 16)))


def get_tower(**kwargs: Any) -> ClipTower:
    """The resident :class:`ClipTower` for these loading arguments, loaded on first request and shared afterwards."""
    key = _tower_key(kwargs)
    with _LOCK:
        tower = _TOWERS.get(key)
        if tower is None:
            tower = ClipTower(**kwargs)
            _TOWERS[key] = tower
        return tower


def clear_towers() -> None:
    """Drop every resident tower (tests; or to free GPU memory between studies)."""
    with _LOCK:
        _TOWERS.clear()
