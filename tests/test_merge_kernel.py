"""The streaming merge kernel on tiny real-layout fixtures: float64 references, methods, MBW, repairs, NaN policy."""

from __future__ import annotations

import logging

import pytest
import torch

from astolfo_opt.checkpoint.io import open_checkpoint
from astolfo_opt.checkpoint.layout import block_ids, block_of, get_layout
from astolfo_opt.checkpoint.writer import save_safetensors
from astolfo_opt.errors import CheckpointError, ConfigError, NonFiniteError
from astolfo_opt.merge.kernel import merge
from astolfo_opt.merge.recipe import ComponentRecipe, Member, Recipe
from astolfo_opt.merge.sinks import CollectSink, SafetensorsSink, merge_metadata
from astolfo_opt.testing.factory import ModelSpec, make_checkpoint


def _t(path, key) -> torch.Tensor:
    with open_checkpoint(path) as r:
        return r.get(key).double()


def _models(pool) -> dict[str, str]:
    return {p.stem: str(p) for p in pool.all}


@pytest.mark.parametrize("arch", ["sd1", "sd2", "sdxl"])
def test_uniform_average_matches_float64_reference(tiny_pools, arch):
    pool = tiny_pools[arch]
    sink = CollectSink()
    stats = merge(Recipe.average(pool.models), sink, out_dtype=torch.float32, threads=2)
    layout = get_layout(arch, "tiny")
    want = {k for k, e in layout.entries.items() if e.component in layout.components}
    assert set(sink.tensors) == want and stats.keys == len(want)
    assert list(sink.tensors) == [k for k in layout.entries if k in want]  # emitted in layout order
    rebuilt = sum(k.endswith("position_ids") for k in want)  # position_ids are rebuilt, never read
    assert stats.models == 3 and stats.tensors_read == 3 * (len(want) - rebuilt)
    for key in list(sink.tensors)[::23]:
        if key.endswith("position_ids"):
            continue
        ref = sum(_t(p, key) for p in pool.models) / 3
        assert torch.allclose(sink.tensors[key].double(), ref, rtol=1e-5, atol=1e-6), key


def test_fp16_output_and_float64_accumulation(tiny_pools):
    pool = tiny_pools["sd1"]
    key = "model.diffusion_model.middle_block.1.proj_in.weight"
    ref = sum(_t(p, key) for p in pool.models) / 3
    for out_dtype, acc, tol in ((torch.float16, torch.float32, 1e-3), (torch.float64, torch.float64, 1e-12)):
        sink = CollectSink()
        merge(Recipe.average(pool.models), sink, out_dtype=out_dtype, accumulate_dtype=acc, components=["unet"])
        assert sink.tensors[key].dtype == out_dtype
        assert torch.allclose(sink.tensors[key].double(), ref, atol=tol, rtol=tol)


def test_results_independent_of_threads_and_member_order(tiny_pools):
    pool = tiny_pools["sd2"]
    a, b = CollectSink(), CollectSink()
    merge(Recipe.average(pool.models), a, out_dtype=torch.float32, threads=1)
    merge(Recipe.average(list(reversed(pool.models))), b, out_dtype=torch.float32, threads=4)
    assert list(a.tensors) == list(b.tensors)
    for k in a.tensors:
        assert torch.allclose(a.tensors[k], b.tensors[k], rtol=1e-6, atol=1e-7), k


def test_methods_and_anchor_mbw_against_reference(tiny_pools):
    pool = tiny_pools["sd1"]
    models = _models(pool)
    alpha = {b: 0.1 + 0.03 * i for i, b in enumerate(block_ids("sd1"))}
    recipe = Recipe(models=models, base="base", components={
        "unet": ComponentRecipe("weighted_average", [Member("m00", 1.0), Member("m01", 3.0)], anchor="m02", alpha=alpha),
        "te0": ComponentRecipe("weighted_sum", [Member("m00"), Member("m02")], alpha_default=0.25),
        "vae": ComponentRecipe("add_difference", [Member("m00"), Member("m01"), Member("base")], alpha_default=0.7),
    })
    sink = CollectSink()
    merge(recipe, sink, out_dtype=torch.float32)
    layout = get_layout("sd1", "tiny")
    seen = set()
    for key, out in list(sink.tensors.items())[::7]:
        if key.endswith("position_ids"):
            continue
        comp, block = layout.entries[key].component, block_of("sd1", key)
        t = {n: _t(p, key) for n, p in models.items()}
        if comp == "unet":
            a = alpha[block]
            want = (1 - a) * t["m02"] + a * (t["m00"] + 3 * t["m01"]) / 4
        elif comp == "te0":
            want = 0.75 * t["m00"] + 0.25 * t["m02"]
        else:
            want = t["m00"] + 0.7 * (t["m01"] - t["base"])
        assert torch.allclose(out.double(), want, rtol=1e-5, atol=1e-6), key
        seen.add((comp, block))
    assert len({b for c, b in seen if c == "unet"}) >= 20 and {c for c, _ in seen} == {"unet", "te0", "vae"}


