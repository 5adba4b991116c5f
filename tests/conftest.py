"""Shared test fixtures. Kept generic on purpose: every area's tests may use them.

* ``tiny_pools``: one tiny pool per architecture (``sd1``, ``sd2``, ``sdxl``), written once per session by the
  factory: ``base.safetensors`` + ``m00..m02`` (healthy fp16 finetunes of that base). Treat them as read-only.
* The whole session runs with ``ASTOLFO_OPT_CACHE`` pointing into a temp folder, so tests never read or write the
  user's real cache (tests that need a fresh cache still set their own with ``monkeypatch.setenv``).
"""

from __future__ import annotations

import os

import pytest

from astolfo_opt.testing.factory import Pool, make_pool


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
