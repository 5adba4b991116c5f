"""Hostile and broken model files, written on demand for the reliability tests.

Model files are untrusted downloads, so every command that opens one must refuse each of these with a one-line
error naming the file, never a traceback, never a hang and never by running code. Keeping the corpus here (and not
inside one test file) lets the inspect, merge and search tests all feed the same files through their own paths.

Valid bases come from :mod:`astolfo_opt.testing.factory`; broken headers are written as raw bytes, because the
real writer (rightly) cannot produce them.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import struct
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from astolfo_opt.checkpoint.io import open_checkpoint
from astolfo_opt.checkpoint.writer import atomic_write_bytes, save_safetensors
from astolfo_opt.testing.factory import ModelSpec, make_checkpoint

#: a te0 tensor of the tiny SD1 layout (width 32) that :func:`write_wrong_shape` rewrites at width 64
WRONG_SHAPE_KEY = "cond_stage_model.transformer.text_model.encoder.layers.0.layer_norm1.weight"
#: the tensor :func:`write_non_finite` plants NaN / Inf into
NON_FINITE_KEY = "model.diffusion_model.input_blocks.1.0.in_layers.2.weight"


@dataclass(frozen=True)
class HostileFile:
    """One generated hostile file and what a correct refusal must mention.

    ``expect``: lower-case fragments of which at least one must appear in the error line (besides the file name);
    kept loose on purpose so the wording stays the owning module's choice, while still pinning *what* is wrong.
    """

    case: str
    path: Path
    expect: tuple[str, ...]
    description: str


def _raw_safetensors(path: Path, header: bytes | dict | list | str, data: bytes = b"", length: int | None = None) -> Path:
    """A safetensors-shaped file with an arbitrary header (and header length, when ``length`` is given)."""
    if not isinstance(header, bytes):
        header = json.dumps(header).encode()
    n = len(header) if length is None else length
    atomic_write_bytes(path, struct.pack("<Q", n) + header + data)
    return path


def _entry(dtype: str, shape: list[int], begin: int, end: int) -> dict:
    return {"dtype": dtype, "shape": shape, "data_offsets": [begin, end]}


def write_empty(path: Path) -> Path:
    atomic_write_bytes(path, b"")
    return path


def write_tiny(path: Path) -> Path:
    atomic_write_bytes(path, b"\x01\x02\x03")
    return path


def write_header_too_long(path: Path) -> Path:
    """Header length says 4 KiB, the file holds 40 bytes."""
    return _raw_safetensors(path, {"a": _entry("F32", [1], 0, 4)}, b"\0" * 4, length=4096)


def write_header_absurd(path: Path) -> Path:
    """Header length 2^60: a reader that trusts it allocates exabytes."""
    return _raw_safetensors(path, b"{}", length=1 << 60)


def write_header_not_json(path: Path) -> Path:
    return _raw_safetensors(path, b"\xff\xfe not json at all {{{{", b"")


def write_header_not_object(path: Path) -> Path:
    return _raw_safetensors(path, [1, 2, 3])


def write_unknown_dtype(path: Path) -> Path:
    return _raw_safetensors(path, {"model.diffusion_model.x": _entry("F128", [2], 0, 32)}, b"\0" * 32)


def write_shape_mismatch(path: Path) -> Path:
    """Shape [4, 4] of F32 needs 64 bytes; the range holds 16."""
    return _raw_safetensors(path, {"model.diffusion_model.x": _entry("F32", [4, 4], 0, 16)}, b"\0" * 16)


def write_overlapping(path: Path) -> Path:
    hdr = {"model.diffusion_model.a": _entry("F32", [4], 0, 16), "model.diffusion_model.b": _entry("F32", [4], 8, 24)}
    return _raw_safetensors(path, hdr, b"\0" * 24)


def write_out_of_range(path: Path) -> Path:
    """Offsets far past the end of the data section (and a negative one in a second file would fail the same)."""
    return _raw_safetensors(path, {"model.diffusion_model.a": _entry("F32", [4], 1 << 40, (1 << 40) + 16)}, b"\0" * 16)


def write_control_chars(path: Path) -> Path:
    """A refused header whose tensor name carries a newline, a fake traceback and a terminal escape: the error line
    must stay one line and must not let the file drive the user's terminal."""
    key = "model.diffusion_model.x\nTraceback (most recent call last):\x1b[2J\r"
    return _raw_safetensors(path, {key: _entry("F32", [4, 4], 0, 16)}, b"\0" * 16)


