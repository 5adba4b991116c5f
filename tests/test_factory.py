"""The checkpoint factory produces the variants real pools hold, with real key names, deterministically."""

from __future__ import annotations

import pytest
import torch

from astolfo_opt.checkpoint.io import open_checkpoint
from astolfo_opt.checkpoint.layout import canonical_key, component_of, get_layout
from astolfo_opt.testing.factory import ModelSpec, make_checkpoint, make_pool

TE_KEY = "cond_stage_model.transformer.text_model.encoder.layers.0.mlp.fc1.weight"
UNET_KEY = "model.diffusion_model.input_blocks.1.0.in_layers.2.weight"
POS = "cond_stage_model.transformer.text_model.embeddings.position_ids"


def load(path) -> dict[str, torch.Tensor]:
    with open_checkpoint(path) as r:
        return {k: r.get(k).clone() for k in r.keys()}  # noqa: SIM118 - readers are not iterable


@pytest.fixture(scope="module")
def healthy(tmp_path_factory):
    path = make_checkpoint(tmp_path_factory.mktemp("f") / "h.safetensors", ModelSpec(seed=1, metadata={"note": "hi"}))
    return path, load(path)


def test_healthy_file_has_exactly_the_layout_keys_and_shapes(healthy):
    path, sd = healthy
    lay = get_layout("sd1", "tiny")
    assert set(sd) == {k for k, e in lay.entries.items() if e.component in ("unet", "te0", "vae")}
    for k, t in sd.items():
        assert tuple(t.shape) == lay.expected_shape(k), k
        assert t.dtype == (torch.int64 if k == POS else torch.float16), k
        if t.is_floating_point():
            assert torch.isfinite(t).all(), k
    assert torch.equal(sd[POS], torch.arange(77).reshape(1, 77))
    with open_checkpoint(path) as r:
        assert r.metadata["note"] == "hi" and r.metadata["generator"] == "astolfo_opt.testing.factory"


@pytest.mark.parametrize(("name", "dtype"), [("fp16", torch.float16), ("bf16", torch.bfloat16), ("fp32", torch.float32)])
def test_dtypes(tmp_path, name, dtype):
    sd = load(make_checkpoint(tmp_path / "m.safetensors", ModelSpec(seed=1, dtype=name)))
    assert {t.dtype for k, t in sd.items() if k != POS} == {dtype}
    ref = load(make_checkpoint(tmp_path / "ref.safetensors", ModelSpec(seed=1, dtype="fp32")))
    assert torch.allclose(sd[TE_KEY].float(), ref[TE_KEY], atol=1e-2)  # same values, other precision


def test_deterministic_per_seed_and_key(tmp_path, healthy):
    _, sd = healthy
    again = load(make_checkpoint(tmp_path / "again.safetensors", ModelSpec(seed=1)))
    assert all(torch.equal(sd[k], again[k]) for k in sd)
    # a key's value does not depend on which other keys are written
    pruned = load(make_checkpoint(tmp_path / "pruned.safetensors", ModelSpec(seed=1, drop={"vae": 1.0, "unet": 0.5})))
    assert all(torch.equal(sd[k], pruned[k]) for k in pruned)
    other = load(make_checkpoint(tmp_path / "other.safetensors", ModelSpec(seed=2)))
    assert not torch.equal(sd[UNET_KEY], other[UNET_KEY])
    # same component seed -> bit-identical component, other components differ
    s3 = load(make_checkpoint(tmp_path / "s3.safetensors", ModelSpec(seed=3, component_seeds={"te0": 1})))
    assert all(torch.equal(sd[k], s3[k]) for k in sd if component_of("sd1", k) == "te0")
    assert not torch.equal(sd[UNET_KEY], s3[UNET_KEY])


def test_pruned_component_missing_or_partial(tmp_path):
    lay = get_layout("sd1", "tiny")
    sd = load(make_checkpoint(tmp_path / "p.safetensors", ModelSpec(seed=1, drop={"vae": 1.0, "te0": 0.3})))
    assert not any(component_of("sd1", k) == "vae" for k in sd)
    te = [k for k in sd if component_of("sd1", k) == "te0"]
    assert 0.5 * len(lay.keys_of("te0")) < len(te) < len(lay.keys_of("te0"))


