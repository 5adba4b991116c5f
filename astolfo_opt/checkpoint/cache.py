"""A small JSON cache of per-file facts, keyed by (resolved path, size, mtime_ns).

Why: hashing and NaN-scanning a 50-model pool reads ~100-300 GB; the answer only changes when a file changes. An
entry is reused only while the file's size and mtime_ns are unchanged, so replacing a model (even with the same
name) invalidates it. Writes go through temp + rename, and the file is re-read just before each write so that two
processes inspecting different pools do not drop each other's entries (the last writer wins for the same path).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from astolfo_opt.checkpoint.writer import atomic_write_text

#: entries kept (least recently written dropped first) so the file stays small
MAX_ENTRIES = 5000


def cache_dir() -> Path:
    """``$ASTOLFO_OPT_CACHE`` or ``~/.cache/astolfo-opt`` (shared with the analysis cache)."""
    env = os.environ.get("ASTOLFO_OPT_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "astolfo-opt"


def file_identity(path: str | Path) -> tuple[str, int, int]:
    """``(resolved path, size, mtime_ns)``: what a cached entry must match to be reused."""
    p = Path(path).resolve()
    st = p.stat()
    return str(p), st.st_size, st.st_mtime_ns


class JsonCache:
    """``get(path)`` / ``put(path, value)`` of JSON values per model file, valid while the file is unchanged.

    ``version`` is stored with each entry; a different version (the cached facts changed meaning) is a miss.
    """

    def __init__(self, file: str | Path, version: int):
        self.file = Path(file)
        self.version = version
        self._data: dict[str, Any] | None = None
        self._dirty: dict[str, Any] = {}

    def _load(self) -> dict[str, Any]:
        try:
            data = json.loads(self.file.read_text())
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) and isinstance(data.get("entries"), dict) else {}

    def _entries(self) -> dict[str, Any]:
        if self._data is None:
            self._data = self._load().get("entries", {})
        return self._data

    def get(self, path: str | Path) -> Any | None:
        try:
            key, size, mtime = file_identity(path)
        except OSError:
            return None
        e = self._entries().get(key)
        if not isinstance(e, dict) or e.get("size") != size or e.get("mtime_ns") != mtime or e.get("version") != self.version:
            return None
        return e.get("value")

    def put(self, path: str | Path, value: Any) -> None:
        key, size, mtime = file_identity(path)
        entry = {"size": size, "mtime_ns": mtime, "version": self.version, "value": value}
        self._entries()[key] = entry
        self._dirty[key] = entry

    def flush(self) -> None:
        """Merge this session's entries into the file on disk (re-read first) and write it atomically."""
        if not self._dirty:
            return
        entries = self._load().get("entries", {})
        for k, v in self._dirty.items():
            entries.pop(k, None)  # re-insert: dict order = write order, oldest first
            entries[k] = v
        while len(entries) > MAX_ENTRIES:
            entries.pop(next(iter(entries)))
        try:
            atomic_write_text(self.file, json.dumps({"format": "astolfo-opt cache", "entries": entries}))
        except Exception:  # noqa: BLE001 - a cache that cannot be written must never fail the inspection
            return
        self._data = entries
        self._dirty = {}
