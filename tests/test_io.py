"""Readers refuse every malformed file with a CheckpointError and never run pickle code; the writer round-trips
through the reference safetensors reader and is atomic."""

from __future__ import annotations

import errno
import io
import json
import os
import struct
import subprocess
import sys

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open

from astolfo_opt.checkpoint import writer as writer_mod
from astolfo_opt.checkpoint.io import ST_DTYPES, dtype_size, open_checkpoint, parse_safetensors_header
from astolfo_opt.checkpoint.writer import (
    DIRECT_ALIGN,
    PARTIAL_MARK,
    DirectStream,
    SafetensorsWriter,
    atomic_write_bytes,
    atomic_write_text,
    clean_stale_partials,
    save_safetensors,
)
from astolfo_opt.errors import AstolfoError, CheckpointError
from astolfo_opt.testing import hostile


def raw_file(path, header, data=b"", length=None):
    blob = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(blob) if length is None else length) + blob + data)
    return path


def entry(dtype, shape, begin, end):
    return {"dtype": dtype, "shape": shape, "data_offsets": [begin, end]}


BAD_HEADERS = [
    ("length past the file", {"a": entry("F32", [1], 0, 4)}, b"\0" * 4, 4096, "exceeds"),
    ("absurd length", b"{}", b"", 1 << 60, "exceeds"),
    ("not json", b"\xff{{{", b"", None, "not json"),
    ("not an object", b"[1, 2]", b"", None, "not a json object"),
    ("unknown dtype", {"a": entry("F128", [2], 0, 32)}, b"\0" * 32, None, "unsupported dtype"),
    ("dtype not a string", {"a": entry(["F32"], [2], 0, 8)}, b"\0" * 8, None, "unsupported dtype"),
    ("shape vs bytes", {"a": entry("F32", [4, 4], 0, 16)}, b"\0" * 16, None, "needs 64 bytes"),
    ("negative dim", {"a": entry("F32", [-1], 0, 4)}, b"\0" * 4, None, "bad shape"),
    ("bool dim", {"a": entry("F32", [True], 0, 4)}, b"\0" * 4, None, "bad shape"),
    ("overlap", {"a": entry("F32", [4], 0, 16), "b": entry("F32", [4], 8, 24)}, b"\0" * 24, None, "overlap"),
    ("out of range", {"a": entry("F32", [4], 1 << 40, (1 << 40) + 16)}, b"\0" * 16, None, "truncated"),
    ("reversed offsets", {"a": entry("F32", [0], 8, 4)}, b"\0" * 8, None, "bad data_offsets"),
    ("missing fields", {"a": {"dtype": "F32"}}, b"", None, "lacks"),
    ("bad metadata", {"__metadata__": {"a": 1}}, b"", None, "__metadata__"),
]


@pytest.mark.parametrize(("case", "header", "data", "length", "expect"), BAD_HEADERS, ids=[c[0] for c in BAD_HEADERS])
def test_bad_headers_are_refused(tmp_path, case, header, data, length, expect):
    path = raw_file(tmp_path / "x.safetensors", header, data, length)
    with pytest.raises(CheckpointError) as ei:
        open_checkpoint(path)
    assert str(path) in str(ei.value) and expect in str(ei.value).lower(), str(ei.value)


@pytest.mark.parametrize("content", [b"", b"\x01\x02\x03"])
def test_empty_and_tiny_files(tmp_path, content):
    (tmp_path / "e.safetensors").write_bytes(content)
    with pytest.raises(CheckpointError, match="not a safetensors file"):
        open_checkpoint(tmp_path / "e.safetensors")


def test_directory_png_missing_and_unknown_suffix(tmp_path):
    with pytest.raises(CheckpointError, match="directory"):
        open_checkpoint(hostile.write_directory(tmp_path / "d.safetensors"))
    with pytest.raises(CheckpointError, match="exceeds"):
        open_checkpoint(hostile.write_png(tmp_path / "image.safetensors"))
    with pytest.raises(CheckpointError, match="not found"):
        open_checkpoint(tmp_path / "nope.safetensors")
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    with pytest.raises(CheckpointError, match="unsupported file type"):
        open_checkpoint(tmp_path / "m.gguf")


def test_truncated_valid_file(tmp_path, tiny_pools):
    src = tiny_pools["sd1"].base
    with pytest.raises(CheckpointError, match="truncated"):
        open_checkpoint(hostile.write_truncated(tmp_path / "t.safetensors", src))