def write_truncated(path: Path, base: Path) -> Path:
    """A valid model cut short: the header promises tensors whose bytes are gone."""
    data = base.read_bytes()
    atomic_write_bytes(path, data[: len(data) // 2])
    return path


def write_directory(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "model.safetensors").write_bytes(b"")  # a folder that even looks like a model inside
    return path


def write_png(path: Path) -> Path:
    """A real 1x1 PNG renamed: its first 8 bytes read as a header length of ~7e17."""
    import zlib

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 1, 1, 8, 2, 0, 0, 0))
    png += chunk(b"IDAT", zlib.compress(b"\x00\xff\x00\x00")) + chunk(b"IEND", b"")
    atomic_write_bytes(path, png)
    return path


def write_foreign(path: Path) -> Path:
    """A valid safetensors file of a non-Stable-Diffusion model (BERT-like keys)."""
    g = torch.Generator().manual_seed(0)
    tensors = {
        "bert.embeddings.word_embeddings.weight": torch.randn(64, 16, generator=g),
        "bert.embeddings.position_embeddings.weight": torch.randn(8, 16, generator=g),
        "bert.encoder.layer.0.attention.self.query.weight": torch.randn(16, 16, generator=g),
        "bert.encoder.layer.0.attention.self.query.bias": torch.zeros(16),
        "bert.pooler.dense.weight": torch.randn(16, 16, generator=g),
    }
    return save_safetensors(path, tensors, {"format": "pt"})


class _RunsCode:
    """Pickles as ``func(*args)``: whatever unpickles it without ``weights_only`` runs ``func``."""

    def __init__(self, func: Callable, args: tuple):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


def _evil_state_dict(payload: object) -> dict:
    return {"state_dict": {"model.diffusion_model.time_embed.0.weight": torch.zeros(2, 2), "evil": payload}}


def write_evil_ckpt(path: Path, marker: Path) -> Path:
    """A torch zip ``.ckpt`` whose pickle calls ``os.system('touch MARKER')`` when loaded without ``weights_only``."""
    buf = io.BytesIO()
    torch.save(_evil_state_dict(_RunsCode(os.system, (f"touch '{marker}'",))), buf)
    atomic_write_bytes(path, buf.getvalue())
    return path


def write_evil_ckpt_exec(path: Path, marker: Path) -> Path:
    """Same attack through ``builtins.exec`` writing the marker from Python."""
    buf = io.BytesIO()
    code = f"open({str(marker)!r}, 'w').write('pwned')"
    torch.save(_evil_state_dict(_RunsCode(exec, (code,))), buf)
    atomic_write_bytes(path, buf.getvalue())
    return path


def write_evil_legacy_pickle(path: Path, marker: Path) -> Path:
    """A bare (non-zip) pickle ``.ckpt`` with the ``os.system`` payload: the pre-1.6 torch format."""
    atomic_write_bytes(path, pickle.dumps(_RunsCode(os.system, (f"touch '{marker}'",)), protocol=2))
    return path


def write_corrupt_zip_ckpt(path: Path, base_ckpt: Path) -> Path:
    """A torch zip whose central directory is intact but whose pickle record is garbage (CRC mismatch)."""
    data = bytearray(base_ckpt.read_bytes())
    with zipfile.ZipFile(base_ckpt) as z:
        info = next(i for i in z.infolist() if i.filename.endswith("data.pkl"))
    name_len, extra_len = struct.unpack("<HH", bytes(data[info.header_offset + 26 : info.header_offset + 30]))
    start = info.header_offset + 30 + name_len + extra_len  # local header's extra (alignment padding) may differ
    for i in range(start, min(start + info.compress_size, len(data))):
        data[i] ^= 0x5A
    atomic_write_bytes(path, bytes(data))
    return path


def write_ckpt_without_tensors(path: Path) -> Path:
    buf = io.BytesIO()
    torch.save({"state_dict": {"global_step": 5, "epoch": 1}, "hyper_parameters": {"lr": 1e-4}}, buf)
    atomic_write_bytes(path, buf.getvalue())
    return path


def write_wrong_shape(path: Path, base: Path, key: str = WRONG_SHAPE_KEY, width: int = 64) -> Path:
    """A valid tiny SD1 file with one te0 tensor rewritten at ``width`` (the tiny layout says 32)."""
    with open_checkpoint(base) as r:
        tensors = {k: r.get(k).clone() for k in r.keys()}  # noqa: SIM118 - readers are not iterable
        meta = dict(r.metadata)
    old = tensors[key]
    tensors[key] = torch.ones((width, *old.shape[1:]), dtype=old.dtype)
    return save_safetensors(path, tensors, meta)


def write_non_finite(path: Path, kind: str = "nan", key: str = NON_FINITE_KEY, seed: int = 77) -> Path:
    """A tiny SD1 model with NaN (or Inf) planted in ``key``."""
    return make_checkpoint(path, ModelSpec(arch="sd1", size="tiny", seed=seed, corrupt={key: kind}))


