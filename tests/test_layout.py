"""Layouts against an independent oracle (sd-mecha's full-size key lists), the shipped data files against the
generator, and the MBW block choice pinned by a golden test."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from astolfo_opt.checkpoint import layout as L
from astolfo_opt.checkpoint import spec
from astolfo_opt.testing.factory import ModelSpec, plan

sd_mecha = pytest.importorskip("sd_mecha")
ORACLE_DIR = Path(sd_mecha.__file__).parent / "extensions" / "builtin" / "model_configs"
#: sd-mecha component -> ours (SDXL prediction markers sit in sd-mecha's "diffuser" and in our "marker")
COMPONENTS = {"clip_l": "te0", "clip_g": "te1", "vae": "vae", "diffuser": "unet", "ema": "ema", "scheduler": "schedule"}
ORACLES = {"sd1": "sd1-ldm.yaml", "sdxl": "sdxl-sgm.yaml"}
MERGED = ("unet", "te0", "te1", "vae")


@pytest.fixture(scope="module", params=sorted(ORACLES))
def oracle(request) -> tuple[str, dict[str, tuple[str, dict]]]:
    """arch, key -> (our component name for sd-mecha's component, sd-mecha's entry)."""
    data = yaml.safe_load((ORACLE_DIR / ORACLES[request.param]).read_text())
    out = {}
    for comp, keys in data["components"].items():
        for key, entry in keys.items():
            ours = COMPONENTS[comp]
            if comp == "diffuser" and not key.startswith(spec.UNET_PREFIX):
                ours = "marker"
            out[key] = (ours, entry)
    return request.param, out


def test_every_oracle_key_is_known_with_same_shape_component_and_flags(oracle):
    arch, keys = oracle
    lay = L.get_layout(arch, "full")
    blocks = set(L.block_ids(arch))
    problems = []
    for key, (comp, e) in keys.items():
        ours = lay.entries.get(key)
        if ours is None:
            problems.append(f"unknown key {key}")
            continue
        if list(ours.shape) != list(e["shape"]):
            problems.append(f"{key}: shape {ours.shape} vs {e['shape']}")
        if ours.component != comp:
            problems.append(f"{key}: component {ours.component} vs {comp}")
        if ours.optional != bool(e.get("optional", False)):
            problems.append(f"{key}: optional {ours.optional} vs {e.get('optional', False)}")
        if ours.block not in blocks:
            problems.append(f"{key}: block {ours.block} is not an MBW block of {arch}")
        if ours.dtype != "float" and ours.dtype != e["dtype"]:
            problems.append(f"{key}: fixed dtype {ours.dtype} vs {e['dtype']}")
        # sd-mecha's aliases of merged keys (old SD1 CLIP names) must canonicalise to the key; other aliases
        # (EMA spellings) only need to land in the same, never-merged component
        for alias in e.get("aliases", []):
            if comp not in MERGED:
                if L.component_of(arch, alias) != comp:
                    problems.append(f"alias {alias}: component {L.component_of(arch, alias)} vs {comp}")
            elif L.canonical_key(arch, alias) != key:
                problems.append(f"alias {alias} -> {L.canonical_key(arch, alias)} instead of {key}")
    assert not problems, "\n".join(problems[:20])
    assert set(lay.entries) == set(keys), sorted(set(lay.entries) ^ set(keys))[:10]


def test_full_size_factory_plan_matches_the_oracle(oracle):
    """The factory writes exactly the oracle's merged-component keys and shapes (without writing multi-GB files)."""
    arch, keys = oracle
    for extras in (False, True):
        planned = {k: (dt, sh) for k, dt, sh in plan(ModelSpec(arch=arch, size="full", ema=extras, schedule=extras))}
        want = {k for k, (comp, _) in keys.items() if comp in MERGED or (extras and comp in ("ema", "schedule"))}
        assert set(planned) == want, sorted(set(planned) ^ want)[:10]
        for k, (dt, sh) in planned.items():
            assert list(sh) == list(keys[k][1]["shape"]), k
            if k.endswith("position_ids"):
                assert dt == torch.int64
            elif comp_of(arch, k) in MERGED:
                assert dt == torch.float16, k


def comp_of(arch: str, key: str) -> str | None:
    return L.component_of(arch, key)


@pytest.mark.parametrize(("arch", "size"), [(a, s) for a in spec.ARCHITECTURES for s in spec.sizes_of(a)])
def test_shipped_layout_files_are_in_sync_with_spec_and_rules(arch, size):
    built = L.build_entries(arch, size)
    shipped = L.get_layout(arch, size)
    assert list(shipped.entries.values()) == built
    text = (Path(L.__file__).parent / "layouts" / f"{arch}.{size}.json").read_text()
    assert text == L.layout_to_json(built, arch, size), "regenerate with: python -m astolfo_opt.checkpoint.layout"


@pytest.mark.parametrize("arch", spec.ARCHITECTURES)
def test_tiny_and_full_share_every_key_name_and_block(arch):
    full, tiny = L.get_layout(arch, "full"), L.get_layout(arch, "tiny")
    assert list(full.entries) == list(tiny.entries)
    assert [(e.component, e.block, e.optional, e.dtype) for e in full.entries.values()] == \
           [(e.component, e.block, e.optional, e.dtype) for e in tiny.entries.values()]
    assert L.detect_size(arch, {k: e.shape for k, e in tiny.entries.items()}) == "tiny"
    assert L.detect_size(arch, {k: e.shape for k, e in full.entries.items()}) == "full"