def test_ema_schedule_and_old_style_te(tmp_path):
    sd = load(make_checkpoint(tmp_path / "e.safetensors", ModelSpec(seed=1, ema=True, schedule=True, old_style_te=True)))
    lay = get_layout("sd1", "tiny")
    ema = [k for k in sd if k.startswith("model_ema.")]
    assert len(ema) == len(lay.keys_of("unet")) + 2
    assert all(k in lay.entries and lay.entries[k].component == "ema" for k in ema)
    assert sd["betas"].shape == (1000,) and sd["alphas_cumprod"][0] < 1
    te = [k for k in sd if k.startswith("cond_stage_model.")]
    assert te and not any(".text_model." in k for k in te)
    canon = {canonical_key("sd1", k) for k in te}
    assert canon == set(lay.keys_of("te0"))


@pytest.mark.parametrize("mode", ["float", "shuffled", "missing"])
def test_broken_position_ids(tmp_path, mode):
    sd = load(make_checkpoint(tmp_path / "p.safetensors", ModelSpec(seed=1, position_ids=mode)))
    if mode == "missing":
        assert POS not in sd
        return
    pos = sd[POS]
    assert pos.shape == (1, 77)
    if mode == "float":
        assert pos.dtype == torch.float32 and not torch.equal(pos, torch.arange(77).float().reshape(1, 77))
        assert torch.equal(pos.round().long(), torch.arange(77).reshape(1, 77))
    else:
        assert pos.dtype == torch.int64 and sorted(pos.flatten().tolist()) == list(range(77))
        assert not torch.equal(pos, torch.arange(77).reshape(1, 77))


@pytest.mark.parametrize("kind", ["nan", "inf"])
def test_non_finite_planted_in_one_key(tmp_path, kind):
    sd = load(make_checkpoint(tmp_path / "n.safetensors", ModelSpec(seed=1, corrupt={UNET_KEY: kind})))
    bad = [k for k, t in sd.items() if t.is_floating_point() and not torch.isfinite(t).all()]
    assert bad == [UNET_KEY]
    assert (torch.isnan(sd[UNET_KEY]).any() if kind == "nan" else torch.isinf(sd[UNET_KEY]).any())
    with pytest.raises(ValueError, match="not a key"):
        make_checkpoint(tmp_path / "x.safetensors", ModelSpec(corrupt={"nope": "nan"}))


def test_component_copied_bit_for_bit(tmp_path, healthy):
    src, sd = healthy
    cp = load(make_checkpoint(tmp_path / "c.safetensors", ModelSpec(seed=9, spread=0.3, copy_components={"te0": src})))
    te = [k for k in sd if component_of("sd1", k) == "te0"]
    assert all(torch.equal(sd[k], cp[k]) for k in te)
    assert not torch.equal(sd[UNET_KEY], cp[UNET_KEY])


def test_ckpt_format_holds_the_same_tensors(tmp_path, healthy):
    _, sd = healthy
    path = make_checkpoint(tmp_path / "m.ckpt", ModelSpec(seed=1, fmt="ckpt"))
    assert path.read_bytes()[:2] == b"PK"  # a torch zip archive
    with open_checkpoint(path) as r:
        assert r.format == "ckpt"
        assert set(r.keys()) == set(sd)
        assert all(torch.equal(r.get(k), sd[k]) for k in sd)


def test_spread_and_outlier_scale(tmp_path):
    base = load(make_checkpoint(tmp_path / "b.safetensors", ModelSpec(seed=1, spread=0.0)))
    near = load(make_checkpoint(tmp_path / "n.safetensors", ModelSpec(seed=1, spread=0.05)))
    far = load(make_checkpoint(tmp_path / "f.safetensors", ModelSpec(seed=1, spread=0.05, spread_scale={"unet": 10.0})))
    d_near = (near[UNET_KEY].float() - base[UNET_KEY].float()).norm()
    d_far = (far[UNET_KEY].float() - base[UNET_KEY].float()).norm()
    assert d_near > 0 and 8 < float(d_far / d_near) < 12
    assert torch.equal(far[TE_KEY], near[TE_KEY])  # only the scaled component moved


@pytest.mark.parametrize("arch", ["sd2", "sdxl"])
def test_other_architectures_match_their_layout(tiny_pools, arch):
    pool = tiny_pools[arch]
    assert [p.name for p in pool.all] == ["base.safetensors", "m00.safetensors", "m01.safetensors", "m02.safetensors"]
    lay = get_layout(arch, "tiny")
    sd = load(pool.models[0])
    assert set(sd) == {k for k, e in lay.entries.items() if e.component in lay.components}
    assert all(tuple(t.shape) == lay.expected_shape(k) for k, t in sd.items())


def test_make_pool_overrides(tmp_path):
    pool = make_pool(tmp_path, n=2, overrides={1: {"fmt": "ckpt", "drop": {"vae": 1.0}}})
    assert pool.models[1].name == "m01.ckpt"
    assert not any(k.startswith("first_stage_model.") for k in load(pool.models[1]))
