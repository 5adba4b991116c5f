"""Lazy, validated checkpoint readers.

Model files are untrusted downloads. ``.safetensors`` headers are parsed and fully validated here (sizes, dtypes,
shapes against byte ranges, overlaps, bounds) before any tensor is touched, and tensors are then served zero-copy
from a read-only mmap, one key at a time, so inspecting a 50-model pool reads only headers. ``.ckpt`` pickles are
only ever opened with ``torch.load(weights_only=True)``, which refuses anything but tensors and plain containers.
"""

from __future__ import annotations

import contextlib
import json
import mmap
import os
import struct
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from astolfo_opt.errors import CheckpointError

#: safetensors dtype names -> torch dtypes (only those this torch build knows)
ST_DTYPES: dict[str, torch.dtype] = {
    name: getattr(torch, attr)
    for name, attr in {
        "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64", "I32": "int32",
        "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool", "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2",
        "U16": "uint16", "U32": "uint32", "U64": "uint64",
    }.items()
    if hasattr(torch, attr)
}
TORCH_TO_ST: dict[torch.dtype, str] = {v: k for k, v in ST_DTYPES.items()}
#: float8 storage dtypes (F8_E4M3 / F8_E5M2 files): torch has no type promotion or reductions for them, so readers
#: of values widen them first (exactly: every fp8 value is an fp16 value)
FP8_DTYPES: tuple[torch.dtype, ...] = tuple(ST_DTYPES[k] for k in ("F8_E4M3", "F8_E5M2") if k in ST_DTYPES)
MAX_HEADER_BYTES = 100 * 1024 * 1024
SAFETENSORS_SUFFIXES = (".safetensors", ".sft")
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")