def test_reader_serves_zero_copy_views_and_raw_bytes(tiny_pools):
    with open_checkpoint(tiny_pools["sd1"].base) as r, safe_open(str(tiny_pools["sd1"].base), "pt") as ref:
        assert set(r.keys()) == set(ref.keys())
        assert r.metadata == ref.metadata()
        for k in list(r.keys())[:50]:
            t = r.get(k)
            assert torch.equal(t, ref.get_tensor(k)) and r.info(k).shape == tuple(t.shape)
            assert bytes(r.raw_bytes(k)) == t.contiguous().view(torch.uint8).numpy().tobytes()


# ---------------------------------------------------------------------------------------------------- .ckpt
def test_malicious_pickles_are_refused_and_never_run(tmp_path):
    marker = tmp_path / "MARKER"
    for writer in (hostile.write_evil_ckpt, hostile.write_evil_ckpt_exec):
        path = writer(tmp_path / f"{writer.__name__}.ckpt", marker)
        with pytest.raises(CheckpointError, match="refused"):
            open_checkpoint(path)
    with pytest.raises(CheckpointError, match="not a torch zip"):
        open_checkpoint(hostile.write_evil_legacy_pickle(tmp_path / "legacy.ckpt", marker))
    assert not marker.exists()


def test_corrupt_zip_and_ckpt_without_tensors(tmp_path):
    good = tmp_path / "good.ckpt"
    torch.save({"state_dict": {"model.diffusion_model.x": torch.randn(64, 64)}}, good)
    with pytest.raises(CheckpointError):
        open_checkpoint(hostile.write_corrupt_zip_ckpt(tmp_path / "bad.ckpt", good))
    with pytest.raises(CheckpointError, match="no tensors"):
        open_checkpoint(hostile.write_ckpt_without_tensors(tmp_path / "empty.ckpt"))
    buf = io.BytesIO()
    torch.save([torch.zeros(2)], buf)
    (tmp_path / "list.ckpt").write_bytes(buf.getvalue())
    with pytest.raises(CheckpointError, match="not a state dict"):
        open_checkpoint(tmp_path / "list.ckpt")


@pytest.mark.parametrize("wrap", ["plain", "state_dict", "nested"])
def test_ckpt_state_dict_unwrap(tmp_path, wrap):
    sd = {"model.diffusion_model.a": torch.arange(6.0).reshape(2, 3), "cond_stage_model.transformer.b": torch.ones(3)}
    obj = {"plain": sd, "state_dict": {"state_dict": sd, "global_step": 3},
           "nested": {"state_dict": {"state_dict": sd}, "epoch": 1}}[wrap]
    torch.save(obj, tmp_path / "m.ckpt")
    with open_checkpoint(tmp_path / "m.ckpt") as r:
        assert set(r.keys()) == set(sd)
        assert torch.equal(r.get("model.diffusion_model.a"), sd["model.diffusion_model.a"])
        assert r.info("cond_stage_model.transformer.b").nbytes == 12


# ---------------------------------------------------------------------------------------------------- fuzz
_dtypes = st.sampled_from([*ST_DTYPES, "F128", "", "f32"])
_int = st.one_of(st.integers(-3, 40), st.integers(0, 1 << 64), st.booleans())
_entry = st.fixed_dictionaries({"dtype": _dtypes, "shape": st.lists(_int, max_size=3), "data_offsets": st.lists(_int, max_size=3)})
_header = st.dictionaries(st.text(max_size=8), st.one_of(_entry, st.integers(), st.text(max_size=3)), max_size=5)


def _check_accepted(header: dict, data_start: int, file_size: int) -> None:
    ranges = []
    for k, e in header.items():
        if k == "__metadata__":
            continue
        begin, end = e["data_offsets"]
        n = 1
        for s in e["shape"]:
            n *= s
        assert 0 <= begin <= end <= file_size - data_start
        assert end - begin == n * dtype_size(ST_DTYPES[e["dtype"]])
        if end > begin:
            ranges.append((begin, end))
    ranges.sort()
    assert all(a[1] <= b[0] for a, b in zip(ranges, ranges[1:], strict=False))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(header=_header, extra=st.integers(0, 64), length_delta=st.integers(-4, 4))
