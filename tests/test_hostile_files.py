"""Hostile and broken model files: every command refuses each one with one line naming the file, never a traceback,
never a hang, never a file left behind, and never by running code from a pickle.

The corpus (``astolfo_opt.testing.hostile``) is written once per session. The CLI matrix runs through one driver
subprocess per command (one torch import for ~20 calls, with a hang timeout), and a few cases also go through the
real ``python -m astolfo_opt.cli`` entry point one process each.
"""

from __future__ import annotations

import json
import os
import re
import struct
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from astolfo_opt.checkpoint.io import ST_DTYPES, dtype_size, open_checkpoint, parse_safetensors_header
from astolfo_opt.checkpoint.writer import PARTIAL_MARK, save_safetensors
from astolfo_opt.errors import AstolfoError, CheckpointError
from astolfo_opt.search.pool import resolve_pool
from astolfo_opt.testing import hostile
from astolfo_opt.testing.factory import ModelSpec, make_checkpoint

ROOT = Path(__file__).resolve().parents[1]
#: cases that only an architecture / shape check can refuse (the header itself is valid)
SEMANTIC = {"foreign", "wrong_shape"}
#: a real traceback starts a line; the control_chars case only *quotes* the word inside an escaped key name
TRACEBACK = re.compile(r"^\s*Traceback \(most recent call last\)", re.M)

# Runs many CLI calls in one process: one torch import, per-call stdout/stderr capture, crashes recorded as text.
DRIVER = r"""
import contextlib, io, json, sys, traceback
from astolfo_opt.cli import main
jobs = json.loads(sys.argv[1])
for job in jobs:
    print(json.dumps({"start": job["id"]}), flush=True)
    out, err = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            rc = main(job["argv"])
    except SystemExit as e:
        rc = e.code if isinstance(e.code, int) else 1
    except BaseException:
        rc = -999
        err.write(traceback.format_exc())
    print(json.dumps({"id": job["id"], "rc": rc, "stdout": out.getvalue(), "stderr": err.getvalue()}), flush=True)
"""