@dataclass(frozen=True)
class TensorInfo:
    dtype: torch.dtype
    shape: tuple[int, ...]
    nbytes: int


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def dtype_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def parse_safetensors_header(raw: bytes, file_size: int, path: str | Path = "<bytes>") -> tuple[dict[str, Any], int]:
    """Validate a safetensors header; return ``(entries, data_start)``. ``raw`` holds at least the header bytes.

    Every way a header can lie is refused with a :class:`CheckpointError`: length past the file, non-JSON, unknown
    dtype, shapes that do not match their byte range, ranges out of bounds or overlapping.
    """
    if file_size < 8 or len(raw) < 8:
        raise CheckpointError(path, f"not a safetensors file: only {file_size} bytes")
    (n,) = struct.unpack("<Q", raw[:8])
    if n > MAX_HEADER_BYTES or n + 8 > file_size:
        raise CheckpointError(path, f"corrupt safetensors header: header length {n} exceeds the file ({file_size} bytes)")
    try:
        header = json.loads(raw[8 : 8 + n].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:  # deep nesting must not escape
        raise CheckpointError(path, f"corrupt safetensors header: not JSON ({e.__class__.__name__})") from None
    if not isinstance(header, dict):
        raise CheckpointError(path, "corrupt safetensors header: not a JSON object")
    data_start, data_size = 8 + n, file_size - 8 - n
    meta = header.pop("__metadata__", None) or {}
    if not isinstance(meta, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
        raise CheckpointError(path, "corrupt safetensors header: __metadata__ must map strings to strings")
    ranges = []
    for key, e in header.items():
        if not isinstance(e, dict) or not {"dtype", "shape", "data_offsets"} <= set(e):
            raise CheckpointError(path, f"corrupt safetensors header: entry {key!r} lacks dtype/shape/data_offsets")
        if not isinstance(e["dtype"], str) or e["dtype"] not in ST_DTYPES:  # a list here is unhashable
            raise CheckpointError(path, f"unsupported dtype {e['dtype']!r} for tensor {key}")
        shape, offs = e["shape"], e["data_offsets"]
        if not (isinstance(shape, list) and all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in shape)
                and _numel(tuple(max(s, 1) for s in shape)) < 2**62):  # torch cannot stride larger dims, even when empty
            raise CheckpointError(path, f"corrupt safetensors header: bad shape {shape!r} for tensor {key}")
        if not (isinstance(offs, list) and len(offs) == 2 and all(isinstance(o, int) and not isinstance(o, bool) for o in offs)):
            raise CheckpointError(path, f"corrupt safetensors header: bad data_offsets {offs!r} for tensor {key}")
        begin, end = offs
        if not 0 <= begin <= end:
            raise CheckpointError(path, f"corrupt safetensors header: bad data_offsets {offs!r} for tensor {key}")
        if end > data_size:
            raise CheckpointError(path, f"truncated file: tensor {key} ends at byte {end} of a {data_size}-byte data section")
        want = _numel(tuple(shape)) * dtype_size(ST_DTYPES[e["dtype"]])
        if end - begin != want:
            raise CheckpointError(path, f"corrupt safetensors header: tensor {key} shape {shape} needs {want} bytes, "
                                        f"its range holds {end - begin}")
        ranges.append((begin, end, key))
    ranges.sort()
    reach, reach_key = 0, ""
    for begin, end, key in ranges:
        if end > begin:  # empty tensors occupy no bytes and may sit anywhere
            if begin < reach:
                raise CheckpointError(path, f"corrupt safetensors header: tensors {reach_key} and {key} overlap")
            reach, reach_key = end, key
    header["__metadata__"] = meta
    return header, data_start


class CheckpointReader:
    """Common interface: raw key names as stored, per-key info, lazy per-key reads, metadata."""

    path: Path
    format: str
    metadata: dict[str, str]

    def keys(self) -> list[str]:
        raise NotImplementedError

    def info(self, key: str) -> TensorInfo:
        raise NotImplementedError

    def get(self, key: str) -> torch.Tensor:
        """The tensor as stored (CPU). May share memory with the file mapping: treat it as read-only."""
        raise NotImplementedError

    def release(self, key: str) -> None:
        """Let go of any mapped pages of ``key`` (see :meth:`SafetensorsReader.release`); nothing to do by default."""

    def read(self, key: str, out: torch.Tensor | None = None) -> torch.Tensor:
        """A private copy of ``key`` (safe to keep or modify)."""
        t = self.get(key)
        return out.view(t.shape).copy_(t) if out is not None else t.clone()

    def close(self) -> None:
        pass

    @property
    def file_size(self) -> int:
        return self.path.stat().st_size

    def __contains__(self, key: str) -> bool:
        return key in self._index()

    def _index(self) -> dict[str, Any]:
        raise NotImplementedError

    def __enter__(self) -> CheckpointReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class SafetensorsReader(CheckpointReader):
    format = "safetensors"

    def __init__(self, path: str | Path):
        self.path = Path(path)
        size = self.path.stat().st_size
        with open(self.path, "rb") as f:
            head = f.read(8)
            if len(head) == 8:
                (n,) = struct.unpack("<Q", head)
                if n <= MAX_HEADER_BYTES and n + 8 <= size:
                    head += f.read(n)
        header, self._data_start = parse_safetensors_header(head, size, self.path)
        self.metadata = header.pop("__metadata__")
        self._header: dict[str, Any] = header
        self._mm: mmap.mmap | None = None
        self._fd: int | None = None
        self._infos = {
            k: TensorInfo(ST_DTYPES[e["dtype"]], tuple(e["shape"]), e["data_offsets"][1] - e["data_offsets"][0])
            for k, e in header.items()
        }

    def _index(self) -> dict[str, Any]:
        return self._header

    def keys(self) -> list[str]:
        return list(self._header)

    def info(self, key: str) -> TensorInfo:
        return self._infos[key]

    def _map(self) -> mmap.mmap:
        if self._mm is None:
            with open(self.path, "rb") as f:
                self._mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        return self._mm

    def get(self, key: str) -> torch.Tensor:
        info = self._infos[key]
        begin = self._header[key]["data_offsets"][0] + self._data_start
        if info.nbytes == 0:
            return torch.empty(info.shape, dtype=info.dtype)
        with warnings.catch_warnings():  # the mapping is read-only by design
            warnings.simplefilter("ignore", UserWarning)
            flat = torch.frombuffer(self._map(), dtype=info.dtype, count=_numel(info.shape), offset=begin)
        return flat.view(info.shape)

    def read(self, key: str, out: torch.Tensor | None = None) -> torch.Tensor:
        """A private copy of ``key`` read with ``pread`` (no mapping: file pages do not count towards RSS, so a merge
        over many large files keeps a bounded footprint). ``out`` (e.g. a pinned staging buffer of the right dtype and
        size) is filled instead of allocating."""
        info = self._infos[key]
        begin = self._header[key]["data_offsets"][0] + self._data_start
        t = out if out is not None else torch.empty(info.shape, dtype=info.dtype)
        if info.nbytes == 0:
            return t
        buf = memoryview(t.view(-1).view(torch.uint8).numpy()) if t.dim() else memoryview(t.reshape(1).view(torch.uint8).numpy())
        if self._fd is None:
            self._fd = os.open(self.path, os.O_RDONLY)
        got = 0
        while got < info.nbytes:
            n = os.preadv(self._fd, [buf[got:info.nbytes]], begin + got)
            if n <= 0:
                raise CheckpointError(self.path, f"truncated file: could not read tensor {key}")
            got += n
        return t.view(info.shape)

    def release(self, key: str) -> None:
        """Drop this process's mapping of ``key``'s pages (``MADV_DONTNEED``: the page cache keeps them, the next
        access faults them back in). A merge that reads through the mapping releases each key once it is summed,
        so its resident set stays at a few tensors however many files it maps."""
        if self._mm is None or not hasattr(mmap, "MADV_DONTNEED"):
            return
        lo, hi = self._header[key]["data_offsets"]
        start = (self._data_start + lo) // mmap.PAGESIZE * mmap.PAGESIZE
        end = min(self._data_start + hi, len(self._mm))
        if end > start:
            with contextlib.suppress(OSError, ValueError):
                self._mm.madvise(mmap.MADV_DONTNEED, start, end - start)

    def raw_bytes(self, key: str) -> memoryview:
        """The stored bytes of ``key`` (for hashing without dtype conversion)."""
        begin, end = self._header[key]["data_offsets"]
        return memoryview(self._map())[self._data_start + begin : self._data_start + end]

    def close(self) -> None:
        # tensors handed out may still view the map; let the GC unmap it when the last one is gone
        self._mm = None
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def _unwrap_state_dict(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    for _ in range(3):
        if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
            obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise CheckpointError(path, f"not a checkpoint: the pickle holds a {type(obj).__name__}, not a state dict")
    tensors = {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
    if not tensors:
        raise CheckpointError(path, "not a checkpoint: the pickle holds no tensors")
    return tensors


class PickleCheckpointReader(CheckpointReader):
    """``.ckpt`` / ``.pt``: only through ``torch.load(weights_only=True)`` (never runs code in the pickle)."""

    format = "ckpt"

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not zipfile.is_zipfile(self.path):
            raise CheckpointError(self.path, "not a readable .ckpt: not a torch zip archive (legacy or corrupt file)",
                                  "convert it to .safetensors with a trusted tool")
        try:
            obj = torch.load(self.path, map_location="cpu", weights_only=True, mmap=True)
        except Exception as e:  # noqa: BLE001 - every failure here is a refusal of untrusted input
            msg = str(e).strip().splitlines()
            detail = next((m for m in msg if "Unsupported" in m or "GLOBAL" in m), msg[0] if msg else type(e).__name__)
            raise CheckpointError(self.path, f"refused .ckpt: {detail.strip().split(' Please use')[0][:200]}",
                                  "only plain tensors are loaded; convert trusted files to .safetensors") from None
        self._tensors = _unwrap_state_dict(obj, self.path)
        self.metadata = {}

    def _index(self) -> dict[str, Any]:
        return self._tensors

    def keys(self) -> list[str]:
        return list(self._tensors)

    def info(self, key: str) -> TensorInfo:
        t = self._tensors[key]
        return TensorInfo(t.dtype, tuple(t.shape), t.numel() * t.element_size())

    def get(self, key: str) -> torch.Tensor:
        return self._tensors[key]

    def close(self) -> None:
        self._tensors = {}


def open_checkpoint(path: str | Path) -> CheckpointReader:
    """Open a model file lazily, refusing anything that is not a valid safetensors or a tensor-only torch zip."""
    p = Path(path)
    if not p.exists():
        raise CheckpointError(p, "file not found")
    if p.is_dir():
        raise CheckpointError(p, "is a directory, not a model file")
    if not os.access(p, os.R_OK):
        raise CheckpointError(p, "permission denied")
    suffix = p.suffix.lower()
    try:
        if suffix in SAFETENSORS_SUFFIXES:
            return SafetensorsReader(p)
        if suffix in PICKLE_SUFFIXES:
            return PickleCheckpointReader(p)
    except OSError as e:
        raise CheckpointError(p, f"cannot read: {e.strerror or e}") from None
    raise CheckpointError(p, f"unsupported file type {suffix or '(none)'}", "expected .safetensors or .ckpt")