def test_fuzz_structured_headers(header, extra, length_delta):
    blob = json.dumps(header).encode()
    raw = struct.pack("<Q", max(len(blob) + length_delta, 0)) + blob
    size = len(raw) + extra
    try:
        parsed, start = parse_safetensors_header(raw, size)
    except CheckpointError:
        return
    _check_accepted(parsed, start, size)


@settings(max_examples=300, deadline=None)
@given(raw=st.binary(max_size=80), size=st.integers(0, 1 << 20))
def test_fuzz_raw_bytes(raw, size):
    try:
        parsed, start = parse_safetensors_header(raw, size)
    except CheckpointError:
        return
    _check_accepted(parsed, start, size)


# ---------------------------------------------------------------------------------------------------- writer
def test_writer_round_trip_with_the_reference_reader(tmp_path):
    tensors = {
        "a": torch.randn(3, 5), "b": torch.randn(7, dtype=torch.float16), "c": torch.randn(2, 2).to(torch.bfloat16),
        "d": torch.arange(77, dtype=torch.int64).reshape(1, 77), "scalar": torch.tensor(2.5), "empty": torch.zeros(0, 4),
        "i32": torch.tensor(7, dtype=torch.int32),
    }
    path = save_safetensors(tmp_path / "o.safetensors", tensors, {"recipe": "{}", "n": 3})
    with safe_open(str(path), "pt") as f:
        assert f.metadata() == {"recipe": "{}", "n": "3"}
        for k, t in tensors.items():
            got = f.get_tensor(k)
            assert got.dtype == t.dtype and got.shape == t.shape and torch.equal(got, t), k
    with open_checkpoint(path) as r:
        assert all(torch.equal(r.get(k), t) for k, t in tensors.items())
    (n,) = struct.unpack("<Q", path.read_bytes()[:8])
    assert n % 8 == 0


def test_writer_writes_out_of_order_and_converts(tmp_path):
    entries = [("x", torch.float16, (2, 3)), ("y", torch.float32, (4,))]
    with SafetensorsWriter(tmp_path / "w.safetensors", entries) as w:
        w.write("y", torch.arange(4.0))
        w.write("x", torch.ones(6, dtype=torch.float64))  # converted to the planned dtype / shape
    with safe_open(str(tmp_path / "w.safetensors"), "pt") as f:
        assert f.get_tensor("x").dtype == torch.float16 and f.get_tensor("x").shape == (2, 3)
        assert torch.equal(f.get_tensor("y"), torch.arange(4.0))


def _leftovers(folder):
    return sorted(p.name for p in folder.iterdir())


def test_writer_is_atomic_on_exception_and_on_missing_tensors(tmp_path):
    target = tmp_path / "out.safetensors"
    with pytest.raises(RuntimeError), SafetensorsWriter(target, [("x", torch.float32, (4,))]) as w:
        w.write("x", torch.zeros(4))
        raise RuntimeError("merge failed mid-way")
    assert _leftovers(tmp_path) == []
    two = [("x", torch.float32, (4,)), ("y", torch.float32, (1,))]
    with pytest.raises(AstolfoError, match="never written"), SafetensorsWriter(target, two) as w:
        w.write("x", torch.zeros(4))
    assert _leftovers(tmp_path) == []
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError), SafetensorsWriter(target, [("x", torch.float32, (1,))]):
        raise RuntimeError
    assert target.read_bytes() == b"old"  # a failed rewrite keeps the previous file intact
    with pytest.raises(ValueError, match="duplicate"):
        SafetensorsWriter(tmp_path / "dup.safetensors", [("x", torch.float32, (1,)), ("x", torch.float32, (1,))])


def test_atomic_text_and_stale_partials(tmp_path):
    atomic_write_text(tmp_path / "sub" / "a.txt", "hello")
    assert (tmp_path / "sub" / "a.txt").read_text() == "hello"
    atomic_write_bytes(tmp_path / "sub" / "a.txt", b"again")
    assert _leftovers(tmp_path / "sub") == ["a.txt"]
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    stale = tmp_path / f".m.safetensors{PARTIAL_MARK}{dead_pid}-abcd"
    live = tmp_path / f".n.safetensors{PARTIAL_MARK}{os.getpid()}-abcd"
    odd = tmp_path / f".o.safetensors{PARTIAL_MARK}notapid"
    for p in (stale, live, odd):
        p.write_bytes(b"x")
    assert clean_stale_partials(tmp_path) == [stale]
    assert not stale.exists() and live.exists() and odd.exists()
    assert clean_stale_partials(tmp_path / "missing") == []


