"""Hashes that identify model files and their components.

Two different questions, two hashes:

* *Is this the same file?* - the A1111 "short hash" users see in the WebUI and in metadata (sha256 of the whole
  file, first 10 hex digits), plus the legacy 8-hex "model hash" (sha256 of 64 KiB at offset 1 MiB) that old
  A1111 infotexts carry. Both depend on every byte, so a re-save changes them.
* *Is this the same component?* - a content hash over canonical key names, dtype, shape and raw bytes, in sorted
  key order. Key spelling (old SD1 CLIP names) and file order do not change it, so a text encoder copied bit for
  bit into another finetune matches, while an fp16 re-save (different bytes) does not. ``position_ids`` are left
  out: they are not weights, and files differ in whether / how they store them.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Iterable
from pathlib import Path

import torch

from astolfo_opt.checkpoint.io import TORCH_TO_ST

#: read size for whole-file hashing (large enough that hashlib releases the GIL and syscalls are rare)
CHUNK = 16 * 1024 * 1024
LEGACY_OFFSET, LEGACY_SIZE = 0x100000, 0x10000


def legacy_model_hash(path: str | Path) -> str:
    """A1111's old 8-hex ``model_hash``: sha256 of the 64 KiB at offset 1 MiB (cheap; collides more easily)."""
    with open(path, "rb") as f:
        f.seek(LEGACY_OFFSET)
        return hashlib.sha256(f.read(LEGACY_SIZE)).hexdigest()[:8]


def file_sha256(path: str | Path, on_bytes=None) -> str:
    """sha256 of the whole file, streamed; ``on_bytes(n)`` is called after each chunk (progress)."""
    h = hashlib.sha256()
    with open(path, "rb", buffering=0) as f:
        buf = bytearray(CHUNK)
        view = memoryview(buf)
        while n := f.readinto(buf):
            h.update(view[:n])
            if on_bytes is not None:
                on_bytes(n)
    return h.hexdigest()


class BackgroundFileHash:
    """Hash a whole file in a thread while the caller streams its tensors (hashlib releases the GIL on large
    buffers, so on a 2-core machine both passes overlap instead of adding up)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.digest: str | None = None
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="astolfo-file-hash", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            self.digest = file_sha256(self.path)
        except BaseException as e:  # noqa: BLE001 - handed back to the caller in result()
            self.error = e

    def result(self) -> str:
        self._thread.join()
        if self.error is not None:
            raise self.error
        assert self.digest is not None
        return self.digest


def tensor_bytes(t: torch.Tensor) -> bytes | memoryview:
    """The raw little-endian bytes of a CPU tensor as a file stores them (bf16 / fp8 through a byte view)."""
    t = t.detach().cpu().contiguous()
    if t.numel() == 0:
        return b""
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())


def tensor_digest(data: bytes | memoryview) -> bytes:
    return hashlib.sha256(data).digest()


def component_hash(entries: Iterable[tuple[str, torch.dtype | str, tuple[int, ...], bytes]]) -> str:
    """Content hash of one component from ``(canonical_key, dtype, shape, tensor_digest)`` rows.

    Rows are sorted by key, so the file order and the reading order do not matter; ``position_ids`` rows are dropped.
    """
    h = hashlib.sha256(b"astolfo-opt component v1\n")
    for key, dtype, shape, digest in sorted(entries, key=lambda r: r[0]):
        if key.endswith("position_ids"):
            continue
        dt = TORCH_TO_ST.get(dtype, str(dtype)) if isinstance(dtype, torch.dtype) else str(dtype)
        h.update(f"{key}\0{dt}\0{','.join(map(str, shape))}\0".encode())
        h.update(digest)
    return h.hexdigest()
