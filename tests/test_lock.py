"""requirements.lock against pyproject.toml: both README commands install from the lock, so a dependency missing from
it, a pin outside pyproject's range or an unhashed pin would turn a fresh machine's install into a different set
than the one CI tested (issue 14: an unpinned install moved under the search tests and turned CI red)."""

from __future__ import annotations

import os
import re
import tomllib
from importlib import metadata
from pathlib import Path

import pytest
from packaging.markers import Marker
from packaging.requirements import Requirement
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
LOCK = ROOT / "requirements.lock"
PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;\\]+)\s*(?:;\s*([^\\]+?))?\s*\\?$")


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def parse_lock(text: str) -> list[tuple[str, Version, Marker | None, int]]:
    """(name, version, marker, number of hashes) per pinned entry; any other requirement line is an error."""
    out: list[tuple[str, Version, Marker | None, int]] = []
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("--hash="):
            if not out:
                raise ValueError(f"hash before any pin: {raw!r}")
            name, ver, mk, n = out[-1]
            out[-1] = (name, ver, mk, n + 1)
            continue
        m = PIN.match(line)
        if m is None:
            raise ValueError(f"not an exact pin: {raw!r}")
        out.append((_norm(m[1]), Version(m[2]), Marker(m[3]) if m[3] else None, 0))
    return out


def project_requirements() -> list[Requirement]:
    proj = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = [Requirement(r) for r in proj["dependencies"]]
    for extra in proj.get("optional-dependencies", {}).values():
        reqs += [Requirement(r) for r in extra]
    return reqs


def lock_problems(reqs: list[Requirement], lock: list[tuple[str, Version, Marker | None, int]]) -> list[str]:
    """Why the lock does not serve ``reqs``: a requirement with no pin, a pin outside its range, an unhashed pin."""
    pins: dict[str, list[tuple[Version, Marker | None]]] = {}
    bad: list[str] = []
    for name, ver, mk, n in lock:
        pins.setdefault(name, []).append((ver, mk))
        if n == 0:
            bad.append(f"{name}=={ver} has no --hash (regenerate with `make lock`)")
    for r in reqs:
        have = pins.get(_norm(r.name))
        if not have:
            bad.append(f"{r.name} is in pyproject.toml but not in requirements.lock (run `make lock`)")
            continue
        for ver, mk in have:
            if not r.specifier.contains(ver, prereleases=True):
                where = f" ; {mk}" if mk else ""
                bad.append(f"{r.name}: the lock pins {ver}{where}, outside pyproject's {r.specifier} (run `make lock`)")
    return bad


def test_lock_pins_every_project_requirement_within_its_range():
    lock = parse_lock(LOCK.read_text())
    assert lock_problems(project_requirements(), lock) == []
    # the torch build users get is the plain PyPI one (the CUDA build, which also runs on CPU), never a local +cpu wheel
    torch = [v for n, v, _, _ in lock if n == "torch"]
    assert torch and all(v.local is None for v in torch)
    assert "make lock" in LOCK.read_text().splitlines()[1]


def test_lock_check_catches_a_missing_or_out_of_range_pin():
    """The check itself can fail: a dependency absent from the lock, a pin outside the range, a pin without a hash."""
    reqs = [Requirement("optuna>=4.0,<6"), Requirement("scipy>=1.11")]
    good = parse_lock("optuna==5.1.0 \\\n    --hash=sha256:aa\nscipy==1.17.1 ; python_full_version < '3.12' \\\n"
                      "    --hash=sha256:bb\n")
    assert lock_problems(reqs, good) == []
    assert any("scipy" in p and "not in requirements.lock" in p for p in lock_problems(reqs, good[:1]))
    out = parse_lock("optuna==6.0.0 \\\n    --hash=sha256:aa\nscipy==1.17.1\n")
    probs = lock_problems(reqs, out)
    assert any("optuna" in p and "outside" in p for p in probs) and any("scipy" in p and "no --hash" in p for p in probs)
    with pytest.raises(ValueError, match="not an exact pin"):
        parse_lock("optuna>=5\n")


@pytest.mark.skipif(os.environ.get("ASTOLFO_UNLOCKED") == "1", reason="make test-latest runs the suite on the unpinned latest")
def test_installed_environment_is_the_locked_one():
    """`make test` / `make demo` installed from the lock: every pin that applies to this interpreter is what is installed."""
    wrong = []
    for name, ver, mk, _ in parse_lock(LOCK.read_text()):
        if mk is not None and not mk.evaluate():
            continue
        try:
            have = Version(metadata.version(name))
        except metadata.PackageNotFoundError:
            wrong.append(f"{name} (not installed)")
            continue
        if have != ver:
            wrong.append(f"{name} {have} != {ver}")
    assert not wrong, f"the venv is not the locked set (rerun `make venv`): {wrong}"