def test_copy_and_component_absent_from_recipe_copies_base(tiny_pools):
    pool = tiny_pools["sd1"]
    recipe = Recipe(models=_models(pool), base="base", components={"unet": ComponentRecipe("copy", [Member("m01")])})
    sink = CollectSink()
    merge(recipe, sink, out_dtype=torch.float16)
    for key in ("model.diffusion_model.out.2.weight", "first_stage_model.decoder.conv_out.weight",
                "cond_stage_model.transformer.text_model.final_layer_norm.weight"):
        src = pool.models[1] if key.startswith("model.") else pool.base
        assert torch.equal(sink.tensors[key], open_checkpoint(src).get(key)), key


def test_block_weights_per_model_per_block(tiny_pools):
    pool = tiny_pools["sdxl"]
    models = _models(pool)
    recipe = Recipe(models=models, components={"unet": ComponentRecipe(
        "weighted_average", [Member("m00"), Member("m01")], block_weights={"m01": {"OUT08": 0.0, "M00": 3.0}, "m00": {"IN00": 0.0}})})
    sink = CollectSink()
    merge(recipe, sink, out_dtype=torch.float32, components=["unet"])
    k_out = "model.diffusion_model.out.2.weight"  # OUT08 on SDXL: m01 weighs 0 -> only m00
    assert torch.allclose(sink.tensors[k_out].double(), _t(models["m00"], k_out))
    k_mid = "model.diffusion_model.middle_block.0.in_layers.2.weight"
    assert torch.allclose(sink.tensors[k_mid].double(), (_t(models["m00"], k_mid) + 3 * _t(models["m01"], k_mid)) / 4, atol=1e-6)
    k_lab = "model.diffusion_model.label_emb.0.0.weight"  # IN00 by default (supermerger): m00 weighs 0 -> only m01
    assert torch.allclose(sink.tensors[k_lab].double(), _t(models["m01"], k_lab))
    recipe.time_embed_block = "BASE"
    sink2 = CollectSink()
    merge(recipe, sink2, out_dtype=torch.float32, components=["unet"])
    assert torch.allclose(sink2.tensors[k_lab].double(), (_t(models["m00"], k_lab) + _t(models["m01"], k_lab)) / 2, atol=1e-6)
    assert set(sink.tensors) == set(get_layout("sdxl", "tiny").required_keys("unet"))


@pytest.mark.parametrize("arch, key, block", [
    ("sd1", "model.diffusion_model.input_blocks.0.0.weight", "IN00"),
    ("sd1", "model.diffusion_model.time_embed.0.weight", "IN00"),
    ("sd1", "model.diffusion_model.input_blocks.11.0.out_layers.3.weight", "IN11"),
    ("sd1", "model.diffusion_model.middle_block.1.proj_in.weight", "M00"),
    ("sd1", "model.diffusion_model.output_blocks.0.0.in_layers.2.weight", "OUT00"),
    ("sd1", "model.diffusion_model.output_blocks.11.1.proj_out.weight", "OUT11"),
    ("sd1", "model.diffusion_model.out.2.weight", "OUT11"),
    ("sd1", "cond_stage_model.transformer.text_model.encoder.layers.0.mlp.fc1.weight", "BASE"),
    ("sd1", "first_stage_model.decoder.conv_out.weight", "BASE"),
    ("sd2", "model.diffusion_model.out.0.weight", "OUT11"),
    ("sd2", "cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight", "BASE"),
    ("sdxl", "model.diffusion_model.out.2.weight", "OUT08"),
    ("sdxl", "model.diffusion_model.output_blocks.8.0.skip_connection.weight", "OUT08"),
    ("sdxl", "model.diffusion_model.input_blocks.8.0.in_layers.2.weight", "IN08"),
    ("sdxl", "model.diffusion_model.label_emb.0.0.weight", "IN00"),
    ("sdxl", "conditioner.embedders.1.model.ln_final.weight", "BASE"),
])
def test_mbw_block_assignment_golden(arch, key, block):
    assert key in get_layout(arch, "full").entries
    assert block_of(arch, key) == block
    assert block in block_ids(arch)


