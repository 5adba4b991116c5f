"""Scorers on tiny random CLIP models (open_clip and transformers) and on the real LAION aesthetic head.

Random towers say nothing about image quality, so these tests check the plumbing and the math against independent
computations: cosine / CLIPScore / logit conventions, text-embedding cache, one image encode per tower, strict head
loading, and the one-line errors for missing or download-only weights.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image

from astolfo_opt.errors import AstolfoError, CheckpointError, ConfigError, MissingFileError
from scorers import build_objective, build_scorer, clear_cache
from scorers.clip_similarity import ClipSimilarity, apply_convention
from scorers.hpsv2 import HPSv2
from scorers.laion_aesthetic import HEAD_KEYS, LaionAesthetic, load_head
from scorers.pickscore import PickScore
from scorers.testing import (
    TINY_CLIP_NAME,
    demo_objective_config,
    make_random_head,
    make_tiny_clip,
    make_tiny_hf_clip,
    random_head_state,
    register_tiny_clip,
    tiny_clip_config,
)
from scorers.tower import get_tower

REAL_HEAD = Path(__file__).parents[2] / "shared/data/laion-aesthetic/sac+logos+ava1-l14-linearMSE.pth"
needs_real_head = pytest.mark.skipif(not REAL_HEAD.is_file(), reason=f"real LAION head not present at {REAL_HEAD} (../shared/data)")
CONF_DIR = Path(__file__).parents[1] / "conf"
PROMPTS = ["a cat on a sofa", "a red car", "a cat on a sofa", "mountains at dawn"]


def _images(n: int = 4, seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (72 + 8 * i, 96, 3), dtype=np.uint8)) for i in range(n)]


@pytest.fixture(autouse=True)
def _fresh_cache():
    """Each test starts with no resident models, so load counts and cache hits are its own."""
    clear_cache()
    yield
    clear_cache()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return make_tiny_clip(tmp_path_factory.mktemp("tiny_clip"), seed=0)


@pytest.fixture(scope="module")
def tiny_hf(tmp_path_factory) -> Path:
    return make_tiny_hf_clip(tmp_path_factory.mktemp("tiny_hf") / "clip", seed=0)


@pytest.fixture(scope="module")
def random_head(tmp_path_factory) -> Path:
    return make_random_head(tmp_path_factory.mktemp("head") / "head.pth", seed=1)


def _manual_open_clip_cosine(weights: Path, images, prompts) -> torch.Tensor:
    """Independent reference: plain open_clip calls, no scorer code."""
    model, _, preprocess = open_clip.create_model_and_transforms(TINY_CLIP_NAME, pretrained=str(weights))
    model.eval()
    tok = open_clip.get_tokenizer(TINY_CLIP_NAME)
    with torch.no_grad():
        img = model.encode_image(torch.stack([preprocess(im.convert("RGB")) for im in images]))
        txt = model.encode_text(tok(prompts))
    return (img / img.norm(dim=-1, keepdim=True) * (txt / txt.norm(dim=-1, keepdim=True))).sum(-1)


# ------------------------------------------------------------------------------------------------- tiny open_clip
def test_tiny_model_is_registered_from_shipped_config(tiny):
    name = register_tiny_clip()
    cfg = tiny_clip_config()
    assert name in open_clip.list_models()
    assert cfg["embed_dim"] == 768 and cfg["vision_cfg"]["width"] == 32 and cfg["text_cfg"]["vocab_size"] == 49408
    sd = torch.load(tiny, map_location="cpu", weights_only=True)
    assert sd["text_projection"].shape == (32, 768)


def test_tiny_weights_are_seeded(tmp_path, tiny):
    again = torch.load(make_tiny_clip(tmp_path / "a", seed=0), weights_only=True)
    other = torch.load(make_tiny_clip(tmp_path / "b", seed=1), weights_only=True)
    first = torch.load(tiny, weights_only=True)
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert not torch.equal(first["visual.conv1.weight"], other["visual.conv1.weight"])


def test_cosine_matches_plain_open_clip_and_is_deterministic(tiny):
    images = _images()
    scorer = ClipSimilarity(model=TINY_CLIP_NAME, pretrained=str(tiny), device="cpu")
    assert scorer.device == torch.device("cpu") and scorer.direction == "maximize" and scorer.name == "clip"
    got = scorer.score(images, PROMPTS)
    ref = _manual_open_clip_cosine(tiny, images, PROMPTS)
    assert len(got) == 4 and all(np.isfinite(got))
    np.testing.assert_allclose(got, ref.numpy(), atol=1e-5)
    clear_cache()  # reload from disk: same file -> same scores
    assert ClipSimilarity(model=TINY_CLIP_NAME, pretrained=str(tiny), device="cpu").score(images, PROMPTS) == pytest.approx(got, abs=1e-6)


def test_conventions_vs_manual():
    cos = torch.tensor([-0.3, 0.0, 0.2, 0.9])
    assert apply_convention(cos, "cosine").tolist() == pytest.approx([-0.3, 0.0, 0.2, 0.9])
    assert apply_convention(cos, "clipscore").tolist() == pytest.approx([0.0, 0.0, 0.5, 2.25])
    assert apply_convention(cos, "logit", 100.0).tolist() == pytest.approx([-30.0, 0.0, 20.0, 90.0])
    with pytest.raises(ConfigError):
        apply_convention(cos, "dot")


def test_clipscore_and_logit_scorers_share_the_tower(tiny):
    images = _images()
    kw = {"model": TINY_CLIP_NAME, "pretrained": str(tiny), "device": "cpu"}
    cos = ClipSimilarity(**kw)
    cs = ClipSimilarity(convention="clipscore", name="clipscore", **kw)
    lg = ClipSimilarity(convention="logit", name="logit", **kw)
    assert cos.tower is cs.tower is lg.tower
    c = np.array(cos.score(images, PROMPTS))
    np.testing.assert_allclose(cs.score(images, PROMPTS), 2.5 * np.maximum(c, 0), atol=1e-6)
    np.testing.assert_allclose(lg.score(images, PROMPTS), cos.tower.logit_scale * c, rtol=1e-5)
    assert cos.tower.logit_scale == pytest.approx(1 / 0.07, rel=1e-4)  # open_clip's init temperature
    with pytest.raises(ConfigError, match="convention"):
        ClipSimilarity(convention="cos", **kw)


def test_text_embeddings_cached_per_prompt(tiny, monkeypatch):
    scorer = ClipSimilarity(model=TINY_CLIP_NAME, pretrained=str(tiny), device="cpu")
    tower = scorer.tower
    encoded: list[str] = []
    real = tower._encode_text_batch
    monkeypatch.setattr(tower, "_encode_text_batch", lambda ps: (encoded.extend(ps), real(ps))[1])
    first = scorer.score(_images(), PROMPTS)
    assert sorted(encoded) == sorted(set(PROMPTS))  # the repeated prompt is encoded once
    assert tower.text_cache_misses == 3
    second = scorer.score(_images(), PROMPTS)
    assert len(encoded) == 3 and tower.text_cache_hits == 4  # nothing re-encoded
    assert first == second
    scorer.score(_images(1), ["a new prompt"])
    assert encoded[-1] == "a new prompt" and len(encoded) == 4


def test_length_mismatch_is_an_error(tiny):
    scorer = ClipSimilarity(model=TINY_CLIP_NAME, pretrained=str(tiny), device="cpu")
    with pytest.raises(ConfigError, match="2 images but 1 prompts"):
        scorer.score(_images(2), ["x"])
    assert scorer.score([], []) == []


# ---------------------------------------------------------------------------------------------- loading errors
def test_missing_weights_file_names_file_and_key(tmp_path):
    missing = tmp_path / "nope" / "ViT-L-14.pt"
    cfg = {"_target_": "scorers.clip_similarity.ClipSimilarity", "model": "ViT-L-14-quickgelu", "pretrained": str(missing)}
    with pytest.raises(MissingFileError) as e:
        build_scorer(cfg, key="scorer.scorers.clip")
    msg = str(e.value)
    assert "\n" not in msg and str(missing) in msg and "scorer.scorers.clip.pretrained" in msg
    assert e.value.config_key == "scorer.scorers.clip.pretrained"


@pytest.mark.parametrize("tag", ["openai", "laion2b_s32b_b82k", "datacomp_xl_s13b_b90k"])
def test_download_tags_refused_without_network(tag, monkeypatch):
    import open_clip.factory as factory

    def boom(*a, **k):
        raise AssertionError("tried to download")

    monkeypatch.setattr(factory, "download_pretrained", boom)
    with pytest.raises(ConfigError, match="never downloads") as e:
        ClipSimilarity(model="ViT-L-14", pretrained=tag, config_key="scorer.clip")
    assert "scorer.clip.pretrained" in str(e.value) and "\n" not in str(e.value)


def test_required_and_unknown_model_errors(tiny):
    with pytest.raises(ConfigError, match=r"scorer.clip.pretrained is required"):
        ClipSimilarity(model=TINY_CLIP_NAME, pretrained="???", config_key="scorer.clip")
    with pytest.raises(ConfigError, match="not an open_clip architecture"):
        ClipSimilarity(model="ViT-Q-99", pretrained=str(tiny))
    with pytest.raises(ConfigError, match="download"):
        ClipSimilarity(model="hf-hub:laion/CLIP-ViT-L-14", pretrained=str(tiny))
    with pytest.raises(ConfigError, match="not both"):
        ClipSimilarity(model=TINY_CLIP_NAME, pretrained=str(tiny), hf_dir="/x")


def test_wrong_weights_file_is_a_checkpoint_error(random_head):
    with pytest.raises(CheckpointError) as e:
        ClipSimilarity(model=TINY_CLIP_NAME, pretrained=str(random_head))
    assert str(random_head) in str(e.value) and "\n" not in str(e.value)


# --------------------------------------------------------------------------------------------------- LAION head
@needs_real_head
def test_real_laion_head_loads_strictly_and_scores_deterministically():
    head = load_head(REAL_HEAD)
    assert not head.training
    assert set(head.state_dict()) == set(HEAD_KEYS)
    g = torch.Generator().manual_seed(1234)
    x = torch.nn.functional.normalize(torch.randn(16, 768, generator=g), dim=-1)
    with torch.no_grad():
        a, b = head(x), load_head(REAL_HEAD)(x)
    assert a.shape == (16,) and torch.isfinite(a).all()
    assert torch.equal(a, b)
    assert float(a.min()) > 2.0 and float(a.max()) < 9.0  # the predictor's 1-10 scale; unit vectors land mid-range
    # no activations: the head is exactly the product of its affine layers
    sd = torch.load(REAL_HEAD, map_location="cpu", weights_only=True)
    y = x.double()
    for i in (0, 2, 4, 6, 7):
        y = y @ sd[f"layers.{i}.weight"].double().T + sd[f"layers.{i}.bias"].double()
    torch.testing.assert_close(a.double(), y.squeeze(-1), atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("change", ["missing", "extra", "shape"])
def test_head_strict_loading_rejects_wrong_state(tmp_path, change):
    state = random_head_state(0)
    if change == "missing":
        del state["layers.6.bias"]
    elif change == "extra":
        state["layers.8.weight"] = torch.zeros(1, 1)
    else:
        state["layers.7.weight"] = torch.zeros(2, 16)
    path = tmp_path / "bad.pth"
    torch.save(state, path)
    with pytest.raises(CheckpointError) as e:
        load_head(path)
    msg = str(e.value)
    assert "\n" not in msg and "not a LAION aesthetic head" in msg
    if change == "missing":
        assert "layers.6.bias" in msg
    if change == "extra":
        assert "layers.8.weight" in msg


def test_head_missing_or_unreadable(tmp_path):
    with pytest.raises(MissingFileError, match=r"scorer.aesthetic.head"):
        load_head(tmp_path / "absent.pth")
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a pickle")
    with pytest.raises(CheckpointError, match="junk.pth"):
        load_head(junk)


def test_aesthetic_and_clip_share_one_image_encode(tiny, random_head):
    head = REAL_HEAD if REAL_HEAD.is_file() else random_head
    cfg = demo_objective_config(tiny.parent, head=head, device="cpu")
    obj = build_objective(cfg)
    clip, aes = obj.scorers
    assert isinstance(aes, LaionAesthetic) and clip.tower is aes.tower
    tower = clip.tower
    images = _images()
    res = obj.evaluate(images, PROMPTS)
    assert tower.image_encode_calls == 1 and tower.images_encoded == 4
    obj.evaluate(images, PROMPTS)
    assert tower.image_encode_calls == 2 and tower.images_encoded == 8
    # the shared-path scores equal each scorer scoring on its own (which encodes again)
    assert aes.score(images, PROMPTS) == pytest.approx(res.per_scorer["aesthetic"], abs=1e-5)
    assert clip.score(images, PROMPTS) == pytest.approx(res.per_scorer["clip"], abs=1e-6)
    assert tower.image_encode_calls == 4
    with torch.no_grad():
        manual = load_head(head)(tower.encode_images(images))
    np.testing.assert_allclose(res.per_scorer["aesthetic"], manual.numpy(), atol=1e-5)
    assert res.values[0] == pytest.approx(np.mean(np.add(res.per_scorer["clip"], res.per_scorer["aesthetic"])), abs=1e-9)


def test_aesthetic_needs_768_d_tower(tmp_path_factory, random_head):
    small = make_tiny_hf_clip(tmp_path_factory.mktemp("hf64") / "clip", projection_dim=64)
    with pytest.raises(ConfigError, match="768-d"):
        LaionAesthetic(head=str(random_head), hf_dir=str(small), device="cpu")


# ------------------------------------------------------------------------------------- transformers / PickScore
def test_transformers_backend_matches_plain_clipmodel(tiny_hf):
    from transformers import CLIPImageProcessor, CLIPModel, CLIPTokenizer

    images = _images()
    scorer = ClipSimilarity(hf_dir=str(tiny_hf), device="cpu")
    assert scorer.tower.backend == "transformers" and scorer.tower.embed_dim == 768
    got = scorer.score(images, PROMPTS)
    model = CLIPModel.from_pretrained(tiny_hf, local_files_only=True).eval()
    proc = CLIPImageProcessor.from_pretrained(tiny_hf, local_files_only=True)
    tok = CLIPTokenizer.from_pretrained(tiny_hf, local_files_only=True)
    assert tok("a this")["input_ids"] == [49406, 320, 589, 49407]  # tokenizer built from open_clip's BPE
    with torch.no_grad():
        out = model(input_ids=tok(PROMPTS, padding="max_length", max_length=77, return_tensors="pt")["input_ids"],
                    pixel_values=proc(images=[im.convert("RGB") for im in images], return_tensors="pt")["pixel_values"])
    ref = (out.image_embeds / out.image_embeds.norm(dim=-1, keepdim=True)
           * (out.text_embeds / out.text_embeds.norm(dim=-1, keepdim=True))).sum(-1)
    np.testing.assert_allclose(got, ref.numpy(), atol=1e-5)


def test_pickscore_scoring_and_missing_folders(tiny_hf, tmp_path):
    images = _images()
    ps = build_scorer({"_target_": "scorers.pickscore.PickScore", "hf_dir": str(tiny_hf), "device": "cpu"},
                      key="scorer.scorers.pickscore")
    assert isinstance(ps, PickScore) and ps.name == "pickscore"
    cos = ClipSimilarity(hf_dir=str(tiny_hf), device="cpu").score(images, PROMPTS)
    np.testing.assert_allclose(ps.score(images, PROMPTS), np.array(cos) * ps.tower.logit_scale, rtol=1e-5)
    with pytest.raises(MissingFileError) as e:
        PickScore(hf_dir=str(tmp_path / "PickScore_v1"), config_key="scorer.scorers.pickscore")
    assert "scorer.scorers.pickscore.hf_dir" in str(e.value) and "PickScore_v1" in str(e.value)
    with pytest.raises(ConfigError, match="hf_dir is required"):
        PickScore(hf_dir="???")
    bare = tmp_path / "proc"
    bare.mkdir()
    with pytest.raises(MissingFileError) as e:
        PickScore(hf_dir=str(tiny_hf), processor_dir=str(bare), config_key="scorer.scorers.pickscore")
    assert "preprocessor_config.json" in str(e.value) and "scorer.scorers.pickscore.processor_dir" in str(e.value)


# ------------------------------------------------------------------------------------------------------- HPSv2
def test_hpsv2_missing_weights_and_training_checkpoint_format(tiny, tmp_path):
    with pytest.raises(MissingFileError) as e:
        HPSv2(pretrained=str(tmp_path / "HPS_v2.1_compressed.pt"), config_key="scorer.scorers.hpsv2")
    assert "HPS_v2.1_compressed.pt" in str(e.value) and "scorer.scorers.hpsv2.pretrained" in str(e.value)
    # HPSv2 files are training checkpoints: {"state_dict": {"module.<key>": ...}}; open_clip's loader unwraps them
    sd = torch.load(tiny, weights_only=True)
    wrapped = tmp_path / "hps.pt"
    torch.save({"epoch": 1, "state_dict": {f"module.{k}": v for k, v in sd.items()}}, wrapped)
    images = _images()
    hps = HPSv2(model=TINY_CLIP_NAME, pretrained=str(wrapped), device="cpu")
    assert hps.name == "hpsv2" and hps.convention == "cosine"
    ref = ClipSimilarity(model=TINY_CLIP_NAME, pretrained=str(tiny), device="cpu").score(images, PROMPTS)
    np.testing.assert_allclose(hps.score(images, PROMPTS), ref, atol=1e-6)


# ---------------------------------------------------------------------------------------------------- registry
def test_registry_caches_and_validates(tiny):
    cfg = {"_target_": "scorers.clip_similarity.ClipSimilarity", "model": TINY_CLIP_NAME, "pretrained": str(tiny), "device": "cpu"}
    a = build_scorer(cfg)
    assert build_scorer(dict(cfg)) is a
    b = build_scorer({**cfg, "convention": "clipscore", "name": "cs"})
    assert b is not a and b.tower is a.tower
    assert get_tower(model=TINY_CLIP_NAME, pretrained=str(tiny), device="cpu") is a.tower
    for bad, match in [({"model": "x"}, "no _target_"), ({"_target_": "scorers.nope.Thing"}, "cannot import"),
                       ({"_target_": "scorers.clip_similarity.Nope"}, "no class or function"),
                       ({"_target_": "os.path.join"}, "bad arguments|not a scorer"),
                       ({**cfg, "colour": "red"}, "bad arguments"),
                       ({**cfg, "direction": "up"}, "direction")]:
        with pytest.raises(AstolfoError, match=match):
            build_scorer(bad, key="scorer.scorers.x")


def test_omegaconf_missing_value_names_key():
    from omegaconf import OmegaConf

    cfg = OmegaConf.create({"_target_": "scorers.clip_similarity.ClipSimilarity", "model": "ViT-L-14-quickgelu",
                            "pretrained": "???"})
    with pytest.raises(ConfigError, match=r"scorer.scorers.clip.pretrained is required"):
        build_scorer(cfg, key="scorer.scorers.clip")


def test_shipped_configs_compose_and_build(tiny, random_head, monkeypatch):
    from hydra import compose, initialize_config_dir

    monkeypatch.delenv("ASTOLFO_CLIP_L14", raising=False)
    monkeypatch.delenv("ASTOLFO_TINY_CLIP", raising=False)
    names = sorted(p.stem for p in (CONF_DIR / "scorer").glob("*.yaml"))
    assert {"tiny_clip", "clip_laion", "hpsv2", "pickscore", "world"} <= set(names)
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        for name in names:
            # scorer=world also selects render=world, so it composes within the root config, as search uses it
            cfg = (compose("config", overrides=["scorer=world"]) if name == "world" else compose(overrides=[f"+scorer={name}"])).scorer
            assert "scorers" in cfg and "weights" in cfg
        cfg = compose(overrides=["+scorer=clip_laion"]).scorer
        with pytest.raises(ConfigError, match=r"scorer.scorers.clip.pretrained is required"):
            build_objective(cfg)
        cfg = compose(overrides=["+scorer=tiny_clip", "scorer.scorers.clip.device=cpu",
                                 f"scorer.scorers.clip.pretrained={tiny}", f"scorer.scorers.aesthetic.head={random_head}"]).scorer
        obj = build_objective(cfg)
    assert obj.names == ["objective"] and obj.directions == ["maximize"]
    assert obj.scorers[0].tower is obj.scorers[1].tower
    res = obj.evaluate(_images(2), PROMPTS[:2])
    assert len(res.values) == 1 and np.isfinite(res.values[0])


def test_env_var_supplies_path(tiny, random_head, monkeypatch):
    from hydra import compose, initialize_config_dir

    monkeypatch.setenv("ASTOLFO_TINY_CLIP", str(tiny))
    monkeypatch.setenv("ASTOLFO_LAION_HEAD", str(random_head))
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(overrides=["+scorer=tiny_clip", "scorer.scorers.clip.device=cpu"]).scorer
    obj = build_objective(cfg)
    assert Path(obj.scorers[0].tower.source) == tiny.resolve()
    assert os.fspath(obj.scorers[1].head_path) == os.fspath(random_head.resolve())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_fp16_matches_cpu(tiny, random_head):
    images = _images()
    cpu = build_objective(demo_objective_config(tiny.parent, head=random_head, device="cpu")).evaluate(images, PROMPTS)
    gpu_obj = build_objective(demo_objective_config(tiny.parent, head=random_head, device="auto"))
    assert gpu_obj.scorers[0].tower.device.type == "cuda" and gpu_obj.scorers[0].tower.dtype == torch.float16
    gpu = gpu_obj.evaluate(images, PROMPTS)
    for name in ("clip", "aesthetic"):
        np.testing.assert_allclose(gpu.per_scorer[name], cpu.per_scorer[name], atol=2e-2)


def test_safetensors_weights_and_torchscript_hint(tiny, tmp_path):
    from safetensors.torch import save_file

    sd = torch.load(tiny, weights_only=True)
    st = tmp_path / "open_clip_model.safetensors"
    save_file({k: v.contiguous() for k, v in sd.items()}, st)
    images = _images(2)
    ref = ClipSimilarity(model=TINY_CLIP_NAME, pretrained=str(tiny), device="cpu").score(images, PROMPTS[:2])
    assert ClipSimilarity(model=TINY_CLIP_NAME, pretrained=str(st), device="cpu").score(images, PROMPTS[:2]) == pytest.approx(ref, abs=1e-6)
    jit = tmp_path / "ViT-jit.pt"
    torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), jit)
    with pytest.raises(CheckpointError, match="TorchScript archive.*safetensors") as e:
        ClipSimilarity(model=TINY_CLIP_NAME, pretrained=str(jit))
    assert "\n" not in str(e.value) and len(str(e.value)) < 400