def _env(tmp: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["ASTOLFO_OPT_CACHE"] = str(tmp / "cache")  # never touch the user's cache
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def run_driver(jobs: list[dict], tmp: Path, timeout: float | None = None) -> dict[str, dict]:
    """Run ``astolfo_opt.cli.main(argv)`` for each job in one subprocess; returns id -> {rc, stdout, stderr}."""
    timeout = timeout or 60 + 15 * len(jobs)
    try:
        proc = subprocess.run([sys.executable, "-c", DRIVER, json.dumps(jobs)], capture_output=True, text=True,
                              timeout=timeout, cwd=tmp, env=_env(tmp))
    except subprocess.TimeoutExpired as e:
        out = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        started = [json.loads(line)["start"] for line in out.splitlines() if line.startswith('{"start"')]
        pytest.fail(f"hang: the driver did not finish within {timeout}s; last job started: {started[-1:]}")
    results = {}
    for line in proc.stdout.splitlines():
        if line.startswith('{"id"'):
            r = json.loads(line)
            results[r["id"]] = r
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    missing = [j["id"] for j in jobs if j["id"] not in results]
    assert not missing, f"driver died (rc {proc.returncode}) before {missing[:3]}: {proc.stderr[-2000:]}"
    return results


def assert_refusal(r: dict, path: Path, expect: tuple[str, ...], what: str) -> str:
    """One ``error:`` line, exit 2, names the file and says what is wrong; no traceback, no terminal control."""
    err = r["stderr"]
    assert r["rc"] not in (0, -999), f"{what}: accepted {path.name} (rc {r['rc']}); stderr={err[-1500:]!r}"
    assert not TRACEBACK.search(err + r["stdout"]), f"{what}: traceback for {path.name}:\n{err[-3000:]}"
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, f"{what}: expected one 'error:' line for {path.name}, got {err!r}"
    line = lines[0]
    assert "\x1b" not in err and "\r" not in err, f"{what}: terminal control characters from the file reach stderr: {err!r}"
    assert path.name in line or f"{path.stem}=" in line or f"{path.stem}:" in line, f"{what}: error does not name {path.name}: {line}"
    assert any(x in line.lower() for x in expect), f"{what}: error for {path.name} does not say {expect}: {line}"
    return line


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Hostile files + a valid tiny SD1 model + the marker the pickle payloads would create."""
    root = tmp_path_factory.mktemp("hostile")
    marker = root / "PWNED_MARKER"
    files = hostile.write_corpus(root / "files", marker)
    valid = make_checkpoint(root / "valid" / "good.safetensors", ModelSpec(arch="sd1", size="tiny", seed=3))
    yield {"root": root, "files": files, "marker": marker, "valid": valid}
    assert not marker.exists(), "a pickle payload ran: the marker file was created"


# ---------------------------------------------------------------------------------------------------- readers


def test_reader_refuses_every_broken_file(corpus):
    """The shared reader is the first line: each byte-level case is a CheckpointError naming the file."""
    for case, h in corpus["files"].items():
        if case in SEMANTIC:
            continue
        with pytest.raises(CheckpointError) as ei:
            open_checkpoint(h.path)
        msg = str(ei.value)
        assert h.path.name in msg and "\n" not in msg.strip("\n").split(": ", 1)[0], (case, msg)
        assert any(x in msg.lower() for x in h.expect), (case, msg)
    assert not corpus["marker"].exists()


def test_pickle_payload_is_live(tmp_path):
    """Positive control: the evil files really do run code when unpickled without ``weights_only`` - so the
    marker assertions elsewhere can fail."""
    control = tmp_path / "CONTROL_MARKER"
    evil = hostile.write_evil_ckpt_exec(tmp_path / "control.ckpt", control)
    torch.load(evil, weights_only=False)  # deliberately unsafe, on our own file, to prove the payload works
    assert control.exists()
    control.unlink()
    with pytest.raises(CheckpointError, match="refused"):
        open_checkpoint(evil)
    assert not control.exists()


def test_wrong_shape_and_foreign_files_open_but_are_detectably_wrong(corpus):
    """These two have valid headers; what is wrong is only visible against the layouts."""
    from astolfo_opt.checkpoint.layout import detect_architecture, get_layout

    with open_checkpoint(corpus["files"]["foreign"].path) as r:
        assert detect_architecture(r.keys()) is None
    with open_checkpoint(corpus["files"]["wrong_shape"].path) as r:
        assert r.info(hostile.WRONG_SHAPE_KEY).shape == (64,)
        assert get_layout("sd1", "tiny").expected_shape(hostile.WRONG_SHAPE_KEY) == (32,)


# ---------------------------------------------------------------------------------------------------- CLI


def test_inspect_refuses_each_hostile_file(corpus):
    jobs = [{"id": c, "argv": ["inspect", str(h.path)]} for c, h in corpus["files"].items()]
    res = run_driver(jobs, corpus["root"])
    for case, h in corpus["files"].items():
        assert_refusal(res[case], h.path, h.expect, "inspect")
    assert not corpus["marker"].exists()


def merge_argv(files: list[Path], out: Path, nan_policy: str | None = None) -> list[str]:
    """``astolfo-opt merge --average FILES --out OUT`` (the uniform merge of N files)."""
    argv = ["merge", "--average", *map(str, files), "--out", str(out), "--no-progress"]
    if nan_policy:
        argv += ["--nan-policy", nan_policy]
    return argv


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def test_merge_average_refuses_each_hostile_file(corpus):
    """``merge --average good.safetensors HOSTILE``: refused, and the output folder stays empty (no temp files)."""
    root = corpus["root"]
    jobs, outs = [], {}
    for case, h in corpus["files"].items():
        outs[case] = root / "merge_out" / case
        outs[case].mkdir(parents=True, exist_ok=True)
        jobs.append({"id": case, "argv": merge_argv([corpus["valid"], h.path], outs[case] / "merged.safetensors")})
    res = run_driver(jobs, root)
    for case, h in corpus["files"].items():
        assert_refusal(res[case], h.path, h.expect, "merge")
        assert _leftovers(outs[case]) == [], f"merge left files behind for {case}: {_leftovers(outs[case])}"
    assert not corpus["marker"].exists()


@pytest.mark.slow
def test_entry_point_refuses_in_real_processes(corpus):
    """A few cases through ``python -m astolfo_opt.cli`` itself: exit 2, one line, no traceback, bounded time."""
    root = corpus["root"]
    cases = ["evil_system", "control_chars"]  # the rest of the matrix runs in the driver above
    out_dir = root / "entry_out"
    out_dir.mkdir(exist_ok=True)
    calls = []
    for case in cases:
        h = corpus["files"][case]
        calls.append((case, "inspect", ["inspect", str(h.path)]))
        calls.append((case, "merge", merge_argv([corpus["valid"], h.path], out_dir / f"{case}.safetensors")))

    def run(call):
        return subprocess.run([sys.executable, "-m", "astolfo_opt.cli", *call[2]], capture_output=True, text=True,
                              timeout=120, cwd=root, env=_env(root))

    with ThreadPoolExecutor(2) as ex:
        procs = list(ex.map(run, calls))
    for (case, what, _), p in zip(calls, procs, strict=True):
        h = corpus["files"][case]
        assert p.returncode == 2, (case, what, p.returncode, p.stderr[-2000:])
        assert_refusal({"rc": p.returncode, "stdout": p.stdout, "stderr": p.stderr}, h.path, h.expect, what)
    assert _leftovers(out_dir) == []
    assert not corpus["marker"].exists()


@pytest.mark.slow
def test_merge_refuses_mixed_architectures_and_nan_by_default(corpus, tmp_path):
    root = corpus["root"]
    mixed = hostile.write_mixed_pool(tmp_path / "mixed")
    nan = hostile.write_non_finite(tmp_path / "nan_model.safetensors", "nan")
    inf = hostile.write_non_finite(tmp_path / "inf_model.safetensors", "inf", seed=78)
    out = tmp_path / "out"
    out.mkdir()
    jobs = [
        {"id": "mixed", "argv": merge_argv(mixed, out / "mixed.safetensors")},
        {"id": "nan_error", "argv": merge_argv([corpus["valid"], nan], out / "nan.safetensors", "error")},
        {"id": "inf_default", "argv": merge_argv([corpus["valid"], inf], out / "inf.safetensors")},
        {"id": "nan_drop", "argv": merge_argv([corpus["valid"], nan], out / "dropped.safetensors", "drop_model")},
    ]
    res = run_driver(jobs, root)
    line = assert_refusal(res["mixed"], mixed[1], ("sdxl", "architecture", "mix"), "merge mixed pool")
    assert "sd1" in line.lower() or mixed[0].name in line, line
    for job, path in (("nan_error", nan), ("inf_default", inf)):
        line = assert_refusal(res[job], path, ("nan", "inf", "non-finite"), f"merge {job}")
        assert hostile.NON_FINITE_KEY in line, f"the error must name the key: {line}"
    # drop_model: succeeds, warns naming model + key, output finite and equal to the healthy model there
    r = res["nan_drop"]
    assert r["rc"] == 0, r["stderr"][-2000:]
    assert "nan_model" in (r["stderr"] + r["stdout"]) and "Traceback" not in r["stderr"], r["stderr"]
    with open_checkpoint(out / "dropped.safetensors") as merged, open_checkpoint(corpus["valid"]) as good:
        for k in merged.keys():  # noqa: SIM118 - readers are not iterable
            t = merged.get(k)
            assert not t.is_floating_point() or bool(torch.isfinite(t).all()), k
        assert torch.equal(merged.get(hostile.NON_FINITE_KEY).float(), good.get(hostile.NON_FINITE_KEY).float())
    assert sorted(_leftovers(out)) == ["dropped.safetensors"]


# ---------------------------------------------------------------------------------------------------- search


def search_argv(files: list[Path], run_dir: Path, *extra: str) -> list[str]:
    """``astolfo-opt search pool.files=[...]`` with the synthetic evaluator (no renderer needed to reach the pool)."""
    listed = ",".join(f"'{p}'" for p in files)
    return ["search", f"pool.files=[{listed}]", "evaluator.kind=benchkit.evaluators.synthetic", f"run_dir={run_dir}", "progress=false",
            "artifacts=false", "n_trials=2", "study_name=hostile", *extra]


def test_search_cli_refuses_each_hostile_file(corpus):
    """``astolfo-opt search pool.files=[good, HOSTILE]``: one line naming the file, exit 2, no study created."""
    root = corpus["root"]
    cases = {c: h for c, h in corpus["files"].items() if c != "wrong_shape"}  # see test_search_pool_refuses_wrong_shapes
    run_dir = root / "search_run"  # shared: the valid model's facts are cached there once
    # hostile first: the pool scan stops there without re-hashing the valid model in every call
    jobs = [{"id": c, "argv": search_argv([h.path, corpus["valid"]], run_dir)} for c, h in cases.items()]
    res = run_driver(jobs, root)
    for case, h in cases.items():
        expect = (*h.expect, "not found") if case == "directory" else h.expect  # the pool check calls it a missing file
        assert_refusal(res[case], h.path, expect, "search")
    made = sorted(p.name for p in run_dir.rglob("*") if p.is_file() and "hydra" not in p.parts) if run_dir.exists() else []
    assert not [m for m in made if m.endswith((".db", ".log", ".safetensors")) or PARTIAL_MARK in m], made
    assert not corpus["marker"].exists()


def test_search_pool_refuses_each_hostile_file(corpus, tmp_path):
    """The search resolves its pool before the first trial: each hostile file stops it with one line naming it."""
    problems = []
    for case, h in corpus["files"].items():
        if case == "wrong_shape":
            continue  # its own test below
        try:
            resolve_pool({"files": [str(h.path), str(corpus["valid"])]}, cache_file=tmp_path / "facts.json")
        except AstolfoError as e:
            msg = str(e)
            if h.path.name not in msg and h.path.stem not in msg:
                problems.append(f"{case}: error does not name the file: {msg}")
            elif "\n" in msg or "\x1b" in msg:
                problems.append(f"{case}: error is not one clean line: {msg!r}")
            continue
        except Exception as e:  # noqa: BLE001 - any other exception is the bug we look for
            problems.append(f"{case}: {type(e).__name__} escaped instead of a one-line error: {str(e)[:200]}")
            continue
        problems.append(f"{case}: accepted into the pool ({h.description})")
    assert not corpus["marker"].exists()
    assert not problems, "\n".join(problems)


def test_search_pool_refuses_wrong_shapes(corpus, tmp_path):
    """A tiny SD1 file whose te0 holds a width-64 tensor (layout: 32) cannot be merged with its pool; the search
    must say so before the first trial, naming the file and the key, not fail inside a trial."""
    h = corpus["files"]["wrong_shape"]
    with pytest.raises(AstolfoError) as ei:
        resolve_pool({"files": [str(corpus["valid"]), str(h.path)]}, cache_file=tmp_path / "facts.json")
    assert h.path.stem in str(ei.value) and "shape" in str(ei.value).lower(), str(ei.value)


def test_search_pool_refuses_mixed_and_non_finite(corpus, tmp_path):
    mixed = hostile.write_mixed_pool(tmp_path / "mixed")
    with pytest.raises(AstolfoError, match="(?i)architecture|sdxl") as ei:
        resolve_pool({"files": [str(p) for p in mixed]}, cache_file=tmp_path / "c1.json")
    assert "mix_sd" in str(ei.value), f"the mixed-pool error must name the odd model(s) so the user can exclude them: {ei.value}"
    nan = hostile.write_non_finite(tmp_path / "nan_model.safetensors", "nan")
    with pytest.raises(AstolfoError, match="nan_model"):
        resolve_pool({"files": [str(corpus["valid"]), str(nan)]}, cache_file=tmp_path / "c2.json")
    pool = resolve_pool({"files": [str(corpus["valid"]), str(nan)], "nan_policy": "drop_model"}, cache_file=tmp_path / "c3.json")
    assert "nan_model" in pool.names


# ---------------------------------------------------------------------------------------------------- fuzz


def _valid_file_bytes() -> bytes:
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        p = save_safetensors(Path(d) / "v.safetensors", {
            "model.diffusion_model.a": torch.arange(6, dtype=torch.float32).reshape(2, 3),
            "model.diffusion_model.b": torch.ones(4, dtype=torch.float16),
            "model.diffusion_model.c": torch.zeros(0, 5, dtype=torch.bfloat16),
            "model.diffusion_model.d": torch.tensor(7, dtype=torch.int64),
        }, {"k": "v"})
        return p.read_bytes()


VALID = _valid_file_bytes()
(_N,) = struct.unpack("<Q", VALID[:8])
VALID_HEADER = json.loads(VALID[8 : 8 + _N])
ODD_VALUES = st.one_of(st.integers(-(2**65), 2**65), st.booleans(), st.none(), st.floats(allow_nan=True),
                       st.text(max_size=5), st.lists(st.integers(-3, 2**64), max_size=4))


@st.composite
def mutated_files(draw) -> tuple[bytes, int]:
    """A valid file with its header mutated structurally (fields, dtypes, shapes, offsets, lengths) or byte-wise."""
    hdr = json.loads(json.dumps(VALID_HEADER))
    keys = [k for k in hdr if k != "__metadata__"]
    for _ in range(draw(st.integers(1, 4))):
        k = draw(st.sampled_from(keys))
        op = draw(st.sampled_from(["dtype", "shape_dim", "shape", "offset", "offsets", "drop_field", "swap_offsets",
                                   "metadata", "extra_key", "entry"]))
        e = hdr[k]
        if not isinstance(e, dict):
            continue
        if op == "dtype":
            e["dtype"] = draw(st.one_of(st.sampled_from([*ST_DTYPES, "F128", "f32", "", "U4"]), ODD_VALUES))
        elif op == "shape_dim" and isinstance(e.get("shape"), list) and e["shape"]:
            e["shape"][draw(st.integers(0, len(e["shape"]) - 1))] = draw(st.one_of(st.integers(-2, 2**70), ODD_VALUES))
        elif op == "shape":
            e["shape"] = draw(st.one_of(st.lists(st.integers(0, 2**66), max_size=4), ODD_VALUES))
        elif op == "offset" and isinstance(e.get("data_offsets"), list) and len(e["data_offsets"]) == 2:
            e["data_offsets"][draw(st.integers(0, 1))] = draw(st.one_of(st.integers(-(2**64), 2**64), ODD_VALUES))
        elif op == "offsets":
            e["data_offsets"] = draw(ODD_VALUES)
        elif op == "drop_field":
            e.pop(draw(st.sampled_from(["dtype", "shape", "data_offsets"])), None)
        elif op == "swap_offsets":
            other = hdr[draw(st.sampled_from(keys))]
            if isinstance(other, dict):
                e["data_offsets"], other["data_offsets"] = other.get("data_offsets"), e.get("data_offsets")
        elif op == "metadata":
            hdr["__metadata__"] = draw(st.one_of(ODD_VALUES, st.dictionaries(st.text(max_size=3), ODD_VALUES, max_size=2)))
        elif op == "extra_key":
            e[draw(st.text(max_size=4))] = draw(ODD_VALUES)
        else:
            hdr[k] = draw(ODD_VALUES)
    raw = json.dumps(hdr).encode()
    data = VALID[8 + _N :]
    if draw(st.booleans()):  # byte-level damage to the JSON text
        raw = bytearray(raw)
        for _ in range(draw(st.integers(1, 3))):
            raw[draw(st.integers(0, len(raw) - 1))] = draw(st.integers(0, 255))
        raw = bytes(raw)
    n = len(raw) + draw(st.sampled_from([0, 0, 0, -1, 1, 8, 2**32, 2**63]))
    data = data[: draw(st.integers(0, len(data)))] if draw(st.booleans()) else data
    blob = struct.pack("<Q", n % 2**64) + raw + data
    return blob, len(blob)


def _check_consistent(entries: dict, data_start: int, size: int) -> None:
    """What an accepted header promises: every tensor fits the data section, matches its shape, no overlaps."""
    spans = []
    for k, e in entries.items():
        if k == "__metadata__":
            assert all(isinstance(a, str) and isinstance(b, str) for a, b in e.items())
            continue
        begin, end = e["data_offsets"]
        n = dtype_size(ST_DTYPES[e["dtype"]])
        for s in e["shape"]:
            n *= s
        assert 0 <= begin <= end <= size - data_start and end - begin == n, (k, e)
        if end > begin:
            spans.append((begin, end))
    spans.sort()
    assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:], strict=False)), spans


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated_files())
def test_fuzz_mutated_headers(tmp_path_factory, blob_size):
    """Mutations of a valid header: only ever a CheckpointError; whatever is accepted is self-consistent and every
    tensor of it can actually be read."""
    blob, size = blob_size
    try:
        entries, data_start = parse_safetensors_header(blob, size)
    except CheckpointError as e:
        assert "\n" not in str(e).split(": ", 1)[0]
        return
    _check_consistent(entries, data_start, size)
    path = tmp_path_factory.mktemp("fz") / "f.safetensors"
    path.write_bytes(blob)
    with open_checkpoint(path) as r:
        for k in r.keys():  # noqa: SIM118 - readers are not iterable
            t = r.get(k)
            assert tuple(t.shape) == r.info(k).shape


def test_header_parser_survives_deep_nesting_and_huge_empty_dims():
    """Two inputs the fuzzer rarely builds: 200k-deep JSON (RecursionError) and a zero-size tensor whose other dim
    does not fit torch's int64 strides."""
    deep = b"[" * 200_000 + b"]" * 200_000
    with pytest.raises(CheckpointError, match="not JSON"):
        parse_safetensors_header(struct.pack("<Q", len(deep)) + deep, 8 + len(deep))
    hdr = json.dumps({"a": {"dtype": "F32", "shape": [0, 2**70], "data_offsets": [0, 0]}}).encode()
    with pytest.raises(CheckpointError, match="bad shape"):
        parse_safetensors_header(struct.pack("<Q", len(hdr)) + hdr, 8 + len(hdr))
    hdr = json.dumps({"a": {"dtype": "F32", "shape": [0, 2**40, 2**40], "data_offsets": [0, 0]}}).encode()
    with pytest.raises(CheckpointError, match="bad shape"):
        parse_safetensors_header(struct.pack("<Q", len(hdr)) + hdr, 8 + len(hdr))