U = spec.UNET_PREFIX
GOLDEN = [  # (arch, key, block with the default IN00 convention, block with time_embed_block="BASE")
    ("sd1", U + "time_embed.0.weight", "IN00", "BASE"),
    ("sd1", U + "time_embed.2.bias", "IN00", "BASE"),
    ("sd1", U + "input_blocks.0.0.weight", "IN00", "IN00"),
    ("sd1", U + "input_blocks.11.0.out_layers.3.weight", "IN11", "IN11"),
    ("sd1", U + "middle_block.1.proj_in.weight", "M00", "M00"),
    ("sd1", U + "output_blocks.0.0.skip_connection.weight", "OUT00", "OUT00"),
    ("sd1", U + "output_blocks.11.1.proj_out.bias", "OUT11", "OUT11"),
    ("sd1", U + "out.0.weight", "OUT11", "OUT11"),
    ("sd1", U + "out.2.bias", "OUT11", "OUT11"),
    ("sd1", "cond_stage_model.transformer.text_model.encoder.layers.3.mlp.fc1.weight", "BASE", "BASE"),
    ("sd1", "first_stage_model.decoder.conv_out.weight", "BASE", "BASE"),
    ("sd2", U + "out.2.weight", "OUT11", "OUT11"),
    ("sd2", "cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight", "BASE", "BASE"),
    ("sdxl", U + "time_embed.0.weight", "IN00", "BASE"),
    ("sdxl", U + "label_emb.0.0.weight", "IN00", "BASE"),
    ("sdxl", U + "label_emb.0.2.bias", "IN00", "BASE"),
    ("sdxl", U + "input_blocks.8.1.transformer_blocks.9.attn2.to_k.weight", "IN08", "IN08"),
    ("sdxl", U + "middle_block.1.transformer_blocks.9.ff.net.2.weight", "M00", "M00"),
    ("sdxl", U + "output_blocks.8.0.in_layers.0.weight", "OUT08", "OUT08"),
    ("sdxl", U + "out.2.weight", "OUT08", "OUT08"),
    ("sdxl", "conditioner.embedders.0.transformer.text_model.final_layer_norm.weight", "BASE", "BASE"),
    ("sdxl", "conditioner.embedders.1.model.text_projection", "BASE", "BASE"),
    ("sdxl", "first_stage_model.encoder.mid.attn_1.q.weight", "BASE", "BASE"),
]


@pytest.mark.parametrize(("arch", "key", "default", "base"), GOLDEN)
def test_mbw_blocks_golden(arch, key, default, base):
    lay = L.get_layout(arch, "full")
    assert key in lay.entries
    assert lay.entries[key].block == default  # the shipped data files use the supermerger convention
    assert L.block_of(arch, key) == default
    assert L.block_of(arch, key, time_embed_block="BASE") == base


@pytest.mark.parametrize("arch", spec.ARCHITECTURES)
def test_every_unet_block_has_keys_and_nothing_else_is_blocked(arch):
    lay = L.get_layout(arch, "full")
    unet_blocks = {e.block for e in lay.entries.values() if e.component == "unet"}
    assert unet_blocks == set(L.block_ids(arch)) - {"BASE"}
    assert {e.block for e in lay.entries.values() if e.component != "unet" and e.component != "ema"} == {"BASE"}
    assert L.block_ids(arch)[:2] == ["BASE", "IN00"] and L.block_ids(arch)[-1] == ("OUT08" if arch == "sdxl" else "OUT11")


PINNED = [  # exact shapes of keys whose form differs between architectures
    ("sd1", U + "input_blocks.1.1.proj_in.weight", (320, 320, 1, 1)),
    ("sd2", U + "input_blocks.1.1.proj_in.weight", (320, 320)),
    ("sd1", U + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight", (320, 768)),
    ("sd2", U + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight", (320, 1024)),
    ("sdxl", U + "input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight", (640, 2048)),
    ("sdxl", U + "label_emb.0.0.weight", (1280, 2816)),
    ("sd2", "cond_stage_model.model.transformer.resblocks.23.attn.in_proj_weight", (3072, 1024)),
    ("sdxl", "conditioner.embedders.1.model.text_projection", (1280, 1280)),
    ("sd1", "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight", (49408, 768)),
    ("sd1", "first_stage_model.quant_conv.weight", (8, 8, 1, 1)),
]


@pytest.mark.parametrize(("arch", "key", "shape"), PINNED)
def test_pinned_shapes(arch, key, shape):
    assert L.get_layout(arch, "full").expected_shape(key) == shape


def test_detection_and_aliases():
    assert L.detect_architecture(L.get_layout("sdxl").entries) == "sdxl"
    assert L.detect_architecture(L.get_layout("sd2").entries) == "sd2"
    assert L.detect_architecture(L.get_layout("sd1").entries) == "sd1"
    assert L.detect_architecture(["bert.encoder.layer.0.weight"]) is None
    old = "cond_stage_model.transformer.encoder.layers.0.mlp.fc1.weight"
    assert L.canonical_key("sd1", old) == "cond_stage_model.transformer.text_model.encoder.layers.0.mlp.fc1.weight"
    assert L.canonical_key("sd1", L.canonical_key("sd1", old)) == L.canonical_key("sd1", old)  # idempotent
    assert L.component_of("sd1", "model_ema.diffusion_modelout2weight") == "ema"
    assert L.component_of("sd1", "betas") == "schedule"
    assert L.component_of("sd1", "conditioner.embedders.1.model.ln_final.weight") is None
    with pytest.raises(ValueError, match="unknown architecture"):
        L.get_layout("sd3")
