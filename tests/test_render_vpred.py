"""SDXL v-prediction (NoobAI / Illustrious v-pred): the ``sdxl-v`` variant, its zero-terminal-SNR schedule as diffusers
builds it, guidance rescale, and the variant picked from the file's markers / ModelSpec metadata."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from astolfo_opt.cli import main
from astolfo_opt.errors import ConfigError
from astolfo_opt.render.make_configs import VARIANTS
from astolfo_opt.render.pipeline import ZTSNR_GUIDANCE_RESCALE, build_pipeline, load_config, resolve_variant
from astolfo_opt.render.prompts import Prompt
from astolfo_opt.render.settings import SCHEDULERS, RenderSettings
from astolfo_opt.testing.factory import ModelSpec, make_checkpoint

SETTINGS = RenderSettings(width=64, height=64, steps=2, guidance_scale=5.0)
PROMPTS = [Prompt("a photo of a cat", "blurry", 11), Prompt("a lighthouse at night", "", 12)]
ZTSNR_KEYS = ("prediction_type", "rescale_betas_zero_snr", "timestep_spacing")


def arrays(images) -> list[np.ndarray]:
    return [np.asarray(im) for im in images]


def same_images(a, b) -> bool:
    return all(np.array_equal(x, y) for x, y in zip(arrays(a), arrays(b), strict=True))


def with_markers(src, dst, markers=("v_pred", "ztsnr")):
    """A copy of ``src`` with the NoobAI-style empty marker tensors added (as ComfyUI / Forge read them)."""
    with safe_open(str(src), "pt") as f:
        meta = f.metadata() or {}
    save_file({**load_file(str(src)), **{m: torch.tensor([]) for m in markers}}, str(dst), metadata=meta)
    return dst


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Tiny SDXL files: ``eps`` (states nothing), ``v`` (markers v_pred + ztsnr), ``spec_v`` (ModelSpec only)."""
    d = tmp_path_factory.mktemp("vpred")
    eps = make_checkpoint(d / "eps.safetensors", ModelSpec(arch="sdxl", size="tiny", seed=5))
    return {"eps": eps, "v": with_markers(eps, d / "v.safetensors"),
            "spec_v": make_checkpoint(d / "spec_v.safetensors", ModelSpec(arch="sdxl", size="tiny", seed=5,
                                                                          metadata={"modelspec.prediction_type": "v"}))}


@pytest.fixture(scope="module")
def vpipe(files):
    return build_pipeline(files["v"], device="cpu")


@pytest.fixture(scope="module")
def epipe(files):
    """The same weights without markers."""
    return build_pipeline(files["eps"], device="cpu")


def test_shipped_sdxl_v_scheduler_is_what_diffusers_builds():
    """Our shipped config equals diffusers' own recipe for a zero-terminal-SNR v model, in config and in the actual
    sigmas / timesteps: trailing spacing starts at t=999, whose alphas_cumprod diffusers clamps to 2**-24 (not 0, so
    the first sigma is finite: sqrt((1 - 2**-24) / 2**-24) ~ 4096)."""
    from diffusers import EulerDiscreteScheduler

    for size in ("full", "tiny"):
        base = load_config("sdxl", size, "scheduler/scheduler_config.json")
        ref = EulerDiscreteScheduler.from_config(base, prediction_type="v_prediction", rescale_betas_zero_snr=True,
                                                 timestep_spacing="trailing")
        ours = EulerDiscreteScheduler.from_config(load_config("sdxl-v", size, "scheduler/scheduler_config.json"))
        assert {k: ours.config[k] for k in ZTSNR_KEYS} == {"prediction_type": "v_prediction", "rescale_betas_zero_snr": True,
                                                          "timestep_spacing": "trailing"}
        assert dict(ours.config) == dict(ref.config)
        assert ours.alphas_cumprod[-1].item() == 2**-24 and torch.equal(ours.alphas_cumprod, ref.alphas_cumprod)
        for s in (ours, ref):
            s.set_timesteps(20)
        assert torch.equal(ours.sigmas, ref.sigmas) and torch.equal(ours.timesteps, ref.timesteps)
        assert ours.timesteps[0].item() == 999 and ours.timesteps[-1].item() == 49 and len(ours.timesteps) == 20
        assert ours.sigmas[-1].item() == 0
        ztsnr_sigma = ((1 - 2**-24) / 2**-24) ** 0.5
        assert ours.sigmas[0].item() == pytest.approx(ztsnr_sigma, rel=1e-5) and ours.sigmas[0].item() > 4000
        assert float(ours.init_noise_sigma) == pytest.approx(ztsnr_sigma, rel=1e-5)  # trailing: max sigma, not sqrt(s^2+1)
        eps = EulerDiscreteScheduler.from_config(base)
        eps.set_timesteps(20)
        assert eps.sigmas[0].item() < 20 and eps.timesteps[0].item() == 951  # the epsilon SDXL schedule is untouched
    assert VARIANTS["sdxl-v"] == ("sdxl", "v_prediction", 128)
    for sub in ("unet/config.json", "vae/config.json", "text_encoder/config.json", "text_encoder_2/config.json"):
        assert load_config("sdxl-v", "tiny", sub) == load_config("sdxl", "tiny", sub)


