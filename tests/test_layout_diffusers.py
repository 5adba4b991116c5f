"""Self-consistency of the tiny layouts with diffusers / transformers: diffusers' own single-file conversion
functions must turn the factory's tiny SD1 / SD2 / SDXL checkpoints into state dicts that tiny diffusers modules,
configured from the same ``architectures.yaml`` dims, load with ``strict=True``.

If this fails after a dims change, the tiny sizes broke an assumption of the conversion (or the render configs
built from the same yaml will not load)."""

from __future__ import annotations

import pytest
import torch

from astolfo_opt.checkpoint.spec import TE_PREFIXES, architecture_dims
from astolfo_opt.testing.factory import ModelSpec, iter_tensors

sfu = pytest.importorskip("diffusers.loaders.single_file_utils")
from diffusers import AutoencoderKL, UNet2DConditionModel  # noqa: E402
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection  # noqa: E402

#: buffers transformers keeps out of (or in) a state dict depending on its version; never weights
ALLOWED_EXTRA = ("position_ids",)


@pytest.fixture(scope="module", params=["sd1", "sd2", "sdxl"])
def tiny(request):
    arch = request.param
    sd = dict(iter_tensors(ModelSpec(arch=arch, size="tiny", dtype="fp32", seed=3)))
    return arch, architecture_dims(arch, "tiny"), sd


def unet_config(arch: str, d: dict) -> dict:
    u = d["unet"]
    boc = [u["model_channels"] * m for m in u["channel_mult"]]
    cfg = dict(
        sample_size=8, in_channels=u["in_channels"], out_channels=u["out_channels"], block_out_channels=boc,
        down_block_types=["CrossAttnDownBlock2D" if t else "DownBlock2D" for t in u["transformer_depth"]],
        up_block_types=["CrossAttnUpBlock2D" if t else "UpBlock2D" for t in reversed(u["transformer_depth"])],
        layers_per_block=u["num_res_blocks"], cross_attention_dim=u["context_dim"], use_linear_projection=u["linear_proj"],
        attention_head_dim=u["num_heads"] or [c // u["num_head_channels"] for c in boc],
        transformer_layers_per_block=[max(t, 1) for t in u["transformer_depth"][:-1]] + [u["transformer_depth_middle"]]
        if arch == "sdxl" else 1,
    )
    if arch == "sdxl":
        cfg.update(addition_embed_type="text_time", addition_time_embed_dim=d["addition_time_embed_dim"],
                   projection_class_embeddings_input_dim=u["adm_in_channels"])
    return cfg


def test_unet_converts_and_loads_strictly(tiny):
    arch, d, sd = tiny
    unet = UNet2DConditionModel(**unet_config(arch, d))
    conv = sfu.convert_ldm_unet_checkpoint(sd, unet.config)
    unet.load_state_dict(conv, strict=True)
    # conversion is pure renaming: every UNet tensor of the checkpoint is used exactly once
    n_ckpt = sum(t.numel() for k, t in sd.items() if k.startswith("model.diffusion_model."))
    assert sum(t.numel() for t in unet.state_dict().values()) == n_ckpt
    out = unet.conv_out.weight
    assert torch.equal(out, sd["model.diffusion_model.out.2.weight"])


def test_vae_converts_and_loads_strictly(tiny):
    arch, d, sd = tiny
    v = d["vae"]
    n = len(v["ch_mult"])
    vae = AutoencoderKL(block_out_channels=[v["ch"] * m for m in v["ch_mult"]], down_block_types=["DownEncoderBlock2D"] * n,
                        up_block_types=["UpDecoderBlock2D"] * n, layers_per_block=v["num_res_blocks"],
                        latent_channels=v["z_channels"], in_channels=v["in_channels"], out_channels=v["in_channels"])
    vsd = {k: t for k, t in sd.items() if k.startswith("first_stage_model.")}
    conv = sfu.convert_ldm_vae_checkpoint(vsd, vae.config)
    vae.load_state_dict(conv, strict=True)
    assert torch.equal(vae.quant_conv.weight, sd["first_stage_model.quant_conv.weight"])


def _fit_to_module(module: torch.nn.Module, conv: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Match converted names to the live module's naming (transformers >= 5.6 dropped the ``text_model.`` level of
    ``CLIPTextModel``) and drop version-dependent buffers; build the map from the module, not a hard-coded prefix."""
    want = set(module.state_dict())
    out = {}
    for k, t in conv.items():
        if k not in want and k.startswith("text_model.") and k[len("text_model."):] in want:
            k = k[len("text_model."):]
        if k not in want and k.endswith(ALLOWED_EXTRA):
            continue
        out[k] = t
    return out


@pytest.mark.parametrize("te", ["te0", "te1"])
def test_text_encoders_convert_and_load_strictly(tiny, te):
    arch, d, sd = tiny
    if te not in d:
        pytest.skip(f"{arch} has no {te}")
    t = d[te]
    prefix = TE_PREFIXES[arch][te]
    sub = {k: v for k, v in sd.items() if k.startswith(prefix)}
    open_clip = t["kind"] == "open_clip"
    # diffusers' SD2 text encoder stops at the penultimate layer (SD2 conditions on it): its config has layers - 1
    layers = t["layers"] - 1 if arch == "sd2" else t["layers"]
    cfg = CLIPTextConfig(hidden_size=t["width"], intermediate_size=t["mlp"], num_hidden_layers=layers,
                         num_attention_heads=t["heads"], vocab_size=t["vocab"], max_position_embeddings=t["context"],
                         projection_dim=t.get("projection", t["width"]), hidden_act="gelu" if open_clip else "quick_gelu")
    if not open_clip:
        model = CLIPTextModel(cfg)
        conv = sfu.convert_ldm_clip_checkpoint(sub, remove_prefix=prefix.replace("text_model.", ""))
    else:
        model = CLIPTextModelWithProjection(cfg) if arch == "sdxl" else CLIPTextModel(cfg)
        conv = sfu.convert_open_clip_checkpoint(model, sub, prefix=prefix)
    model.load_state_dict(_fit_to_module(model, conv), strict=True)
    emb = model.get_input_embeddings().weight
    assert torch.equal(emb, sub[prefix + ("token_embedding.weight" if open_clip else "embeddings.token_embedding.weight")])
    if open_clip:  # packed q/k/v split into thirds
        w = t["width"]
        packed = sub[prefix + "transformer.resblocks.0.attn.in_proj_weight"]
        layer0 = next(m for n, m in model.named_modules() if n.endswith("layers.0.self_attn"))
        assert torch.equal(layer0.k_proj.weight, packed[w : 2 * w])
        if arch == "sdxl":  # text_projection is stored transposed
            assert torch.equal(model.text_projection.weight, sub[prefix + "text_projection"].T)
