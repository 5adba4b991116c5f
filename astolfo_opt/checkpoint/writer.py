"""Streaming ``.safetensors`` writer and atomic file helpers.

The header is computed up front from the output layout, so tensors can be written as the merge produces them (in
any order, with ``pwrite`` at their offset) and at most one tensor is ever held by the writer. Everything goes to a
hidden temp file beside the target that is renamed into place only when every tensor has been written and synced:
a crash, a kill -9 or a full disk never leaves a file at the target name. Stale temp files from killed runs are
removed by :func:`clean_stale_partials` on the next run.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import secrets
import struct
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch

from astolfo_opt.checkpoint.io import TORCH_TO_ST, dtype_size
from astolfo_opt.errors import AstolfoError

PARTIAL_MARK = ".partial-"
#: start the disk write-back of every this many bytes as soon as they are written (see :func:`start_writeback`)
WRITEBACK_CHUNK = 128 << 20


def _libc_sync_file_range():
    """glibc's ``sync_file_range`` (Linux), or None: Python's ``os`` does not expose it."""
    import ctypes
    import ctypes.util
    import sys

    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        fn = libc.sync_file_range
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


_SYNC_FILE_RANGE = _libc_sync_file_range()
_SYNC_FILE_RANGE_WRITE = 2


def start_writeback(fd: int, offset: int, nbytes: int) -> None:
    """Ask the kernel to start writing ``[offset, offset + nbytes)`` to disk now, without waiting.

    Why: a merge writes its output into the page cache in seconds, and the final ``fsync`` would then pay the whole
    disk write after the arithmetic is done. Starting write-back as each chunk is complete overlaps the disk with the
    rest of the merge, so the final ``fsync`` waits only for the tail. A no-op where ``sync_file_range`` is missing."""
    if _SYNC_FILE_RANGE is not None and nbytes > 0:
        _SYNC_FILE_RANGE(fd, offset, nbytes, _SYNC_FILE_RANGE_WRITE)  # errors only mean "no early write-back"


def partial_path(target: Path) -> Path:
    """Hidden temp name beside ``target`` carrying our pid, so a later run can tell stale leftovers."""
    return target.with_name(f".{target.name}{PARTIAL_MARK}{os.getpid()}-{secrets.token_hex(4)}")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stale_partials(folder: str | Path) -> list[Path]:
    """Remove temp files left by killed writers (their pid is gone). Returns what was removed."""
    removed = []
    folder = Path(folder)
    if not folder.is_dir():
        return removed
    for p in folder.glob(f".*{PARTIAL_MARK}*"):
        try:
            pid = int(p.name.rsplit(PARTIAL_MARK, 1)[1].split("-", 1)[0])
        except (IndexError, ValueError):
            continue
        if not _pid_alive(pid):
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
                removed.append(p)
    return removed


def _raise_write_error(target: Path, e: OSError) -> None:
    if e.errno == errno.ENOSPC:
        raise AstolfoError(f"{target}: disk full while writing; no file was left behind (free space and retry)") from None
    raise AstolfoError(f"{target}: cannot write: {e.strerror or e}") from None


def atomic_write_bytes(target: str | Path, data: bytes) -> None:
    """Write ``data`` to ``target`` through a synced temp file and a rename."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = partial_path(target)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        _raise_write_error(target, e)


def atomic_write_text(target: str | Path, text: str) -> None:
    atomic_write_bytes(target, text.encode("utf-8"))


def _tensor_bytes(t: torch.Tensor) -> memoryview:
    t = t.detach().to("cpu").contiguous()
    if t.numel() == 0:  # memoryview cannot cast a view with a zero in its shape; an empty tensor has no bytes
        return memoryview(b"")
    if t.dtype in (torch.bfloat16,) or str(t.dtype).startswith("torch.float8"):
        t = t.view(torch.uint8) if t.dim() else t.reshape(1).view(torch.uint8)
    return memoryview(t.numpy()).cast("B")