def test_v_file_picks_sdxl_v_and_renders_deterministically(vpipe, epipe):
    assert (vpipe.arch, vpipe.size, vpipe.variant) == ("sdxl", "tiny", "sdxl-v")
    assert vpipe.prediction.type == "v_prediction" and vpipe.prediction.ztsnr and vpipe.prediction.source == "markers"
    assert vpipe.prediction_type == "v_prediction" and vpipe.ztsnr
    cfg = vpipe.pipe.scheduler.config
    assert (cfg.prediction_type, cfg.rescale_betas_zero_snr, cfg.timestep_spacing) == ("v_prediction", True, "trailing")
    first = vpipe.render(PROMPTS, SETTINGS)
    a = arrays(first)
    assert [im.size for im in first] == [(64, 64)] * 2 and all(x.std() > 1.0 for x in a), "a constant (black / NaN) image"
    assert not np.array_equal(a[0], a[1])
    assert same_images(first, vpipe.render(PROMPTS, SETTINGS))
    with torch.inference_mode():  # the float output itself is finite (PIL conversion would hide NaN)
        out = vpipe.pipe(prompt=[PROMPTS[0].prompt], width=64, height=64, num_inference_steps=2, guidance_scale=5.0,
                         guidance_rescale=0.7, output_type="np", generator=[torch.Generator("cpu").manual_seed(1)]).images
    assert np.isfinite(out).all() and out.std() > 0
    plain = epipe  # same weights, no markers
    assert plain.variant == "sdxl" and plain.prediction.type is None and not plain.ztsnr
    assert plain.pipe.scheduler.config.prediction_type == "epsilon" and plain.pipe.scheduler.config.timestep_spacing == "leading"


@pytest.mark.parametrize("name", sorted(SCHEDULERS))
def test_other_schedulers_keep_vpred_ztsnr_and_trailing(vpipe, name):
    if name == "pndm":  # diffusers' PNDM has no zero-terminal-SNR option: refused rather than silently dropped
        with pytest.raises(ConfigError, match="render.scheduler=pndm.*zero-terminal-SNR.*euler") as e:
            vpipe.scheduler(name)
        assert "\n" not in str(e.value)
        return
    s = vpipe.scheduler(name)
    assert {k: s.config[k] for k in ZTSNR_KEYS} == {"prediction_type": "v_prediction", "rescale_betas_zero_snr": True,
                                                    "timestep_spacing": "trailing"}
    assert s.alphas_cumprod[-1].item() <= 2**-24  # DDIM leaves it at exactly 0, the others clamp it to 2**-24
    s.set_timesteps(20)
    assert int(s.timesteps[0]) == 999


def test_modelspec_and_sd2_statements_pick_the_variant(files, tmp_path):
    assert build_pipeline(files["spec_v"], device="cpu").variant == "sdxl-v"
    sd2v = make_checkpoint(tmp_path / "sd2v.safetensors", ModelSpec(arch="sd2", size="tiny", seed=2,
                                                                     metadata={"modelspec.architecture": "stable-diffusion-v2-768-v"}))
    pipe = build_pipeline(sd2v, device="cpu")
    assert pipe.variant == "sd2-v" and pipe.pipe.scheduler.config.prediction_type == "v_prediction" and not pipe.ztsnr
    assert pipe.guidance_rescale(SETTINGS) == 0.0  # SD2-v is not zero-terminal-SNR: diffusers' default stays
    silent = make_checkpoint(tmp_path / "sd2.safetensors", ModelSpec(arch="sd2", size="tiny", seed=2))
    with pytest.raises(ConfigError, match=r"pool\.variant=sd2-v") as e:
        build_pipeline(silent, device="cpu")
    assert "\n" not in str(e.value)
    # resolve_variant alone: the old positional signature still works; prediction is keyword-only in practice
    assert resolve_variant("sdxl", "sdxl", "f", "pool.variant") == "sdxl"
    assert resolve_variant("sd2", None, "f", "pool.variant", prediction="epsilon") == "sd2-eps"
    assert resolve_variant("sd2", None, prediction="v_prediction") == "sd2-v"
    assert resolve_variant("sdxl", "auto", prediction="v_prediction") == "sdxl-v"
    assert resolve_variant("sdxl", None) == "sdxl" and resolve_variant("sd1", None, prediction="epsilon") == "sd1"
    with pytest.raises(ConfigError, match="no sd1 render variant.*--variant") as e:
        resolve_variant("sd1", None, "x.safetensors", "--variant", prediction="v_prediction")
    assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="is for sdxl"):
        resolve_variant("sd2", "sdxl-v", prediction="v_prediction")