def test_time_embed_block_option_golden():
    assert block_of("sd1", "model.diffusion_model.time_embed.2.bias", "BASE") == "BASE"
    assert block_of("sdxl", "model.diffusion_model.label_emb.0.2.weight", "BASE") == "BASE"
    assert block_of("sdxl", "model.diffusion_model.time_embed.0.weight") == "IN00"


@pytest.fixture(scope="module")
def odd_pool(tmp_path_factory):
    """Pruned, EMA-carrying, old-style .ckpt and shuffled-position_ids members around a healthy base."""
    d = tmp_path_factory.mktemp("odd_pool")
    return {
        "base": make_checkpoint(d / "base.safetensors", ModelSpec(seed=7, spread=0.0)),
        "pruned": make_checkpoint(d / "pruned.safetensors", ModelSpec(seed=1, drop={"vae": 1.0, "te0": 0.5}, ema=True)),
        "odd": make_checkpoint(d / "odd.ckpt", ModelSpec(seed=2, fmt="ckpt", old_style_te=True, position_ids="float")),
        "shuf": make_checkpoint(d / "shuf.safetensors", ModelSpec(seed=3, position_ids="shuffled", ema=True)),
    }


def test_pruned_ema_position_ids_repairs_and_read_back(odd_pool, tmp_path):
    p = odd_pool
    recipe = Recipe.average([p["pruned"], p["odd"], p["shuf"], p["base"]])
    recipe.base = "base"
    for c in recipe.components.values():
        c.members = [m for m in c.members if m.model != "base"]
    out = tmp_path / "out.safetensors"
    merge(recipe, SafetensorsSink(out, merge_metadata(recipe)), out_dtype=torch.float32)
    r = open_checkpoint(out)
    layout = get_layout("sd1", "tiny")
    keys = r.keys()
    assert not any(k.startswith("model_ema.") for k in keys)
    assert set(layout.required_keys()) <= set(keys)
    assert set(keys) <= set(layout.entries)
    pos = r.get("cond_stage_model.transformer.text_model.embeddings.position_ids")
    assert pos.dtype == torch.int64 and torch.equal(pos, torch.arange(77).reshape(1, 77))
    # VAE missing from `pruned`: the two members that have it, renormalised
    k = "first_stage_model.decoder.conv_out.weight"
    assert torch.allclose(r.get(k).double(), (_t(p["odd"], k) + _t(p["shuf"], k)) / 2, atol=1e-6)
    # te0 keys missing from `pruned`: averaged over `odd` (old-style names, remapped) and `shuf`
    pr = set(open_checkpoint(p["pruned"]).keys())
    te_missing = [k for k in layout.keys_of("te0") if k not in pr and "position_ids" not in k]
    te_present = [k for k in layout.keys_of("te0") if k in pr and "position_ids" not in k]
    assert te_missing and te_present
    old = "cond_stage_model.transformer." + te_missing[0][len("cond_stage_model.transformer.text_model."):]
    want = (open_checkpoint(p["odd"]).get(old).double() + _t(p["shuf"], te_missing[0])) / 2
    assert torch.allclose(r.get(te_missing[0]).double(), want, atol=1e-6)
    k = te_present[0]
    old = "cond_stage_model.transformer." + k[len("cond_stage_model.transformer.text_model."):]
    want = (_t(p["pruned"], k) + open_checkpoint(p["odd"]).get(old).double() + _t(p["shuf"], k)) / 3
    assert torch.allclose(r.get(k).double(), want, atol=1e-6)
    meta = r.metadata
    assert Recipe.from_json(meta["recipe"]).hash() == recipe.hash()
    assert meta["astolfo_opt_version"] and "sd_merge_recipe" in meta and "sd_merge_models" in meta


def test_key_missing_in_every_member_comes_from_base(odd_pool):
    p = odd_pool
    recipe = Recipe(models={"pruned": str(p["pruned"]), "base": str(p["base"])}, base="base",
                    components={c: ComponentRecipe("weighted_average", [Member("pruned")]) for c in ("unet", "te0", "vae")})
    sink = CollectSink()
    merge(recipe, sink, out_dtype=torch.float16, components=["vae"])
    k = "first_stage_model.encoder.conv_in.weight"
    assert torch.equal(sink.tensors[k], open_checkpoint(p["base"]).get(k))
    recipe.base = None
    with pytest.raises(CheckpointError, match="no model in the recipe provides first_stage_model"):
        merge(recipe, CollectSink(), components=["vae"])