class SafetensorsWriter:
    """Write a ``.safetensors`` file tensor by tensor. Use as a context manager: it commits on success and removes
    the temp file on any exception.

    ``entries``: ``(key, dtype, shape)`` in file order. ``write`` accepts them in any order; ``commit`` refuses a
    file with a tensor missing.
    """

    def __init__(self, target: str | Path, entries: Iterable[tuple[str, torch.dtype, tuple[int, ...]]],
                 metadata: Mapping[str, str] | None = None):
        self.target = Path(target)
        self.target.parent.mkdir(parents=True, exist_ok=True)
        header: dict[str, object] = {}
        if metadata:
            header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
        self._slots: dict[str, tuple[int, int, torch.dtype, tuple[int, ...]]] = {}
        offset = 0
        for key, dtype, shape in entries:
            if key in self._slots:
                raise ValueError(f"duplicate key {key}")
            n = dtype_size(dtype)
            for s in shape:
                n *= s
            header[key] = {"dtype": TORCH_TO_ST[dtype], "shape": list(shape), "data_offsets": [offset, offset + n]}
            self._slots[key] = (offset, n, dtype, tuple(shape))
            offset += n
        raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
        raw += b" " * (-len(raw) % 8)  # 8-byte alignment of the data section, as the reference writer does
        self._data_start = 8 + len(raw)
        self.total_bytes = self._data_start + offset
        self._pending = set(self._slots)
        self._unflushed = 0  # bytes written since the last write-back started
        self._flushed_to = self._data_start  # file offset up to which write-back has been started (in-order writes)
        self._tmp = partial_path(self.target)
        try:
            self._fd: int | None = os.open(self._tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            os.pwrite(self._fd, struct.pack("<Q", len(raw)) + raw, 0)
        except OSError as e:
            self.abort()
            _raise_write_error(self.target, e)

    def write(self, key: str, tensor: torch.Tensor) -> None:
        offset, n, dtype, shape = self._slots[key]
        if tensor.dtype != dtype or tuple(tensor.shape) != shape:
            tensor = tensor.to(dtype).reshape(shape)
        buf = _tensor_bytes(tensor)
        if len(buf) != n:  # pragma: no cover - guarded by the reshape above
            raise AssertionError(f"{key}: {len(buf)} bytes for a {n}-byte slot")
        try:
            pos = 0
            while pos < n:
                pos += os.pwrite(self._fd, buf[pos:], self._data_start + offset + pos)
        except OSError as e:
            self.abort()
            _raise_write_error(self.target, e)
        self._pending.discard(key)
        self._unflushed += n
        if self._unflushed >= WRITEBACK_CHUNK:  # the merge writes in layout order: everything below here is written
            end = self._data_start + offset + n
            start_writeback(self._fd, self._flushed_to, end - self._flushed_to)  # type: ignore[arg-type]
            self._flushed_to, self._unflushed = end, 0

    def commit(self) -> Path:
        if self._pending:
            missing = sorted(self._pending)
            self.abort()
            raise AstolfoError(f"{self.target}: {len(missing)} tensors were never written (first: {missing[0]})")
        try:
            os.fsync(self._fd)
            os.close(self._fd)
            self._fd = None
            os.replace(self._tmp, self.target)
        except OSError as e:
            self.abort()
            _raise_write_error(self.target, e)
        return self.target

    def abort(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = None
        self._tmp.unlink(missing_ok=True)

    def __enter__(self) -> SafetensorsWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.abort()


def save_safetensors(target: str | Path, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None) -> Path:
    """Atomically save a dict of tensors (small files: factory, tests)."""
    with SafetensorsWriter(target, [(k, t.dtype, tuple(t.shape)) for k, t in tensors.items()], metadata) as w:
        for k, t in tensors.items():
            w.write(k, t)
    return Path(target)
