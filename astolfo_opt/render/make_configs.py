"""Generate the shipped diffusers config folders in ``astolfo_opt/render/configs/`` (developer tool).

Why a generator: the tiny configs must match the factory's tiny checkpoints exactly, and both come from
``checkpoint/layouts/architectures.yaml``; the full-size values are the released models' (SD1.5, SD2.1 768-v /
512-base, SDXL base 1.0). The JSON files it writes are what ships and what the renderer reads; a test checks that
they are in sync with this script. Run: ``python -m astolfo_opt.render.make_configs``.

Each folder holds ``model_index.json`` + a config per component + the two small tokenizer files; ``vocab.json`` and
``merges.txt`` are generated at run time from open_clip's BPE file (see ``tokenizer.py``) so the 1.5 MB vocabulary is
not shipped.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from astolfo_opt.checkpoint.spec import architecture_dims, sizes_of
from astolfo_opt.render.tokenizer import BOS_ID, EOS_ID, tokenizer_json

DIFFUSERS_VERSION = "0.42.1"
#: render variant -> (architecture, prediction type, full-size sample size in latent pixels)
VARIANTS: dict[str, tuple[str, str, int]] = {
    "sd1": ("sd1", "epsilon", 64),
    "sd2-v": ("sd2", "v_prediction", 96),
    "sd2-eps": ("sd2", "epsilon", 64),
    "sdxl": ("sdxl", "epsilon", 128),
    # NoobAI-XL / Illustrious v-prediction derivatives: SDXL base weights' shapes, v target, zero-terminal-SNR training
    "sdxl-v": ("sdxl", "v_prediction", 128),
}
#: variant -> scheduler settings beyond the SD training schedule. A zero-terminal-SNR v model must be sampled with the
#: rescaled betas it was trained on and from the last training timestep ("trailing"), as diffusers recommends for
#: such models (``EulerDiscreteScheduler`` docs; "Common Diffusion Noise Schedules and Sample Steps are Flawed",
#: arXiv 2305.08891, sec. 3.3): with "leading" spacing 20 steps start at t=951, never at pure noise.
SCHEDULER_EXTRA: dict[str, dict[str, Any]] = {
    "sdxl-v": {"rescale_betas_zero_snr": True, "timestep_spacing": "trailing"},
}
CONFIG_ROOT = Path(__file__).with_name("configs")


def folder_name(variant: str, size: str) -> str:
    return variant if size == "full" else f"{variant}-{size}"


def unet_config(arch: str, size: str, sample_size: int) -> dict[str, Any]:
    d = architecture_dims(arch, size)
    u = d["unet"]
    boc = [u["model_channels"] * m for m in u["channel_mult"]]
    depth = u["transformer_depth"]
    cfg: dict[str, Any] = {
        "_class_name": "UNet2DConditionModel", "_diffusers_version": DIFFUSERS_VERSION,
        "sample_size": sample_size if size == "full" else 8, "in_channels": u["in_channels"], "out_channels": u["out_channels"],
        "block_out_channels": boc, "layers_per_block": u["num_res_blocks"],
        "down_block_types": ["CrossAttnDownBlock2D" if t else "DownBlock2D" for t in depth],
        "up_block_types": ["CrossAttnUpBlock2D" if t else "UpBlock2D" for t in reversed(depth)],
        "cross_attention_dim": u["context_dim"], "use_linear_projection": u["linear_proj"],
        "attention_head_dim": u["num_heads"] or [c // u["num_head_channels"] for c in boc],
        "norm_num_groups": u.get("norm_groups", 32), "act_fn": "silu", "center_input_sample": False, "flip_sin_to_cos": True,
        "freq_shift": 0,
        "downsample_padding": 1, "mid_block_scale_factor": 1, "norm_eps": 1e-05,
        "upcast_attention": arch == "sd2" and sample_size == 96,
    }
    if arch == "sdxl":
        cfg.update(transformer_layers_per_block=[max(t, 1) for t in depth[:-1]] + [u["transformer_depth_middle"]],
                   addition_embed_type="text_time", addition_time_embed_dim=d["addition_time_embed_dim"],
                   projection_class_embeddings_input_dim=u["adm_in_channels"])
    return cfg


def vae_config(arch: str, size: str, sample_size: int) -> dict[str, Any]:
    v = architecture_dims(arch, size)["vae"]
    n = len(v["ch_mult"])
    return {
        "_class_name": "AutoencoderKL", "_diffusers_version": DIFFUSERS_VERSION,
        "block_out_channels": [v["ch"] * m for m in v["ch_mult"]], "down_block_types": ["DownEncoderBlock2D"] * n,
        "up_block_types": ["UpDecoderBlock2D"] * n, "layers_per_block": v["num_res_blocks"], "latent_channels": v["z_channels"],
        "in_channels": v["in_channels"], "out_channels": v["in_channels"], "norm_num_groups": v.get("norm_groups", 32), "act_fn": "silu",
        "sample_size": sample_size * 8 if size == "full" else 64,
        "scaling_factor": 0.13025 if arch == "sdxl" else 0.18215, "force_upcast": arch == "sdxl",
    }


def text_config(arch: str, size: str, te: str) -> dict[str, Any]:
    t = architecture_dims(arch, size)[te]
    open_clip = t["kind"] == "open_clip"
    with_projection = arch == "sdxl" and te == "te1"
    # diffusers' SD2 text encoder stops at the penultimate OpenCLIP layer (SD2 conditions on it): one layer fewer
    layers = t["layers"] - 1 if arch == "sd2" else t["layers"]
    return {
        "architectures": ["CLIPTextModelWithProjection" if with_projection else "CLIPTextModel"], "model_type": "clip_text_model",
        "hidden_size": t["width"], "intermediate_size": t["mlp"], "num_hidden_layers": layers, "num_attention_heads": t["heads"],
        "max_position_embeddings": t["context"], "vocab_size": t["vocab"], "hidden_act": "gelu" if open_clip else "quick_gelu",
        "projection_dim": t.get("projection", t["width"]), "layer_norm_eps": 1e-05, "attention_dropout": 0.0, "dropout": 0.0,
        "initializer_range": 0.02, "initializer_factor": 1.0, "bos_token_id": BOS_ID, "eos_token_id": EOS_ID, "pad_token_id": 1,
        "torch_dtype": "float32",
    }


def scheduler_config(prediction_type: str, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    # the SD training schedule; other schedulers are built from this one with from_config (settings.scheduler), so
    # ``extra`` (SCHEDULER_EXTRA: zero terminal SNR, trailing spacing) reaches them too
    return {
        "_class_name": "EulerDiscreteScheduler", "_diffusers_version": DIFFUSERS_VERSION, "num_train_timesteps": 1000,
        "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "prediction_type": prediction_type,
        "steps_offset": 1, "timestep_spacing": "leading", "interpolation_type": "linear", "use_karras_sigmas": False,
        "clip_sample": False, "set_alpha_to_one": False, "trained_betas": None, **(extra or {}),
    }


def model_index(arch: str) -> dict[str, Any]:
    if arch == "sdxl":
        return {"_class_name": "StableDiffusionXLPipeline", "_diffusers_version": DIFFUSERS_VERSION,
                "force_zeros_for_empty_prompt": True, "scheduler": ["diffusers", "EulerDiscreteScheduler"],
                "text_encoder": ["transformers", "CLIPTextModel"], "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
                "tokenizer": ["transformers", "CLIPTokenizer"], "tokenizer_2": ["transformers", "CLIPTokenizer"],
                "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"]}
    return {"_class_name": "StableDiffusionPipeline", "_diffusers_version": DIFFUSERS_VERSION, "requires_safety_checker": False,
            "feature_extractor": [None, None], "safety_checker": [None, None], "scheduler": ["diffusers", "EulerDiscreteScheduler"],
            "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
            "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"]}


def config_files(variant: str, size: str) -> dict[str, str]:
    """Relative path -> text of every file of one config folder."""
    arch, prediction, sample = VARIANTS[variant]

    def js(obj: dict[str, Any]) -> str:
        return json.dumps(obj, indent=2, sort_keys=True) + "\n"

    files = {"model_index.json": js(model_index(arch)), "unet/config.json": js(unet_config(arch, size, sample)),
             "vae/config.json": js(vae_config(arch, size, sample)), "text_encoder/config.json": js(text_config(arch, size, "te0")),
             "scheduler/scheduler_config.json": js(scheduler_config(prediction, SCHEDULER_EXTRA.get(variant)))}
    for name, text in tokenizer_json("bang" if arch == "sd2" else "eos").items():
        files[f"tokenizer/{name}"] = text
    if arch == "sdxl":
        files["text_encoder_2/config.json"] = js(text_config(arch, size, "te1"))
        for name, text in tokenizer_json("bang").items():
            files[f"tokenizer_2/{name}"] = text
    return files


def all_config_files() -> dict[str, str]:
    """Path relative to ``configs/`` -> text, for every shipped folder."""
    out = {}
    for variant in VARIANTS:
        for size in sizes_of(VARIANTS[variant][0]):
            for rel, text in config_files(variant, size).items():
                out[f"{folder_name(variant, size)}/{rel}"] = text
    return out


def main() -> None:  # pragma: no cover - developer tool
    root = Path(sys.argv[1]) if len(sys.argv) > 1 else CONFIG_ROOT
    for rel, text in all_config_files().items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    print(f"wrote {len(all_config_files())} files under {root}")


if __name__ == "__main__":  # pragma: no cover
    main()
