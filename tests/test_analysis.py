"""Weight-space analysis on generated real-layout pools: exact distances, outliers, clusters, duplicates, maps, cache."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from matplotlib.text import Text

from astolfo_opt.analysis import analyse_pool, build_figure, render_maps
from astolfo_opt.analysis import distances as dist_mod
from astolfo_opt.analysis.outliers import find_clusters, find_outliers, robust_z
from astolfo_opt.checkpoint import io as io_mod
from astolfo_opt.checkpoint.io import open_checkpoint
from astolfo_opt.checkpoint.layout import canonical_key, detect_architecture, get_layout
from astolfo_opt.errors import AstolfoError
from astolfo_opt.testing.factory import ModelSpec, make_checkpoint, make_pool

FAR = 3  # index of the planted far-off model


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ASTOLFO_OPT_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def mixed_pool(tmp_path_factory):
    """Base + 4 SD1 models exercising readers and key handling: a .ckpt, old-style CLIP keys, a partly pruned VAE."""
    folder = tmp_path_factory.mktemp("mixed")
    return make_pool(folder, n=4, overrides={1: {"fmt": "ckpt"}, 2: {"old_style_te": True}, 3: {"drop": {"vae": 0.3}}})


@pytest.fixture(scope="module")
def far_pool(tmp_path_factory):
    """8 models of spreads 0.03-0.08, model FAR with a 10x UNet delta."""
    return make_pool(tmp_path_factory.mktemp("far"), n=8, seed=3, overrides={FAR: {"spread_scale": {"unet": 10.0}}})


@pytest.fixture(scope="module")
def dup_pool(tmp_path_factory):
    """4 independent models + one model re-saved as fp32 and bf16 + two models sharing a bit-identical te0."""
    pool = make_pool(tmp_path_factory.mktemp("dup"), n=4, seed=5)
    f = pool.folder
    extra = [make_checkpoint(f / f"twin_{dt}.safetensors", ModelSpec(seed=777, spread=0.05, dtype=dt)) for dt in ("fp16", "fp32", "bf16")]
    extra += [make_checkpoint(f / f"clip{i}.safetensors", ModelSpec(seed=900 + i, spread=0.06, component_seeds={"te0": 42}))
              for i in range(2)]
    return pool, extra


def _names(paths):
    return [Path(p).stem for p in paths]


def brute_force(paths, base, comp):
    """Reference: float64 pairwise distances / cosines, summed key by key directly from the tensors (no Gram trick)."""
    readers = [open_checkpoint(p) for p in paths]
    arch = detect_architecture(readers[0].keys())
    def keymap(r):  # canonical -> raw (readers are not iterable)
        raw = r.keys()
        return {canonical_key(arch, k): k for k in raw}

    maps = [keymap(r) for r in readers]
    b_reader = open_checkpoint(base) if base else None
    b_map = keymap(b_reader) if b_reader else None
    layout = get_layout(arch, "tiny")
    n = len(paths)
    sq = np.zeros((n, n))
    dots = np.zeros((n, n))
    keys = [k for k in layout.keys_of(comp) if layout.entries[k].dtype == "float"
            and all(k in m for m in maps) and (b_map is None or k in b_map)]
    for k in keys:
        x = [r.get(m[k]).double().reshape(-1) for r, m in zip(readers, maps, strict=True)]
        ref = b_reader.get(b_map[k]).double().reshape(-1) if b_reader else torch.stack(x).mean(0)
        d = [xi - ref for xi in x]
        for a in range(n):
            for b in range(n):
                sq[a, b] += float(((x[a] - x[b]) ** 2).sum())
                dots[a, b] += float((d[a] * d[b]).sum())
    nrm = np.sqrt(np.diag(dots))
    return np.sqrt(sq), dots / np.outer(nrm, nrm), len(keys)


@pytest.mark.parametrize("with_base", [True, False])
def test_distances_match_float64_reference(mixed_pool, with_base):
    base = mixed_pool.base if with_base else None
    a = analyse_pool(mixed_pool.models, base, progress=False, cache=False)
    assert a.arch == "sd1" and list(a.components) == ["unet", "te0", "vae"]
    assert a.names == _names(mixed_pool.models)
    for comp in ("unet", "te0", "vae"):
        ref_d, ref_cos, nkeys = brute_force(mixed_pool.models, base, comp)
        ca = a[comp]
        assert ca.names == a.names and ca.keys_used == nkeys
        np.testing.assert_allclose(ca.distance, ref_d, rtol=1e-6, atol=1e-9)
        np.testing.assert_allclose(ca.cosine, ref_cos, rtol=1e-6, atol=1e-6)
        if with_base:
            base_ref = brute_force([mixed_pool.base, *mixed_pool.models], None, comp)[0][0, 1:]
            np.testing.assert_allclose(ca.base_distance, base_ref, rtol=1e-6)
    # model 3 dropped ~30 % of its VAE keys: those keys are skipped for all and counted
    vae = a["vae"]
    n_vae = len([k for k in get_layout("sd1", "tiny").keys_of("vae")])
    assert 0 < vae.skipped_keys < n_vae and vae.keys_used + vae.skipped_keys == n_vae
    assert a["unet"].skipped_keys == 0
    assert any(f"skipped {vae.skipped_keys} keys" in line for line in a.summary_lines())
    json.dumps(a.to_json(), allow_nan=False)  # JSON-safe (NaN cosines become null)


def test_planted_far_model_is_flagged_in_unet_only(far_pool):
    far = far_pool.models[FAR].stem
    for base in (far_pool.base, None):
        a = analyse_pool(far_pool.models, base, progress=False, cache=False)
        (o,) = a["unet"].outliers
        assert o.name == far and o.component == "unet" and o.robust_z > 3.5
        assert o.suggestion == f"pool.exclude=[{far}]"
        if base is not None:
            assert o.measure == "distance to base"
            assert o.distance == pytest.approx(float(a["unet"].base_distance[FAR]))
            assert o.distance > 5 * o.median
        assert a["te0"].outliers == [] and a["vae"].outliers == []
        assert any(line.strip().startswith(f"outlier {far}") and "robust z" in line for line in a.summary_lines())
        # the honest map: the far model owns the first axis, the extra panel maps the rest
        names, coords, share = a["unet"].mds_inliers
        assert far not in names and len(names) == 7 and coords.shape == (7, 2) and 0 < share <= 1
        # hierarchical clusters split the far model off
        assert [far] in a["unet"].clusters


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_no_false_alarm_on_clean_pool(tmp_path, seed):
    # seed 0: the factory's evenly spaced spreads; others: spreads drawn at random in 0.03-0.08
    spreads = None if seed == 0 else np.random.default_rng(seed).uniform(0.03, 0.08, 8).tolist()
    pool = make_pool(tmp_path, n=8, seed=seed, spreads=spreads)
    for base in (pool.base, None):
        a = analyse_pool(pool.models, base, progress=False, cache=False)
        for ca in a.components.values():
            assert ca.outliers == [], (seed, ca.component, [o.message() for o in ca.outliers])
            assert ca.near_duplicates == []
            assert ca.clusters == [ca.names]


def test_near_duplicates_and_identical_components(dup_pool):
    pool, extra = dup_pool
    a = analyse_pool([*pool.models, *extra], pool.base, progress=False, cache=False)
    for comp in ("unet", "te0", "vae"):
        groups = a[comp].near_duplicates
        twins = [g for g in groups if "twin_fp16" in g.names]
        assert len(twins) == 1 and sorted(twins[0].names) == ["twin_bf16", "twin_fp16", "twin_fp32"]
        assert not twins[0].exact and twins[0].dtypes["twin_bf16"] == "bfloat16"
        assert twins[0].max_distance < 0.05 * a[comp].median_distance()
        rest = [g for g in groups if g is not twins[0]]
        if comp == "te0":  # clip0 / clip1 carry a bit-identical text encoder
            assert [sorted(g.names) for g in rest] == [["clip0", "clip1"]] and rest[0].exact
            assert rest[0].max_distance == pytest.approx(0.0, abs=1e-9)
        else:
            assert rest == []
    assert any("near-duplicates" in line and "twin_bf16 [bfloat16]" in line for line in a.summary_lines())
    assert any("same values" in line and "clip0" in line for line in a.summary_lines())


def test_two_families_form_two_clusters(tmp_path):
    fam = [make_checkpoint(tmp_path / f"a{i}.safetensors", ModelSpec(seed=i, base_seed=1234)) for i in range(3)]
    fam += [make_checkpoint(tmp_path / f"b{i}.safetensors", ModelSpec(seed=10 + i, base_seed=99)) for i in range(3)]
    a = analyse_pool(fam, progress=False, cache=False, components=["unet"])
    assert list(a.components) == ["unet"]
    assert sorted(sorted(g) for g in a["unet"].clusters) == [["a0", "a1", "a2"], ["b0", "b1", "b2"]]
    assert a["unet"].outliers == []
    assert any("2 clusters" in line for line in a.summary_lines())


def test_grouped_pass_gives_each_blocks_gram(mixed_pool):
    """``accumulate(group_of=...)`` (the search surrogate's per-MBW-block geometry) equals Grams summed block by block
    directly from the tensors, and the groups partition the component's Gram."""
    models, base, layout = dist_mod.open_pool([Path(p) for p in mixed_pool.models], Path(mixed_pool.base))
    try:
        stats = dist_mod.accumulate(models, base, layout, ["unet", "te0"], torch.device("cpu"), progress=False,
                                    group_of=lambda k: layout.block_of(k, None) or "BASE")
        for comp, st in stats.items():
            assert len(st.group_grams) > (10 if comp == "unet" else 0)
            np.testing.assert_allclose(sum(st.group_grams.values()), st.gram, rtol=1e-12)
            want: dict[str, np.ndarray] = {}
            for k in dist_mod.plan_component(comp, layout, models, base)[0]:
                b = base.reader.get(base.keymap[k]).double().reshape(-1)
                d = torch.stack([m.reader.get(m.keymap[k]).double().reshape(-1) - b for m in models])
                label = layout.block_of(k, None) or "BASE"
                want[label] = want.get(label, 0) + (d @ d.T).numpy()
            assert want.keys() == st.group_grams.keys()
            for label, g in want.items():
                np.testing.assert_allclose(st.group_grams[label], g, rtol=1e-9, atol=1e-12)
            back = dist_mod.ComponentStats.from_json(json.loads(json.dumps(st.to_json())))
            assert all(np.array_equal(back.group_grams[k], v) for k, v in st.group_grams.items())
    finally:
        for o in [*models, base]:
            o.reader.close()


def test_nan_and_absent_component_are_excluded_and_reported(tmp_path):
    key = "first_stage_model.decoder.conv_in.weight"
    pool = make_pool(tmp_path, n=5, overrides={1: {"corrupt": {key: "nan"}}, 2: {"drop": {"te0": 1.0}}})
    a = analyse_pool(pool.models, None, progress=False, cache=False)
    assert "m01" not in a["vae"].names and key in a["vae"].excluded["m01"]
    assert "m02" not in a["te0"].names and "absent" in a["te0"].excluded["m02"]
    assert "m01" in a["unet"].names and "m02" in a["unet"].names
    assert np.isfinite(a["vae"].distance).all() and a["vae"].distance.shape == (4, 4)
    ref = brute_force([p for p in pool.models if p.stem != "m01"], None, "vae")[0]
    np.testing.assert_allclose(a["vae"].distance, ref, rtol=1e-6)
    assert any("excluded m01" in line for line in a.summary_lines())


def test_sdxl_pool_distances(tmp_path):
    pool = make_pool(tmp_path, n=3, arch="sdxl")
    a = analyse_pool(pool.models, pool.base, progress=False, cache=False, components=["te1", "vae"])
    assert a.arch == "sdxl" and list(a.components) == ["te1", "vae"]
    for comp in ("te1", "vae"):
        ref_d, ref_cos, nkeys = brute_force(pool.models, pool.base, comp)
        np.testing.assert_allclose(a[comp].distance, ref_d, rtol=1e-6, atol=1e-9)
        np.testing.assert_allclose(a[comp].cosine, ref_cos, rtol=1e-6, atol=1e-6)
        assert a[comp].keys_used == nkeys


def _figure_texts(fig) -> str:
    return "\n".join(t.get_text() for t in fig.findobj(Text))


def test_figure_names_every_model_and_png_is_valid(far_pool, tmp_path):
    a = analyse_pool(far_pool.models, far_pool.base, progress=False, cache=False)
    fig = build_figure(a)
    texts = _figure_texts(fig)
    for name in a.names:
        assert texts.count(name) >= 2 * len(a.components)  # map label + heatmap tick labels in every row
    assert "base" in texts and "variance" in texts and "excluding outliers" in texts
    assert len(fig.axes) >= 3 * len(a.components)  # map, heatmap (+colorbar), outlier-free map
    (png,) = render_maps(a, tmp_path / "map.png")
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    from PIL import Image

    with Image.open(png) as im:
        im.verify()
    with pytest.raises(AstolfoError, match=r"\.png"):
        render_maps(a, tmp_path / "map.jpg")
    with pytest.raises(AstolfoError, match="does not exist"):
        render_maps(a, tmp_path / "nope" / "map.png")


def test_figure_lists_excluded_models(tmp_path):
    pool = make_pool(tmp_path, n=4, overrides={0: {"corrupt": {"first_stage_model.decoder.conv_in.weight": "inf"}}})
    a = analyse_pool(pool.models, progress=False, cache=False)
    texts = _figure_texts(build_figure(a))
    assert "not shown: m00" in texts and "pool mean" in texts


def test_cache_hit_reads_no_tensors(mixed_pool, monkeypatch):
    first = analyse_pool(mixed_pool.models, mixed_pool.base, progress=False)
    assert first.cached == []
    assert (Path(os.environ["ASTOLFO_OPT_CACHE"]) / dist_mod.CACHE_FILE).exists()
    calls = []
    for cls in (io_mod.SafetensorsReader, io_mod.PickleCheckpointReader):
        orig = cls.get
        monkeypatch.setattr(cls, "get", lambda self, key, _o=orig: calls.append(key) or _o(self, key))
    second = analyse_pool(mixed_pool.models, mixed_pool.base, progress=False)
    assert calls == [] and second.cached == ["unet", "te0", "vae"]
    for comp in second.components:
        np.testing.assert_array_equal(second[comp].distance, first[comp].distance)
        assert second[comp].skipped == first[comp].skipped
    # a different base, or a touched file, is a different cache entry
    analyse_pool(mixed_pool.models, None, progress=False, components=["te0"])
    assert calls
    calls.clear()
    st = mixed_pool.models[0].stat()
    os.utime(mixed_pool.models[0], ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    third = analyse_pool(mixed_pool.models, mixed_pool.base, progress=False, components=["te0"])
    assert calls and third.cached == []


def test_bad_input_is_one_line_error(mixed_pool, tmp_path):
    sdxl = make_checkpoint(tmp_path / "xl.safetensors", ModelSpec(arch="sdxl"))
    with pytest.raises(AstolfoError, match="mixes architectures"):
        analyse_pool([*mixed_pool.models[:2], sdxl], progress=False, cache=False)
    with pytest.raises(AstolfoError, match="unknown component"):
        analyse_pool(mixed_pool.models, progress=False, cache=False, components=["clip"])
    with pytest.raises(AstolfoError, match="not found"):
        analyse_pool([tmp_path / "missing.safetensors"], progress=False, cache=False)
    with pytest.raises(AstolfoError, match="exist in sd1"):
        analyse_pool(mixed_pool.models, progress=False, cache=False, components=["te1"])
    with pytest.raises(AstolfoError, match="empty"):
        analyse_pool([], progress=False, cache=False)
    with pytest.raises(AstolfoError, match="unknown device"):
        analyse_pool(mixed_pool.models, progress=False, cache=False, device="tpu9")
    if not torch.cuda.is_available():
        with pytest.raises(AstolfoError, match="CUDA is not available"):
            analyse_pool(mixed_pool.models, progress=False, cache=False, device="cuda")


def test_robust_rules_guard_degenerate_pools():
    # most members ship the base text encoder (distance 0): MAD is 0, the mean deviation stands in
    z, med, scale, rule = robust_z([0.0] * 7 + [1.0])
    assert med == 0.0 and scale > 0 and "MAD = 0" in rule and z[-1] > 3.5 and (z[:-1] == 0).all()
    z, _, scale, rule = robust_z([2.0] * 6)
    assert rule == "all equal" and (z == 0).all()
    (o,) = find_outliers("te0", list("abcdefgh"), np.zeros((8, 8)), base_dist=np.array([0.0] * 7 + [1.0]))
    assert o.name == "h" and o.ratio == float("inf") and o.to_json()["ratio"] is None
    # tightly packed spreads make the MAD tiny: z is large, but 0.08 vs 0.03 is no outlier (effect-size gate)
    spreads = np.array([0.030, 0.031, 0.031, 0.032, 0.032, 0.033, 0.034, 0.080])
    assert robust_z(spreads)[0][-1] > 3.5
    assert find_outliers("unet", list("abcdefgh"), np.zeros((8, 8)), base_dist=spreads) == []
    (o,) = find_outliers("unet", list("abcdefgh"), np.zeros((8, 8)), base_dist=np.r_[spreads[:-1], 0.3])
    assert o.name == "h" and o.ratio > 3
    d = np.full((5, 5), 1.0) - np.eye(5)
    assert find_outliers("unet", list("abcde"), d) == []
    assert find_clusters(list("abcde"), d) == ([list("abcde")], None)
    assert find_outliers("unet", list("abc"), d[:3, :3]) == []  # too few members without a base


def test_broken_base_key_is_skipped_and_missing_base_component_falls_back(tmp_path):
    key = "model.diffusion_model.input_blocks.1.0.in_layers.2.weight"
    base = make_checkpoint(tmp_path / "base.safetensors", ModelSpec(seed=1234, spread=0.0, corrupt={key: "nan"}, drop={"vae": 1.0}))
    models = [make_checkpoint(tmp_path / f"m{i}.safetensors", ModelSpec(seed=i + 1)) for i in range(3)]
    a = analyse_pool(models, base, progress=False, cache=False, components=["unet", "vae"])
    unet = a["unet"]
    assert unet.skipped == {"non-finite in base": [key]} and unet.reference == "base"
    assert unet.keys_used == len(get_layout("sd1", "tiny").keys_of("unet")) - 1 and np.isfinite(unet.distance).all()
    assert a["vae"].reference.startswith("pool mean") and a["vae"].base_distance is None
    ref = brute_force(models, None, "vae")[0]
    np.testing.assert_allclose(a["vae"].distance, ref, rtol=1e-6)
    assert any("base lacks this component" in line for line in a.summary_lines())


@pytest.mark.parametrize("which", ["far", "dup"])
def test_map_labels_do_not_overlap(far_pool, dup_pool, which):
    """Every model label on the maps is readable: no two label boxes overlap as rendered (Agg), also for the
    near-duplicates that sit on one point and the tight cluster left beside a far-off model."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.text import Annotation, Text

    paths, base = (far_pool.models, far_pool.base) if which == "far" else (dup_pool[0].models + dup_pool[1], dup_pool[0].base)
    a = analyse_pool(paths, base, progress=False, cache=False)
    fig = build_figure(a)
    renderer = FigureCanvasAgg(fig).get_renderer()
    fig.draw(renderer)
    checked = 0
    for ax in fig.axes:
        if "MDS" not in ax.get_title() and "excluding outliers" not in ax.get_title():
            continue
        # the text's own box (Annotation.get_window_extent would add its leader line)
        boxes = [(t.get_text(), Text.get_window_extent(t, renderer)) for t in ax.texts if isinstance(t, Annotation)]
        assert len(boxes) >= 4
        for i, (na, ba) in enumerate(boxes):
            for nb, bb in boxes[i + 1:]:
                overlap = min(ba.x1, bb.x1) - max(ba.x0, bb.x0) > 1 and min(ba.y1, bb.y1) - max(ba.y0, bb.y0) > 1
                assert not overlap, (ax.get_title(), na, nb)
        checked += 1
    assert checked >= len(a.components)  # one map per component, plus the outlier-free one where there are outliers