def test_explicit_variant_wins_but_a_contradiction_is_logged(files, caplog):
    with caplog.at_level(logging.WARNING, logger="astolfo_opt.render.pipeline"):
        pipe = build_pipeline(files["v"], variant="sdxl", device="cpu")
    assert pipe.variant == "sdxl" and pipe.pipe.scheduler.config.prediction_type == "epsilon"
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("prediction" in m and "sdxl" in m and "v_prediction" in m and "epsilon" in m for m in warned), warned
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="astolfo_opt.render.pipeline"):
        assert resolve_variant("sdxl", "sdxl-v", "e.safetensors", prediction="epsilon") == "sdxl-v"
        assert resolve_variant("sdxl", "sdxl-v", "n.safetensors", prediction=None) == "sdxl-v"  # a silent file: no warning
        assert resolve_variant("sdxl", "sdxl-v", "v.safetensors", prediction="v_prediction") == "sdxl-v"
    msgs = [r.getMessage() for r in caplog.records]
    assert len(msgs) == 1 and "e.safetensors" in msgs[0] and "pool.variant=sdxl-v" in msgs[0] and "epsilon" in msgs[0]


def test_guidance_rescale_reaches_diffusers(vpipe, epipe, monkeypatch):
    from diffusers import StableDiffusionXLPipeline

    seen: list[float] = []
    real = StableDiffusionXLPipeline.__call__

    def spy(self, *args, **kwargs):
        seen.append(kwargs["guidance_rescale"])
        return real(self, *args, **kwargs)

    monkeypatch.setattr(StableDiffusionXLPipeline, "__call__", spy)
    default = vpipe.render(PROMPTS[:1], SETTINGS)
    off = vpipe.render(PROMPTS[:1], RenderSettings(width=64, height=64, steps=2, guidance_scale=5.0, guidance_rescale=0.0))
    on = vpipe.render(PROMPTS[:1], RenderSettings(width=64, height=64, steps=2, guidance_scale=5.0, guidance_rescale=0.7))
    assert seen == [ZTSNR_GUIDANCE_RESCALE, 0.0, 0.7] and ZTSNR_GUIDANCE_RESCALE == 0.7
    assert same_images(default, on) and not same_images(on, off)
    assert np.asarray(off[0]).std() > 1.0
    seen.clear()
    epipe.render(PROMPTS[:1], SETTINGS)
    assert seen == [0.0]  # epsilon SDXL: diffusers' default, images as before the setting existed


def test_guidance_rescale_setting_validation_and_hash():
    assert RenderSettings().guidance_rescale is None
    # settings that leave the new field unset keep the hash they had before it existed (values recorded before the change)
    assert RenderSettings().hash() == "02fbbfe8f6a0c974"
    assert RenderSettings(width=64, height=64, steps=2, guidance_scale=5.0, clip_skip=1).hash() == "065e38b3d42990cc"
    assert RenderSettings(guidance_rescale=0.7).hash() != RenderSettings().hash() != RenderSettings(guidance_rescale=0.0).hash()
    assert RenderSettings.from_mapping({"guidance_rescale": None}).guidance_rescale is None
    assert RenderSettings.from_mapping({"guidance_rescale": 0.5}).guidance_rescale == 0.5
    assert RenderSettings(guidance_rescale=0).guidance_rescale == 0 and RenderSettings(guidance_rescale=1).guidance_rescale == 1
    for bad in (-0.1, 1.5, "x", True, float("nan")):
        with pytest.raises(ConfigError, match="guidance_rescale") as e:
            RenderSettings(guidance_rescale=bad)
        assert "\n" not in str(e.value)


def test_cli_render_records_the_picked_variant(files, tmp_path):
    out = tmp_path / "out"
    rc = main(["render", "--checkpoint", str(files["v"]), "--prompts", "tiny", "--out", str(out), "--device", "cpu",
               "--steps", "1", "--limit", "1"])
    assert rc == 0
    meta = json.loads((out / "render.json").read_text())
    assert meta["variant"] == "sdxl-v" and meta["variant_source"] == "file" and meta["prediction_type"] == "v_prediction"
    assert meta["ztsnr"] is True and meta["guidance_rescale"] == 0.7 and meta["settings"]["guidance_rescale"] is None
    assert meta["prediction"]["prediction_type"] == "v_prediction" and meta["prediction"]["markers"] == ["v_pred", "ztsnr"]
    out2 = tmp_path / "out2"
    assert main(["render", "--checkpoint", str(files["v"]), "--prompts", "tiny", "--out", str(out2), "--device", "cpu",
                 "--steps", "1", "--limit", "1", "--variant", "sdxl", "--guidance-rescale", "0.2"]) == 0
    meta = json.loads((out2 / "render.json").read_text())
    assert (meta["variant"], meta["variant_source"], meta["prediction_type"]) == ("sdxl", "--variant", "epsilon")
    assert meta["guidance_rescale"] == 0.2 and meta["prediction"]["prediction_type"] == "v_prediction"