def test_linear_proj_in_reshaped_to_conv_layout(tiny_pools, tmp_path):
    pool = tiny_pools["sd1"]
    r = open_checkpoint(pool.models[0])
    tensors = {k: r.get(k).clone() for k in list(r.keys())}
    key = "model.diffusion_model.input_blocks.1.1.proj_in.weight"
    assert tensors[key].dim() == 4
    tensors[key] = tensors[key][:, :, 0, 0].contiguous()  # the SD2-style Linear form
    lin = save_safetensors(tmp_path / "linear.safetensors", tensors)
    sink = CollectSink()
    merge(Recipe.average([lin, pool.models[1]]), sink, out_dtype=torch.float32, components=["unet"])
    assert sink.tensors[key].shape == get_layout("sd1", "tiny").expected_shape(key)
    assert torch.allclose(sink.tensors[key].double(), (_t(pool.models[0], key) + _t(pool.models[1], key)) / 2, atol=1e-6)


def test_shape_mismatch_names_model_and_key(tiny_pools, tmp_path):
    pool = tiny_pools["sd1"]
    r = open_checkpoint(pool.models[0])
    tensors = {k: r.get(k).clone() for k in list(r.keys())}
    tensors["model.diffusion_model.out.2.weight"] = torch.zeros(4, 32, 3, 2, dtype=torch.float16)
    b = save_safetensors(tmp_path / "b.safetensors", tensors)
    with pytest.raises(CheckpointError, match="b.safetensors: tensor model.diffusion_model.out.2.weight has shape"):
        merge(Recipe.average([pool.models[1], b]), CollectSink())


@pytest.fixture(scope="module")
def nan_pair(tmp_path_factory):
    d = tmp_path_factory.mktemp("nan_pair")
    key = "model.diffusion_model.middle_block.1.proj_in.weight"
    return key, make_checkpoint(d / "good.safetensors", ModelSpec(seed=1)), \
        make_checkpoint(d / "bad.safetensors", ModelSpec(seed=2, corrupt={key: "nan"}))


def test_nan_policy_error_names_model_and_key(nan_pair):
    key, good, bad = nan_pair
    with pytest.raises(NonFiniteError, match=f"bad: tensor {key} holds") as e:
        merge(Recipe.average([good, bad]), CollectSink(), components=["unet"])
    assert e.value.model == "bad" and e.value.key == key and e.value.count > 0


def test_nan_policy_drop_model_drops_it_for_that_key_only(nan_pair, caplog):
    key, good, bad = nan_pair
    recipe = Recipe.average([good, bad])
    recipe.nan_policy = "drop_model"
    sink = CollectSink()
    with caplog.at_level(logging.WARNING, logger="astolfo_opt.merge.kernel"):
        merge(recipe, sink, out_dtype=torch.float32, components=["unet"])
    assert torch.allclose(sink.tensors[key].double(), _t(good, key))
    other = "model.diffusion_model.out.2.weight"
    assert torch.allclose(sink.tensors[other].double(), (_t(good, other) + _t(bad, other)) / 2, atol=1e-6)
    assert any("bad" in rec.getMessage() and key in rec.getMessage() for rec in caplog.records)
    # a fixed slot (weighted_sum's A / B) has no substitute even under drop_model: the error names the model
    ws = Recipe(models=recipe.models, nan_policy="drop_model",
                components={"unet": ComponentRecipe("weighted_sum", [Member("good"), Member("bad")], alpha_default=0.5)})
    with pytest.raises(NonFiniteError, match=f"bad: tensor {key}"):
        merge(ws, CollectSink(), components=["unet"])


def test_bad_arguments_are_config_errors(tiny_pools):
    pool = tiny_pools["sd1"]
    with pytest.raises(ConfigError, match="unknown component"):
        merge(Recipe.average(pool.models), CollectSink(), components=["clip"])
    with pytest.raises(ConfigError, match="dtype"):
        merge(Recipe.average(pool.models), CollectSink(), out_dtype="fp8")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="CUDA is not available"):
            merge(Recipe.average(pool.models), CollectSink(), device="cuda")


