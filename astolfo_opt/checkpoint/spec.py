"""Generate the exact key names and shapes of SD1 / SD2 / SDXL single-file checkpoints from their dimensions.

Why a generator and not a hand-written list: the same structure must be produced at full size (the layout data files
and benchmarks) and at tiny widths (tests, demo) with *identical key names*, so both come from one description of
the LDM / SGM module tree. The dimensions themselves are data (``layouts/architectures.yaml``); this module only
encodes how the original ``ldm`` / ``sgm`` code names its parameters.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import Any

import yaml

Shape = tuple[int, ...]

ARCHITECTURES = ("sd1", "sd2", "sdxl")
#: ``full`` (the released model), ``tiny`` (test widths), ``world`` (the trained tiny world; SD1 only): see
#: ``layouts/architectures.yaml``. :func:`sizes_of` says which an architecture has.
SIZES = ("full", "tiny", "world")

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
#: where each text encoder lives in an A1111 / single-file checkpoint
TE_PREFIXES: dict[str, dict[str, str]] = {
    "sd1": {"te0": "cond_stage_model.transformer.text_model."},
    "sd2": {"te0": "cond_stage_model.model."},
    "sdxl": {"te0": "conditioner.embedders.0.transformer.text_model.", "te1": "conditioner.embedders.1.model."},
}
SCHEDULE_KEYS = (
    "betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod",
    "posterior_variance", "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2",
)


@dataclass(frozen=True)
class KeySpec:
    """One tensor of a checkpoint layout."""

    key: str
    shape: Shape
    dtype: str = "float"  # "float" (any float dtype) or a fixed dtype name such as "int64"
    optional: bool = False


@cache
def architecture_dims(arch: str, size: str = "full") -> dict[str, Any]:
    """Dimensions of ``arch`` at ``size`` from the shipped ``architectures.yaml``."""
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {arch!r}; expected one of {', '.join(ARCHITECTURES)}")
    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}; expected one of {', '.join(SIZES)}")
    if size not in sizes_of(arch):
        raise ValueError(f"{arch} has no {size!r} size; it has {', '.join(sizes_of(arch))}")
    return _dims()[arch][size]


@cache
def _dims() -> dict[str, Any]:
    return yaml.safe_load(resources.files("astolfo_opt.checkpoint.layouts").joinpath("architectures.yaml").read_text())


def sizes_of(arch: str) -> tuple[str, ...]:
    """The sizes ``arch`` is described at (in :data:`SIZES` order)."""
    return tuple(s for s in SIZES if s in _dims().get(arch, {}))


# ----------------------------------------------------------------------------------------------------------- UNet
def _resblock(p: str, c_in: int, c_out: int, emb: int) -> list[KeySpec]:
    keys = [
        KeySpec(p + "in_layers.0.weight", (c_in,)), KeySpec(p + "in_layers.0.bias", (c_in,)),
        KeySpec(p + "in_layers.2.weight", (c_out, c_in, 3, 3)), KeySpec(p + "in_layers.2.bias", (c_out,)),
        KeySpec(p + "emb_layers.1.weight", (c_out, emb)), KeySpec(p + "emb_layers.1.bias", (c_out,)),
        KeySpec(p + "out_layers.0.weight", (c_out,)), KeySpec(p + "out_layers.0.bias", (c_out,)),
        KeySpec(p + "out_layers.3.weight", (c_out, c_out, 3, 3)), KeySpec(p + "out_layers.3.bias", (c_out,)),
    ]
    if c_in != c_out:
        keys += [KeySpec(p + "skip_connection.weight", (c_out, c_in, 1, 1)), KeySpec(p + "skip_connection.bias", (c_out,))]
    return keys


def _spatial_transformer(p: str, c: int, depth: int, ctx: int, linear: bool) -> list[KeySpec]:
    proj: Shape = (c, c) if linear else (c, c, 1, 1)
    keys = [KeySpec(p + "norm.weight", (c,)), KeySpec(p + "norm.bias", (c,)),
            KeySpec(p + "proj_in.weight", proj), KeySpec(p + "proj_in.bias", (c,))]
    for d in range(depth):
        t = f"{p}transformer_blocks.{d}."
        for attn, kv in (("attn1", c), ("attn2", ctx)):
            keys += [KeySpec(f"{t}{attn}.to_q.weight", (c, c)), KeySpec(f"{t}{attn}.to_k.weight", (c, kv)),
                     KeySpec(f"{t}{attn}.to_v.weight", (c, kv)), KeySpec(f"{t}{attn}.to_out.0.weight", (c, c)),
                     KeySpec(f"{t}{attn}.to_out.0.bias", (c,))]
        keys += [KeySpec(t + "ff.net.0.proj.weight", (8 * c, c)), KeySpec(t + "ff.net.0.proj.bias", (8 * c,)),
                 KeySpec(t + "ff.net.2.weight", (c, 4 * c)), KeySpec(t + "ff.net.2.bias", (c,))]
        for n in ("norm1", "norm2", "norm3"):
            keys += [KeySpec(f"{t}{n}.weight", (c,)), KeySpec(f"{t}{n}.bias", (c,))]
    keys += [KeySpec(p + "proj_out.weight", proj), KeySpec(p + "proj_out.bias", (c,))]
    return keys


def unet_keys(d: dict[str, Any]) -> list[KeySpec]:
    """LDM / SGM ``openaimodel.UNetModel`` parameter names under ``model.diffusion_model.``."""
    P = UNET_PREFIX
    mc, mult, nres = d["model_channels"], d["channel_mult"], d["num_res_blocks"]
    depth, ctx, linear = d["transformer_depth"], d["context_dim"], d["linear_proj"]
    emb = 4 * mc
    keys = [KeySpec(P + "time_embed.0.weight", (emb, mc)), KeySpec(P + "time_embed.0.bias", (emb,)),
            KeySpec(P + "time_embed.2.weight", (emb, emb)), KeySpec(P + "time_embed.2.bias", (emb,))]
    if d.get("adm_in_channels"):
        keys += [KeySpec(P + "label_emb.0.0.weight", (emb, d["adm_in_channels"])), KeySpec(P + "label_emb.0.0.bias", (emb,)),
                 KeySpec(P + "label_emb.0.2.weight", (emb, emb)), KeySpec(P + "label_emb.0.2.bias", (emb,))]
    keys += [KeySpec(P + "input_blocks.0.0.weight", (mc, d["in_channels"], 3, 3)), KeySpec(P + "input_blocks.0.0.bias", (mc,))]
    skip = [mc]
    ch, idx = mc, 1
    for level, m in enumerate(mult):
        for _ in range(nres):
            out = mc * m
            p = f"{P}input_blocks.{idx}."
            keys += _resblock(p + "0.", ch, out, emb)
            ch = out
            if depth[level]:
                keys += _spatial_transformer(p + "1.", ch, depth[level], ctx, linear)
            skip.append(ch)
            idx += 1
        if level != len(mult) - 1:
            keys += [KeySpec(f"{P}input_blocks.{idx}.0.op.weight", (ch, ch, 3, 3)), KeySpec(f"{P}input_blocks.{idx}.0.op.bias", (ch,))]
            skip.append(ch)
            idx += 1
    keys += _resblock(P + "middle_block.0.", ch, ch, emb)
    keys += _spatial_transformer(P + "middle_block.1.", ch, d["transformer_depth_middle"], ctx, linear)
    keys += _resblock(P + "middle_block.2.", ch, ch, emb)
    idx = 0
    for level in reversed(range(len(mult))):
        for i in range(nres + 1):
            out = mc * mult[level]
            p = f"{P}output_blocks.{idx}."
            keys += _resblock(p + "0.", ch + skip.pop(), out, emb)
            ch = out
            sub = 1
            if depth[level]:
                keys += _spatial_transformer(p + "1.", ch, depth[level], ctx, linear)
                sub = 2
            if level and i == nres:
                keys += [KeySpec(f"{p}{sub}.conv.weight", (ch, ch, 3, 3)), KeySpec(f"{p}{sub}.conv.bias", (ch,))]
            idx += 1
    keys += [KeySpec(P + "out.0.weight", (ch,)), KeySpec(P + "out.0.bias", (ch,)),
             KeySpec(P + "out.2.weight", (d["out_channels"], ch, 3, 3)), KeySpec(P + "out.2.bias", (d["out_channels"],))]
    return keys


# ------------------------------------------------------------------------------------------------------------ VAE
def _vae_resnet(p: str, c_in: int, c_out: int) -> list[KeySpec]:
    keys = [KeySpec(p + "norm1.weight", (c_in,)), KeySpec(p + "norm1.bias", (c_in,)),
            KeySpec(p + "conv1.weight", (c_out, c_in, 3, 3)), KeySpec(p + "conv1.bias", (c_out,)),
            KeySpec(p + "norm2.weight", (c_out,)), KeySpec(p + "norm2.bias", (c_out,)),
            KeySpec(p + "conv2.weight", (c_out, c_out, 3, 3)), KeySpec(p + "conv2.bias", (c_out,))]
    if c_in != c_out:
        keys += [KeySpec(p + "nin_shortcut.weight", (c_out, c_in, 1, 1)), KeySpec(p + "nin_shortcut.bias", (c_out,))]
    return keys


def _vae_mid(p: str, c: int) -> list[KeySpec]:
    keys = _vae_resnet(p + "block_1.", c, c)
    keys += [KeySpec(p + "attn_1.norm.weight", (c,)), KeySpec(p + "attn_1.norm.bias", (c,))]
    for n in ("q", "k", "v", "proj_out"):
        keys += [KeySpec(f"{p}attn_1.{n}.weight", (c, c, 1, 1)), KeySpec(f"{p}attn_1.{n}.bias", (c,))]
    return keys + _vae_resnet(p + "block_2.", c, c)


def vae_keys(d: dict[str, Any]) -> list[KeySpec]:
    """LDM ``AutoencoderKL`` parameter names under ``first_stage_model.``."""
    P, ch, mult, nres, z = VAE_PREFIX, d["ch"], d["ch_mult"], d["num_res_blocks"], d["z_channels"]
    keys = [KeySpec(P + "encoder.conv_in.weight", (ch, d["in_channels"], 3, 3)), KeySpec(P + "encoder.conv_in.bias", (ch,))]
    c = ch
    for i, m in enumerate(mult):
        for b in range(nres):
            keys += _vae_resnet(f"{P}encoder.down.{i}.block.{b}.", c, ch * m)
            c = ch * m
        if i != len(mult) - 1:
            keys += [KeySpec(f"{P}encoder.down.{i}.downsample.conv.weight", (c, c, 3, 3)),
                     KeySpec(f"{P}encoder.down.{i}.downsample.conv.bias", (c,))]
    keys += _vae_mid(P + "encoder.mid.", c)
    keys += [KeySpec(P + "encoder.norm_out.weight", (c,)), KeySpec(P + "encoder.norm_out.bias", (c,)),
             KeySpec(P + "encoder.conv_out.weight", (2 * z, c, 3, 3)), KeySpec(P + "encoder.conv_out.bias", (2 * z,))]
    c = ch * mult[-1]
    keys += [KeySpec(P + "decoder.conv_in.weight", (c, z, 3, 3)), KeySpec(P + "decoder.conv_in.bias", (c,))]
    keys += _vae_mid(P + "decoder.mid.", c)
    for i in reversed(range(len(mult))):
        for b in range(nres + 1):
            keys += _vae_resnet(f"{P}decoder.up.{i}.block.{b}.", c, ch * mult[i])
            c = ch * mult[i]
        if i:
            keys += [KeySpec(f"{P}decoder.up.{i}.upsample.conv.weight", (c, c, 3, 3)),
                     KeySpec(f"{P}decoder.up.{i}.upsample.conv.bias", (c,))]
    keys += [KeySpec(P + "decoder.norm_out.weight", (c,)), KeySpec(P + "decoder.norm_out.bias", (c,)),
             KeySpec(P + "decoder.conv_out.weight", (d["in_channels"], c, 3, 3)), KeySpec(P + "decoder.conv_out.bias", (d["in_channels"],)),
             KeySpec(P + "quant_conv.weight", (2 * z, 2 * z, 1, 1)), KeySpec(P + "quant_conv.bias", (2 * z,)),
             KeySpec(P + "post_quant_conv.weight", (z, z, 1, 1)), KeySpec(P + "post_quant_conv.bias", (z,))]
    return keys


# -------------------------------------------------------------------------------------------------- text encoders
def clip_l_keys(prefix: str, d: dict[str, Any], last_layer_optional: bool = False) -> list[KeySpec]:
    """HF ``CLIPTextModel`` names as stored by LDM (``...transformer.text_model.``)."""
    w, mlp = d["width"], d["mlp"]
    keys = [KeySpec(prefix + "embeddings.position_embedding.weight", (d["context"], w)),
            KeySpec(prefix + "embeddings.position_ids", (1, d["context"]), dtype="int64", optional=True),
            KeySpec(prefix + "embeddings.token_embedding.weight", (d["vocab"], w))]
    for i in range(d["layers"]):
        p = f"{prefix}encoder.layers.{i}."
        opt = last_layer_optional and i == d["layers"] - 1
        layer = [KeySpec(p + "layer_norm1.weight", (w,)), KeySpec(p + "layer_norm1.bias", (w,)),
                 KeySpec(p + "layer_norm2.weight", (w,)), KeySpec(p + "layer_norm2.bias", (w,)),
                 KeySpec(p + "mlp.fc1.weight", (mlp, w)), KeySpec(p + "mlp.fc1.bias", (mlp,)),
                 KeySpec(p + "mlp.fc2.weight", (w, mlp)), KeySpec(p + "mlp.fc2.bias", (w,))]
        for n in ("q_proj", "k_proj", "v_proj", "out_proj"):
            layer += [KeySpec(f"{p}self_attn.{n}.weight", (w, w)), KeySpec(f"{p}self_attn.{n}.bias", (w,))]
        keys += [KeySpec(k.key, k.shape, k.dtype, opt) for k in layer]
    keys += [KeySpec(prefix + "final_layer_norm.weight", (w,), optional=last_layer_optional),
             KeySpec(prefix + "final_layer_norm.bias", (w,), optional=last_layer_optional)]
    return keys


def open_clip_keys(prefix: str, d: dict[str, Any], head_optional: bool = False) -> list[KeySpec]:
    """OpenCLIP text tower names (``...model.``): packed q/k/v ``in_proj``, ``text_projection``, ``logit_scale``.

    ``head_optional`` marks the last block and the head optional (SDXL uses the penultimate layer, and files that
    were saved from diffusers omit what it never runs)."""
    w, mlp = d["width"], d["mlp"]
    keys = [KeySpec(prefix + "positional_embedding", (d["context"], w)),
            KeySpec(prefix + "token_embedding.weight", (d["vocab"], w)),
            KeySpec(prefix + "ln_final.weight", (w,), optional=head_optional),
            KeySpec(prefix + "ln_final.bias", (w,), optional=head_optional),
            KeySpec(prefix + "text_projection", (w, d["projection"]), optional=head_optional),
            KeySpec(prefix + "logit_scale", (), optional=head_optional)]
    for i in range(d["layers"]):
        p = f"{prefix}transformer.resblocks.{i}."
        block = [KeySpec(p + "attn.in_proj_weight", (3 * w, w)), KeySpec(p + "attn.in_proj_bias", (3 * w,)),
                 KeySpec(p + "attn.out_proj.weight", (w, w)), KeySpec(p + "attn.out_proj.bias", (w,)),
                 KeySpec(p + "ln_1.weight", (w,)), KeySpec(p + "ln_1.bias", (w,)),
                 KeySpec(p + "ln_2.weight", (w,)), KeySpec(p + "ln_2.bias", (w,)),
                 KeySpec(p + "mlp.c_fc.weight", (mlp, w)), KeySpec(p + "mlp.c_fc.bias", (mlp,)),
                 KeySpec(p + "mlp.c_proj.weight", (w, mlp)), KeySpec(p + "mlp.c_proj.bias", (w,))]
        opt = head_optional and i == d["layers"] - 1
        keys += [KeySpec(k.key, k.shape, k.dtype, opt) for k in block]
    return keys


def _te_keys(arch: str, name: str, d: dict[str, Any]) -> list[KeySpec]:
    prefix = TE_PREFIXES[arch][name]
    # SDXL files often omit the unused last CLIP-L layer and the CLIP-G head (ComfyUI / kohya saves); real base
    # files carry them. They are optional in the layout and filled from the base model when missing.
    if d["kind"] == "clip_l":
        return clip_l_keys(prefix, d, last_layer_optional=arch == "sdxl")
    return open_clip_keys(prefix, d, head_optional=arch == "sdxl")


def schedule_keys(steps: int = 1000) -> list[KeySpec]:
    """DDPM buffers some LDM checkpoints carry; optional, never merged (copied from the base)."""
    return [KeySpec(k, (steps,), dtype="float32", optional=True) for k in SCHEDULE_KEYS]


#: prediction-type markers ComfyUI writes into SDXL v-prediction / zero-terminal-SNR files (empty tensors)
SDXL_MARKER_KEYS = (KeySpec("edm_vpred.sigma_max", (), "float32", True), KeySpec("edm_vpred.sigma_min", (), "float32", True),
                    KeySpec("v_pred", (0,), "int64", True), KeySpec("ztsnr", (0,), "int64", True))


@cache
def checkpoint_keys(arch: str, size: str = "full") -> tuple[KeySpec, ...]:
    """Every key of an ``arch`` checkpoint at ``size``: unet, text encoders, vae (EMA copies excluded)."""
    d = architecture_dims(arch, size)
    keys = unet_keys(d["unet"])
    for name in ("te0", "te1"):
        if name in d:
            keys += _te_keys(arch, name, d[name])
    keys += vae_keys(d["vae"])
    return tuple(keys)


def ema_key(key: str) -> str:
    """LDM's EMA copy name of a UNet key: ``model.diffusion_model.a.b`` -> ``model_ema.diffusion_modelab``."""
    if not key.startswith(UNET_PREFIX):
        raise ValueError(f"only UNet keys have EMA copies: {key}")
    return "model_ema." + key[len("model."):].replace(".", "")