def write_corpus(folder: str | Path, marker: str | Path) -> dict[str, HostileFile]:
    """Write every single-file hostile case into ``folder``; ``marker`` is the file the pickle payloads would create.

    Returns case -> :class:`HostileFile`. The pool-level cases (mixed architectures, wrong shapes against a pool,
    NaN/Inf) have their own writers: :func:`write_mixed_pool`, :func:`write_wrong_shape`, :func:`write_non_finite`.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    marker = Path(marker)
    base_dir = folder / "_bases"
    base = make_checkpoint(base_dir / "valid.safetensors", ModelSpec(arch="sd1", size="tiny", seed=5))
    base_ckpt = make_checkpoint(base_dir / "valid.ckpt", ModelSpec(arch="sd1", size="tiny", seed=6, fmt="ckpt"))
    hostile = "not a safetensors", "corrupt", "header", "bytes", "empty"
    cases: list[tuple[str, str, Callable[[Path], Path], tuple[str, ...], str]] = [
        ("empty", "safetensors", write_empty, hostile, "0-byte file"),
        ("tiny", "safetensors", write_tiny, hostile, "3-byte file"),
        ("header_too_long", "safetensors", write_header_too_long, ("header length", "exceeds", "corrupt"),
         "header length larger than the file"),
        ("header_absurd", "safetensors", write_header_absurd, ("header length", "exceeds", "corrupt"),
         "header length 2^60"),
        ("header_not_json", "safetensors", write_header_not_json, ("json",), "header bytes are not JSON"),
        ("header_not_object", "safetensors", write_header_not_object, ("object", "corrupt"), "header is a JSON list"),
        ("unknown_dtype", "safetensors", write_unknown_dtype, ("dtype",), "dtype F128"),
        ("shape_mismatch", "safetensors", write_shape_mismatch, ("shape", "bytes"), "shape does not fit its byte range"),
        ("overlapping", "safetensors", write_overlapping, ("overlap",), "two tensors share bytes"),
        ("out_of_range", "safetensors", write_out_of_range, ("truncated", "range", "ends at", "offset"),
         "offsets past the end of the file"),
        ("control_chars", "safetensors", write_control_chars, ("shape", "bytes"), "tensor name with newline + ESC"),
        ("truncated", "safetensors", lambda p: write_truncated(p, base), ("truncated", "ends at", "short"),
         "valid header, data cut in half"),
        ("directory", "safetensors", write_directory, ("directory", "folder"), "a folder named x.safetensors"),
        ("png", "safetensors", write_png, hostile, "a PNG image renamed"),
        ("foreign", "safetensors", write_foreign, ("stable diffusion", "architecture", "not a"),
         "valid safetensors of a BERT-like model"),
        ("evil_system", "ckpt", lambda p: write_evil_ckpt(p, marker), ("refused", "unsupported", "global", "weights_only"),
         "pickle calling os.system"),
        ("evil_exec", "ckpt", lambda p: write_evil_ckpt_exec(p, marker), ("refused", "unsupported", "global", "weights_only"),
         "pickle calling builtins.exec"),
        ("evil_legacy", "ckpt", lambda p: write_evil_legacy_pickle(p, marker), ("not a torch zip", "legacy", "refused"),
         "bare legacy pickle calling os.system"),
        ("corrupt_zip", "ckpt", lambda p: write_corrupt_zip_ckpt(p, base_ckpt), ("refused", "corrupt", "not a"),
         "torch zip with a mangled pickle record"),
        ("ckpt_no_tensors", "ckpt", write_ckpt_without_tensors, ("no tensors", "not a checkpoint"), "a pickle of plain numbers"),
        ("wrong_shape", "safetensors", lambda p: write_wrong_shape(p, base), ("shape", "64", "32"),
         f"tiny SD1 with {WRONG_SHAPE_KEY} at width 64"),
    ]
    out = {}
    for case, ext, writer, expect, desc in cases:
        path = folder / f"{case}.{ext}"
        writer(path)
        out[case] = HostileFile(case, path, expect, desc)
    return out


def write_mixed_pool(folder: str | Path) -> list[Path]:
    """A tiny SD1 and a tiny SDXL model side by side: each file is valid, the pool is not."""
    folder = Path(folder)
    return [make_checkpoint(folder / "mix_sd1.safetensors", ModelSpec(arch="sd1", size="tiny", seed=21)),
            make_checkpoint(folder / "mix_sdxl.safetensors", ModelSpec(arch="sdxl", size="tiny", seed=22))]