def test_sinks_metadata_abort_and_null(tiny_pools, tmp_path):
    import json

    from astolfo_opt.checkpoint.hashing import legacy_model_hash
    from astolfo_opt.merge.sinks import NullSink

    pool = tiny_pools["sd1"]
    recipe = Recipe.average(pool.models)
    meta = merge_metadata(recipe, {"trial": 7, "note": "x"}, hashes={"m01": "ab" * 32})
    models = json.loads(meta["sd_merge_models"])
    assert models["ab" * 32]["model"] == "m01"
    assert models[legacy_model_hash(pool.models[0])]["name"] == "m00.safetensors"
    assert meta["trial"] == "7" and meta["note"] == "x" and json.loads(meta["sd_merge_recipe"])["models"]["unet"]
    null = NullSink()
    stats = merge(recipe, null, components=["vae"])
    assert null.count == stats.keys == len(get_layout("sd1", "tiny").keys_of("vae"))
    out = tmp_path / "aborted.safetensors"
    sink = SafetensorsSink(out, meta)
    with pytest.raises(ConfigError):  # fails after begin(): the partial file is removed, nothing is renamed
        merge(recipe, _FailingAfter(sink, 10), components=["unet"])
    assert not out.exists() and not list(tmp_path.glob(".aborted.safetensors.partial-*"))


class _FailingAfter:
    def __init__(self, inner, n):
        self.inner, self.n = inner, n

    def begin(self, plan):
        self.inner.begin(plan)

    def consume(self, key, tensor):
        self.n -= 1
        if self.n < 0:
            raise ConfigError("sink refused")
        self.inner.consume(key, tensor)

    def end(self):
        self.inner.end()

    def abort(self):
        self.inner.abort()


class DirectSink(CollectSink):
    """A sink that, like the live-pipeline swap, offers a flat fp32 destination per UNet key for the fused write."""

    def __init__(self):
        super().__init__()
        self.buffers: dict[str, torch.Tensor] = {}
        self.written: set[str] = set()

    def begin(self, plan) -> None:
        super().begin(plan)
        self.buffers = {pt.key: torch.full((int(torch.Size(pt.shape).numel()),), float("nan")) for pt in plan
                        if pt.key.startswith("model.diffusion_model.")}

    def direct_target(self, key: str):
        return self.buffers.get(key)

    def mark_written(self, key: str) -> None:
        self.written.add(key)


@pytest.mark.parametrize("chunk", [None, 64], ids=["whole", "chunked"])
def test_direct_destination_gets_exactly_the_emitted_tensor(nan_pair, monkeypatch, chunk):
    """The fused write (kernel narrows straight into the swap's parameters) must hold the very values handed to
    ``consume`` - also for a key recomputed under ``nan_policy: drop_model``, whose first (NaN) result must never
    stay in the destination."""
    import astolfo_opt.merge.execute as execute

    if chunk:
        monkeypatch.setattr(execute, "_CHUNK", chunk)  # every UNet tensor takes the slice-by-slice path
    key, good, bad = nan_pair
    recipe = Recipe.average([good, bad])
    recipe.nan_policy = "drop_model"
    sink = DirectSink()
    merge(recipe, sink, out_dtype=torch.float16, components=["unet"], threads=2)
    assert len(sink.written) > 100 and key not in sink.written  # the recomputed key went the copying way
    for k in sink.written:
        assert torch.equal(sink.buffers[k], sink.tensors[k].float().reshape(-1)), k
    assert torch.allclose(sink.tensors[key].double(), _t(good, key), atol=1e-3)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("arch", ["sd1", "sdxl"])
def test_cuda_merge_matches_the_cpu_merge(tiny_pools, arch):
    """The CUDA path (pinned staging, a stream per worker) computes what the CPU path does: same keys, same dtypes,
    values equal to fp32 rounding of the fp16 output."""
    pool = tiny_pools[arch]
    recipe = Recipe.average(pool.models)
    cpu, gpu = CollectSink(), CollectSink()
    merge(recipe, cpu, device="cpu")
    merge(recipe, gpu, device="cuda")
    assert cpu.tensors.keys() == gpu.tensors.keys()
    for k, t in cpu.tensors.items():
        assert gpu.tensors[k].dtype == t.dtype, k
        torch.testing.assert_close(gpu.tensors[k].float(), t.float(), rtol=1e-3, atol=1e-3, msg=k)
