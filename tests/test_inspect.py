"""``astolfo_opt.checkpoint.inspect`` and ``astolfo-opt inspect``: architecture, hashes, health findings with repairs,
identical components, mixed pools, the cache, and the CLI's exit status / JSON."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
import torch

from astolfo_opt.checkpoint import inspect as I
from astolfo_opt.checkpoint.io import open_checkpoint
from astolfo_opt.checkpoint.writer import save_safetensors
from astolfo_opt.cli import main
from astolfo_opt.errors import CheckpointError
from astolfo_opt.testing import hostile
from astolfo_opt.testing.factory import ModelSpec, make_checkpoint

NAN_KEY = "model.diffusion_model.input_blocks.1.0.in_layers.2.weight"
INF_KEY = "model.diffusion_model.output_blocks.2.1.conv.weight"
PROJ_IN = "model.diffusion_model.input_blocks.1.1.proj_in.weight"


def rewrite(src: Path, dst: Path, edit) -> Path:
    """Copy ``src`` to ``dst`` through a dict edit (key renames, reshapes, extra keys)."""
    with open_checkpoint(src) as r:
        tensors = {k: r.get(k).clone() for k in r.keys()}  # noqa: SIM118 - readers are not iterable
    edit(tensors)
    return save_safetensors(dst, tensors)


@pytest.fixture(scope="module")
def pool(tmp_path_factory) -> dict[str, Path]:
    """A tiny SD1 pool holding one of each problem (and two ways of carrying the base's te0 unchanged)."""
    d = tmp_path_factory.mktemp("pool")
    files: dict[str, Path] = {}

    def mk(name, **kw):
        files[name] = make_checkpoint(d / f"{name}.safetensors", ModelSpec(**{"arch": "sd1", "seed": len(files) + 1, **kw}))

    mk("base", spread=0.0, seed=1234)
    mk("clean")
    mk("pruned", drop={"vae": 1.0, "te0": 0.2})  # vae missing, te0 partial
    mk("nan", corrupt={NAN_KEY: "nan", INF_KEY: "inf"})
    mk("copy", copy_components={"te0": files["base"]})
    mk("oldstyle", copy_components={"te0": files["base"]}, old_style_te=True, position_ids="missing")
    mk("fp32", dtype="fp32", spread=0.0, seed=1234)
    mk("ema", ema=True, position_ids="float")
    mk("shuffled", position_ids="shuffled")
    files["ckpt"] = make_checkpoint(d / "ckpt.ckpt", ModelSpec(arch="sd1", spread=0.0, seed=1234, fmt="ckpt"))
    files["linear"] = rewrite(files["clean"], d / "linear.safetensors",
                              lambda t: t.__setitem__(PROJ_IN, t[PROJ_IN].reshape(t[PROJ_IN].shape[:2])))
    files["extra"] = rewrite(files["clean"], d / "extra.safetensors",
                             lambda t: t.update({"lora_te_text_model.foo": torch.ones(2), "model.diffusion_model.bogus": torch.ones(1)}))
    return files


@pytest.fixture(scope="module")
def reports(pool) -> dict[str, I.ModelReport]:
    return {n: I.inspect_model(p, cache=False) for n, p in pool.items()}


def kinds(rep: I.ModelReport) -> set[str]:
    return {f.kind for f in rep.findings}


def test_healthy_model(reports, pool):
    r = reports["clean"]
    assert (r.arch, r.size, r.format, r.dtype, r.scanned) == ("sd1", "tiny", "safetensors", "F16", True)
    assert r.findings == [] and r.missing == {} and not r.errors
    assert set(r.component_hashes) == {"unet", "te0", "vae"}
    assert r.component_dtypes == {"unet": "F16", "te0": "F16", "vae": "F16"}
    data = pool["clean"].read_bytes()
    assert r.sha256 == hashlib.sha256(data).hexdigest() and r.short_hash == r.sha256[:10]
    assert r.legacy_hash == hashlib.sha256(data[0x100000:0x110000]).hexdigest()[:8]
    assert r.file_size == len(data) and r.name == "clean"
    assert r.dtypes == {"F16": sum(r.component_keys.values()) - 1, "I64": 1}


def test_pruned_and_partial(reports):
    r = reports["pruned"]
    f = next(f for f in r.findings if f.kind == "missing" and f.component == "vae")
    assert f.message == "pruned: vae missing 248/248 keys" and "fill from base" in f.repair
    assert len(r.missing["vae"]) == 248 and "vae" not in r.component_hashes
    f = next(f for f in r.findings if f.kind == "missing" and f.component == "te0")
    assert f.component == "te0" and f.message.startswith("partial te0: missing") and 0 < f.count < 196
    assert f.count == len(r.missing["te0"])


def test_non_finite_names_component_and_key(reports):
    fs = {f.key: f for f in reports["nan"].findings if f.kind == "nonfinite"}
    assert set(fs) == {NAN_KEY, INF_KEY}
    for key, word in ((NAN_KEY, "NaN"), (INF_KEY, "Inf")):
        f = fs[key]
        assert f.component == "unet" and f"holds {f.count} {word} values" in f.message and f.count > 0
        assert "pool.exclude=[nan]" in f.repair and "nan_policy=drop_model" in f.repair
    assert reports["nan"].nonfinite_keys() == {"unet": [NAN_KEY, INF_KEY]}  # file order
    assert not reports["nan"].errors  # readable: a warning, not an unusable file


def test_identical_components_by_content_not_by_bytes_on_disk(reports):
    base = reports["base"].component_hashes
    assert reports["copy"].component_hashes["te0"] == base["te0"]
    assert reports["oldstyle"].component_hashes["te0"] == base["te0"]  # key spelling and position_ids do not matter
    assert reports["copy"].component_hashes["unet"] != base["unet"]
    assert reports["ckpt"].component_hashes == base  # same tensors in a .ckpt
    assert reports["ckpt"].short_hash != reports["base"].short_hash
    assert reports["fp32"].component_hashes["te0"] != base["te0"]  # an fp32 re-save is other bytes


def test_position_ids_ema_reshape_unknown(reports):
    e = reports["ema"]
    assert {"ema", "position_ids"} <= kinds(e)
    pos = next(f for f in e.findings if f.kind == "position_ids")
    assert "F32" in pos.message and "arange(77)" in pos.repair
    assert next(f for f in e.findings if f.kind == "ema").repair == "dropped on merge"
    s = next(f for f in reports["shuffled"].findings if f.kind == "position_ids")
    assert "not arange(77)" in s.message
    assert "position_ids" not in kinds(reports["oldstyle"])  # missing position_ids is fine (optional)
    lin = reports["linear"]
    f = next(f for f in lin.findings if f.kind == "reshape")
    assert f.key == PROJ_IN and f.severity == "info" and "reshaped to [32, 32, 1, 1]" in f.repair and not lin.errors
    x = next(f for f in reports["extra"].findings if f.kind == "unknown")
    assert x.count == 2 and x.repair == "ignored on merge"


def test_wrong_shape_is_an_error_and_foreign_is_refused(tmp_path, pool):
    bad = hostile.write_wrong_shape(tmp_path / "wide.safetensors", pool["clean"])
    r = I.inspect_model(bad, cache=False)
    assert [f.kind for f in r.errors] == ["shape"]
    assert "[64]" in r.errors[0].message and "[32]" in r.errors[0].message
    with pytest.raises(CheckpointError, match="wide.safetensors.*shape"):
        r.raise_for_errors()
    with pytest.raises(CheckpointError, match="not a Stable Diffusion checkpoint"):
        I.inspect_model(hostile.write_foreign(tmp_path / "bert.safetensors"), cache=False)


@pytest.mark.parametrize("arch", ["sd2", "sdxl"])
def test_other_architectures(tiny_pools, arch):
    p = I.inspect_pool(tiny_pools[arch].folder, cache=False)
    assert p.ok and p.arch == arch and p.size == "tiny"
    assert [m.name for m in p.models] == ["base", "m00", "m01", "m02"]
    comps = {"sd2": {"unet", "te0", "vae"}, "sdxl": {"unet", "te0", "te1", "vae"}}[arch]
    assert all(set(m.component_hashes) == comps and m.findings == [] for m in p.models)
    assert p.identical_groups == {}


def test_pool_groups_and_mixed_architectures(pool, tiny_pools, tmp_path):
    names = ["base", "copy", "oldstyle", "clean", "ckpt"]
    rep = I.inspect_pool([pool[n] for n in names], cache=False)
    assert rep.ok and rep.arch == "sd1"
    te0 = rep.identical_groups["te0"]
    assert sorted(map(sorted, te0)) == [["base", "ckpt", "copy", "oldstyle"]]
    assert rep.identical_groups["unet"] == [["base", "ckpt"]]
    assert "te0 identical in base, copy, oldstyle, ckpt" in rep.identical_lines()
    mixed = I.inspect_pool([pool["clean"], tiny_pools["sdxl"].models[0]], cache=False)
    assert mixed.arch is None and not mixed.ok
    assert "pool mixes architectures (sd1: clean; sdxl: m00)" in mixed.pool_errors[0]


def test_expand_pool(pool, tmp_path):
    folder = pool["clean"].parent
    files = I.expand_pool([folder, pool["clean"]])
    assert pool["clean"] in files and pool["ckpt"] in files and len(files) == len(set(files)) == len(pool)
    with pytest.raises(CheckpointError, match="file not found"):
        I.expand_pool([tmp_path / "nope"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no .safetensors"):
        I.expand_pool([tmp_path / "empty"])
    with pytest.raises(CheckpointError, match="directory"):
        I.expand_pool([hostile.write_directory(tmp_path / "d.safetensors")])
    errors: dict[str, str] = {}
    assert I.expand_pool([tmp_path / "nope", pool["clean"]], strict=False, errors=errors) == [pool["clean"]]
    assert list(errors) == [str(tmp_path / "nope")]


def test_cache_reuses_until_the_file_changes(tmp_path, monkeypatch, pool):
    monkeypatch.setenv("ASTOLFO_OPT_CACHE", str(tmp_path / "c"))
    path = tmp_path / "m.safetensors"
    path.write_bytes(pool["nan"].read_bytes())
    quick = I.inspect_model(path, scan=False)
    assert not quick.scanned and quick.short_hash is None and quick.component_hashes == {} and not quick.cached
    first = I.inspect_model(path)  # a header-only entry does not satisfy a scan
    assert first.scanned and not first.cached and (tmp_path / "c" / "inspect.json").is_file()

    def no_reading(*a, **k):
        raise AssertionError("the cache should have answered")

    monkeypatch.setattr(I, "open_checkpoint", no_reading)
    again = I.inspect_model(path)
    assert again.cached and again.to_json() == first.to_json()
    assert I.inspect_model(path, scan=False).cached  # a scanned entry also answers a header-only request
    monkeypatch.undo()
    monkeypatch.setenv("ASTOLFO_OPT_CACHE", str(tmp_path / "c"))
    path.write_bytes(pool["clean"].read_bytes())
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10_000_000))
    changed = I.inspect_model(path)
    assert not changed.cached and changed.findings == [] and changed.short_hash != first.short_hash
    assert not I.inspect_model(path, cache=False).cached
    (tmp_path / "c" / "inspect.json").write_text("{not json")  # a corrupt cache is a miss, then rewritten
    assert not I.inspect_model(path).cached and I.inspect_model(path).cached


def test_report_json_round_trip(reports):
    r = reports["ema"]
    back = I.ModelReport.from_json(json.loads(json.dumps(r.to_json())))
    assert back == r


# ------------------------------------------------------------------------------------------------ CLI
def test_cli_table_findings_and_json(pool, tmp_path, capsys):
    out = tmp_path / "r.json"
    rc = main(["inspect", str(pool["base"]), str(pool["pruned"]), str(pool["nan"]), str(pool["copy"]), "--json", str(out), "-q"])
    text = capsys.readouterr()
    assert rc == 0, text.err
    assert "pruned: pruned: vae missing 248/248 keys -> fill from base" in text.out
    assert f"nan: unet {NAN_KEY} holds" in text.out
    assert "te0 identical in base, copy" in text.out
    data = json.loads(out.read_text())
    assert [m["name"] for m in data["models"]] == ["base", "pruned", "nan", "copy"]
    assert data["identical_groups"] == {"te0": [["base", "copy"]]} and data["errors"] == {} and data["arch"] == "sd1"
    assert data["models"][0]["short_hash"] == hashlib.sha256(pool["base"].read_bytes()).hexdigest()[:10]


def test_cli_reports_the_others_and_exits_2_for_a_bad_file(pool, tmp_path, capsys):
    bad = tmp_path / "broken.safetensors"
    bad.write_bytes(b"\x00" * 3)
    out = tmp_path / "r.json"
    rc = main(["inspect", str(pool["clean"]), str(bad), "--json", str(out), "--no-scan"])
    text = capsys.readouterr()
    assert rc == 2
    errs = [ln for ln in text.err.splitlines() if ln.startswith("error:")]
    assert len(errs) == 1 and "broken.safetensors" in errs[0] and "not a safetensors" in errs[0]
    data = json.loads(out.read_text())
    assert [m["name"] for m in data["models"]] == ["clean"] and list(data["errors"]) == [str(bad)]
    assert data["models"][0]["short_hash"] is None  # --no-scan


def test_cli_mixed_pool_exits_2(pool, tiny_pools, capsys):
    rc = main(["inspect", str(pool["clean"]), str(tiny_pools["sdxl"].base), "-q"])
    err = capsys.readouterr().err
    assert rc == 2 and "error: pool mixes architectures" in err


def test_cli_map_and_base_call_the_analysis(pool, tmp_path, monkeypatch, capsys):
    import astolfo_opt.analysis as analysis

    calls = {}

    class Fake:
        def to_json(self):
            return {"arch": "sd1", "outliers": []}

        def summary_lines(self):
            return ["unet: no outliers"]

    def fake_analyse(paths, base=None, progress=True):
        calls["analyse"] = ([Path(p).name for p in paths], base)
        return Fake()

    def fake_render(a, png):
        calls["render"] = png
        return [Path(png)]

    monkeypatch.setattr(analysis, "analyse_pool", fake_analyse)
    monkeypatch.setattr(analysis, "render_maps", fake_render)
    out, png = tmp_path / "r.json", tmp_path / "map.png"
    rc = main(["inspect", str(pool["base"]), str(pool["clean"]), "--base", str(pool["base"]), "--map", str(png),
               "--json", str(out), "-q"])
    text = capsys.readouterr().out
    assert rc == 0
    assert calls == {"analyse": (["base.safetensors", "clean.safetensors"], str(pool["base"])), "render": str(png)}
    assert "unet: no outliers" in text and "map written" in text
    assert json.loads(out.read_text())["analysis"] == {"arch": "sd1", "outliers": []}