@pytest.fixture
def direct(monkeypatch, tmp_path):
    """Stream even tiny files past the page cache, through 8 KiB staging buffers (tensors span several of them)."""
    probe = tmp_path / "probe"
    fd = os.open(probe, os.O_WRONLY | os.O_CREAT)
    stream = DirectStream.open(probe, fd)
    if stream is None:
        os.close(fd)
        pytest.skip(f"{tmp_path} refuses O_DIRECT: the writer's buffered path is the one this filesystem gets")
    stream.close(flush=False)
    os.close(fd)
    probe.unlink()
    monkeypatch.setattr(writer_mod, "DIRECT_MIN_BYTES", 0)
    monkeypatch.setattr(writer_mod, "DIRECT_BUFFER", 8192)


def _mixed_tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {"a": torch.randn(3001, generator=g), "b": torch.randn(5, 7, generator=g).half(), "c": torch.randn(20000, generator=g),
            "d": torch.arange(3, dtype=torch.int64), "e": torch.randn(4099, generator=g).to(torch.bfloat16)}


def _buffered_bytes(tmp_path, tensors, metadata=None) -> bytes:
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(writer_mod, "DIRECT_MIN_BYTES", 1 << 62)
        return save_safetensors(tmp_path / "buffered.safetensors", tensors, metadata).read_bytes()


def test_direct_stream_writes_the_same_bytes_as_the_buffered_path(direct, tmp_path):
    tensors = _mixed_tensors()
    entries = [(k, t.dtype, tuple(t.shape)) for k, t in tensors.items()]
    with SafetensorsWriter(tmp_path / "d.safetensors", entries, {"m": "1"}) as w:
        for k, t in tensors.items():
            w.write(k, t)
        streamed, total = w.streamed_bytes, w.total_bytes
    assert streamed == total  # every byte went through O_DIRECT staging, none through the page-cache path
    assert (tmp_path / "d.safetensors").read_bytes() == _buffered_bytes(tmp_path, tensors, {"m": "1"})
    assert total % DIRECT_ALIGN != 0  # the padded last block was truncated away (the comparison above checks it)


def test_direct_stream_falls_back_to_buffered_on_an_out_of_order_write(direct, tmp_path):
    tensors = _mixed_tensors()
    entries = [(k, t.dtype, tuple(t.shape)) for k, t in tensors.items()]
    with SafetensorsWriter(tmp_path / "o.safetensors", entries) as w:
        for k in ("a", "b", "d", "c", "e"):  # "d" before "c": the stream stops after "b"
            w.write(k, tensors[k])
        assert 0 < w.streamed_bytes < w.total_bytes
    assert (tmp_path / "o.safetensors").read_bytes() == _buffered_bytes(tmp_path, tensors)


def test_direct_stream_rewrites_through_the_page_cache_when_the_device_refuses(direct, tmp_path, monkeypatch):
    """A device whose O_DIRECT alignment is not ours answers EINVAL: the bytes still land, through the buffered fd."""
    real, direct_fds = os.pwrite, set()
    real_open = os.open

    def track_open(path, flags, *a):
        fd = real_open(path, flags, *a)
        if flags & getattr(os, "O_DIRECT", 0):
            direct_fds.add(fd)
        return fd

    def refuse(fd, data, offset):
        if fd in direct_fds:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real(fd, data, offset)

    monkeypatch.setattr(os, "open", track_open)
    monkeypatch.setattr(os, "pwrite", refuse)
    tensors = _mixed_tensors()
    target = save_safetensors(tmp_path / "e.safetensors", tensors)
    monkeypatch.setattr(os, "pwrite", real)
    assert direct_fds and target.read_bytes() == _buffered_bytes(tmp_path, tensors)


def test_direct_stream_disk_full_leaves_nothing(direct, tmp_path, disk_fills_after):
    """ENOSPC raised in the stream's background thread reaches the caller as one line, and the temp file goes."""
    calls = disk_fills_after(3)
    with pytest.raises(AstolfoError, match="disk full") as ei:
        save_safetensors(tmp_path / "full.safetensors", {f"k{i}": torch.randn(4096) for i in range(12)})
    assert "\n" not in str(ei.value) and calls["n"] > 3
    assert list(tmp_path.iterdir()) == []
