"""Shared test fixtures. Kept generic on purpose: every area's tests may use them.

* ``tiny_pools``: one tiny pool per architecture (``sd1``, ``sd2``, ``sdxl``), written once per session by the
  factory: ``base.safetensors`` + ``m00..m02`` (healthy fp16 finetunes of that base). Treat them as read-only.
* ``experiment``: ``experiment("bench_search")`` loads ``experiments/bench_search.py`` as a module (benchmark code
  lives outside the package; its tests call its functions).
* ``disk_fills_after``: ``disk_fills_after(n)`` makes ``os.pwrite`` raise ENOSPC from its (n+1)-th call on (a full
  disk without root or a tmpfs); returns the call counter ``{"n": calls}``.
* The whole session runs with ``ASTOLFO_OPT_CACHE`` pointing into a temp folder, so tests never read or write the
  user's real cache (tests that need a fresh cache still set their own with ``monkeypatch.setenv``).
"""

from __future__ import annotations

import os
import shutil
import tempfile

import pytest

from astolfo_opt.testing.factory import Pool, make_pool

MIN_FREE_DISK = 4 * 2**30
"""The suite writes up to ~3 GB of generated checkpoints at once (measured peak; the 8 GB full-size test checks its
own room and skips without it). Below this, every fixture would fail with "disk full" one by one: stop at once instead."""


def _free_disk() -> tuple[str, int]:
    where = os.environ.get("PYTEST_DEBUG_TEMPROOT") or tempfile.gettempdir()
    return where, shutil.disk_usage(where).free


def pytest_report_header(config) -> str:
    where, free = _free_disk()
    return f"astolfo-opt: {free / 2**30:.1f} GiB free disk at {where}"


def pytest_sessionstart(session) -> None:
    where, free = _free_disk()
    if free < MIN_FREE_DISK:
        raise pytest.UsageError(f"only {free / 2**30:.1f} GiB free at {where}; the test suite needs {MIN_FREE_DISK / 2**30:.0f} GiB "
                                "for its generated checkpoints (free space, or point TMPDIR at a larger disk)")


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory):
    old = os.environ.get("ASTOLFO_OPT_CACHE")
    os.environ["ASTOLFO_OPT_CACHE"] = str(tmp_path_factory.mktemp("astolfo-cache"))
    yield
    if old is None:
        os.environ.pop("ASTOLFO_OPT_CACHE", None)
    else:
        os.environ["ASTOLFO_OPT_CACHE"] = old


class _Pools(dict):
    """``tiny_pools["sd1"]`` -> :class:`~astolfo_opt.testing.factory.Pool`, generated on first use per architecture."""

    def __init__(self, root):
        super().__init__()
        self.root = root

    def __missing__(self, arch: str) -> Pool:
        pool = make_pool(self.root / arch, n=3, arch=arch, size="tiny", seed=7)
        self[arch] = pool
        return pool


@pytest.fixture(scope="session")
def tiny_pools(tmp_path_factory) -> _Pools:
    return _Pools(tmp_path_factory.mktemp("tiny_pools"))


@pytest.fixture(scope="session")
def demo_world(tmp_path_factory):
    """The demo-size trained world, built once per session (~3 min on 2 cores) or taken from ``ASTOLFO_TEST_WORLD``
    (a developer's already-built one; the build verifies and reuses it)."""
    import os
    from pathlib import Path

    from astolfo_opt.world.build import BuildParams, build_world

    cached = os.environ.get("ASTOLFO_TEST_WORLD")
    out = Path(cached) if cached else tmp_path_factory.mktemp("demo-world") / "world"
    build_world(out, BuildParams(size="demo"), progress=False)
    return out


@pytest.fixture(scope="session")
def experiment():
    """``experiment(name)`` -> ``experiments/<name>.py`` executed as module ``name`` and registered in ``sys.modules``
    (dataclasses look their module up, and the scripts import each other by name). Each call executes it afresh."""
    import importlib.util
    import sys
    from pathlib import Path

    folder = Path(__file__).resolve().parents[1] / "experiments"

    def load(name: str):
        spec = importlib.util.spec_from_file_location(name, folder / f"{name}.py")
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod
        spec.loader.exec_module(mod)  # type: ignore[union-attr]
        return mod

    return load


@pytest.fixture
def disk_fills_after(monkeypatch):
    import errno

    def arm(n: int) -> dict[str, int]:
        calls, real = {"n": 0}, os.pwrite

        def failing(fd, data, offset):
            calls["n"] += 1
            if calls["n"] > n:
                raise OSError(errno.ENOSPC, "No space left on device")
            return real(fd, data, offset)

        monkeypatch.setattr(os, "pwrite", failing)
        return calls

    return arm
