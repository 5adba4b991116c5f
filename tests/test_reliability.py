"""Crashes, full disks, memory bounds and concurrent workers: nothing lost, nothing half-written.

* kill -9 in the middle of ``astolfo-opt merge``: no file at the target name; the next run succeeds and removes the
  stale temp file (``clean_stale_partials`` at start).
* a full disk (a real 5 MiB tmpfs when we are root, else ``os.pwrite`` raising ENOSPC): one line, no file left.
* a pool several times larger than the memory a merge may use merges with bounded anonymous memory.
* two Optuna workers on one real PostgreSQL server: every trial finishes once, none lost or duplicated.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch

from astolfo_opt.checkpoint.io import open_checkpoint
from astolfo_opt.checkpoint.writer import PARTIAL_MARK, SafetensorsWriter, clean_stale_partials, save_safetensors
from astolfo_opt.errors import AstolfoError
from astolfo_opt.testing.factory import ModelSpec, make_checkpoint, make_pool

ROOT = Path(__file__).resolve().parents[1]


def _env(tmp: Path, **extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["ASTOLFO_OPT_CACHE"] = str(tmp / "cache")
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.update(extra)
    return env


def merge_argv(files: list[Path], out: Path) -> list[str]:
    return ["merge", "--average", *map(str, files), "--out", str(out), "--no-progress"]


def _partials(folder: Path) -> list[Path]:
    return sorted(folder.glob(f".*{PARTIAL_MARK}*"))


# A merge whose writer sleeps after every tensor, so a kill lands mid-file on any machine (test-only throttle that
# needs nothing from the merge code beyond using SafetensorsWriter, which the contracts require).
SLOW_MERGE = r"""
import sys, time
from astolfo_opt.checkpoint import writer
_write = writer.SafetensorsWriter.write
def slow(self, key, tensor):
    _write(self, key, tensor)
    time.sleep(0.004)
writer.SafetensorsWriter.write = slow
from astolfo_opt.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    folder = tmp_path_factory.mktemp("relpool")
    return make_pool(folder, n=3, arch="sd1", size="tiny")


@pytest.mark.slow
def test_kill_9_mid_merge_leaves_nothing_and_next_run_cleans_up(pool, tmp_path):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    target = out_dir / "merged.safetensors"
    argv = merge_argv(pool.all, target)
    _kill_mid_write(argv, out_dir, tmp_path)
    rerun = subprocess.run([sys.executable, "-m", "astolfo_opt.cli", *argv], cwd=tmp_path, env=_env(tmp_path),
                           capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert target.is_file()
    assert _partials(out_dir) == [], ("merge does not call writer.clean_stale_partials(output folder) at start: "
                                      f"stale temp files remain: {_partials(out_dir)}")
    with open_checkpoint(target) as r, open_checkpoint(pool.base) as b:
        assert set(b.keys()) <= set(r.keys())  # noqa: SIM118 - readers are not iterable


def _kill_mid_write(argv: list[str], out_dir: Path, cwd: Path) -> None:
    """Run ``astolfo-opt ARGV`` with a throttled writer, SIGKILL it once its temp file has grown, check nothing is
    at a target name."""
    proc = subprocess.Popen([sys.executable, "-c", SLOW_MERGE, *argv], cwd=cwd, env=_env(cwd),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 180
        while not _partials(out_dir) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        if not _partials(out_dir):
            err = proc.stderr.read().decode()[-2000:] if proc.poll() is not None else "timeout"
            pytest.fail(f"no {PARTIAL_MARK} temp file appeared in {out_dir} (rc {proc.poll()}): {err}")
        time.sleep(0.5)
        assert proc.poll() is None, "the command finished before it could be killed; the throttle did not apply"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert [p.name for p in out_dir.iterdir() if PARTIAL_MARK not in p.name] == [], "a killed run left a file at a target name"
    assert len(_partials(out_dir)) == 1


@pytest.mark.slow
def test_kill_9_mid_export_leaves_nothing_and_next_run_cleans_up(pool, tmp_path):
    from astolfo_opt.search.app import run_search

    run = tmp_path / "run"
    cfg = {"study_name": "s", "run_dir": str(run), "n_trials": 4, "seed": 0, "progress": False, "artifacts": False,
           "pool": {"folder": str(pool.folder), "base": "base"}, "space": {"kind": "inclusion"},
           "evaluator": {"kind": "benchkit.evaluators.synthetic", "n_steps": 1}, "sampler": {"name": "random"}, "pruner": {"name": "none"},
           "storage": {"kind": "rdb"}, "strategy": {"name": "optuna"}}
    run_search(cfg)
    out_dir = tmp_path / "export"
    out_dir.mkdir()
    target = out_dir / "best.safetensors"
    # --no-verify: the synthetic evaluator records no real tensor hashes to verify against
    argv = ["export", "--storage", f"sqlite:///{run / 'study.db'}", "--study", "s", "--out", str(target), "--no-verify"]
    _kill_mid_write(argv, out_dir, tmp_path)
    rerun = subprocess.run([sys.executable, "-m", "astolfo_opt.cli", *argv], cwd=tmp_path, env=_env(tmp_path),
                           capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert target.is_file()
    assert _partials(out_dir) == [], ("export does not call writer.clean_stale_partials(output folder) at start: "
                                      f"stale temp files remain: {_partials(out_dir)}")


# ---------------------------------------------------------------------------------------------------- disk full


@contextlib.contextmanager
def small_tmpfs(size: str = "5m"):
    """A real, tiny filesystem (root only); skips where mounting is not allowed."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    d = Path(tempfile.mkdtemp(prefix="astolfo-full-"))
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(d)], capture_output=True, text=True)
    if r.returncode != 0:
        d.rmdir()
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
    try:
        yield d
    finally:
        subprocess.run(["umount", str(d)], check=False)
        with contextlib.suppress(OSError):
            d.rmdir()


def test_writer_on_a_full_disk_leaves_nothing():
    with small_tmpfs() as d:
        with pytest.raises(AstolfoError, match="disk full") as ei:
            save_safetensors(d / "big.safetensors", {"x": torch.ones(3 * 1024 * 1024, dtype=torch.float32)})
        assert "\n" not in str(ei.value)
        assert list(d.iterdir()) == []


def test_writer_enospc_without_root(tmp_path, disk_fills_after):
    """Same promise on any machine: an ENOSPC from pwrite midway removes the temp file."""
    disk_fills_after(2)
    tensors = {f"k{i}": torch.full((256,), float(i)) for i in range(5)}
    with pytest.raises(AstolfoError, match="disk full"):
        save_safetensors(tmp_path / "x.safetensors", tensors)
    assert list(tmp_path.iterdir()) == []


def test_merge_on_a_full_disk_is_one_line_and_leaves_nothing(pool, tmp_path):
    with small_tmpfs() as d:
        target = d / "merged.safetensors"
        r = subprocess.run([sys.executable, "-m", "astolfo_opt.cli", *merge_argv(pool.all[:2], target)], cwd=tmp_path,
                           env=_env(tmp_path), capture_output=True, text=True, timeout=300)
        assert r.returncode == 2, r.stderr[-2000:]
        assert "Traceback" not in r.stderr
        lines = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
        assert len(lines) == 1 and "disk full" in lines[0].lower() and target.name in lines[0], r.stderr
        assert list(d.iterdir()) == [], list(d.iterdir())


def test_clean_stale_partials_keeps_live_writers(tmp_path):
    """The cleanup must not delete the temp file of a writer that is still running (another worker)."""
    live = SafetensorsWriter(tmp_path / "a.safetensors", [("x", torch.float32, (2,))])
    dead = tmp_path / f".b.safetensors{PARTIAL_MARK}{_dead_pid()}-abcd"
    dead.write_bytes(b"x")
    removed = clean_stale_partials(tmp_path)
    assert removed == [dead] and live._tmp.exists()
    live.write("x", torch.zeros(2))
    live.commit()
    assert (tmp_path / "a.safetensors").is_file() and _partials(tmp_path) == []


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


# ---------------------------------------------------------------------------------------------------- memory

# Samples anonymous RSS (heap, not the file pages an mmap reader maps, which the kernel can drop) while a merge runs.
MEASURE = r"""
import json, sys, threading, time
import torch
from astolfo_opt.cli import main
import astolfo_opt.merge, astolfo_opt.commands.merge  # imports paid before the baseline
def anon():
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
base = anon(); peak = [base]; stop = threading.Event()
def sample():
    while not stop.is_set():
        peak[0] = max(peak[0], anon()); time.sleep(0.002)
t = threading.Thread(target=sample, daemon=True); t.start()
rc = main(sys.argv[1:])
stop.set(); t.join()
peak[0] = max(peak[0], anon())
import resource
print(json.dumps({"rc": rc, "base": base, "peak": peak[0], "maxrss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
"""


@pytest.mark.slow
def test_merge_of_a_large_pool_stays_in_bounded_memory(tmp_path):
    """6 fp32 tiny models (~370 MB on disk): the merge's heap growth stays far below the pool's size."""
    models = [make_checkpoint(tmp_path / f"big{i}.safetensors", ModelSpec(arch="sd1", size="tiny", seed=40 + i, dtype="fp32"))
              for i in range(6)]
    total = sum(p.stat().st_size for p in models)
    with open_checkpoint(models[0]) as r:
        largest = max(r.info(k).nbytes for k in r.keys())  # noqa: SIM118 - readers are not iterable
    out = tmp_path / "out" / "merged.safetensors"
    r = subprocess.run([sys.executable, "-c", MEASURE, *merge_argv(models, out)], cwd=tmp_path, env=_env(tmp_path),
                       capture_output=True, text=True, timeout=400)
    assert r.returncode == 0, r.stderr[-3000:]
    m = json.loads(r.stdout.strip().splitlines()[-1])
    assert m["rc"] == 0 and out.is_file()
    growth = m["peak"] - m["base"]
    bound = 3 * largest + 96 * 2**20
    print(f"pool {total / 2**20:.0f} MiB, largest tensor {largest / 2**20:.1f} MiB, heap growth {growth / 2**20:.0f} MiB, "
          f"bound {bound / 2**20:.0f} MiB, ru_maxrss {m['maxrss'] / 2**20:.0f} MiB")
    assert bound < total / 3  # the bound means something: well below the pool
    assert growth < bound, f"merge heap grew by {growth / 2**20:.0f} MiB for a {total / 2**20:.0f} MiB pool"


CAPPED = r"""
import resource, sys
cap = int(sys.argv[1])
resource.setrlimit(resource.RLIMIT_AS, (cap, cap))  # address space: every heap / thread / mapping counts
from astolfo_opt.cli import main
sys.exit(main(sys.argv[2:]))
"""


@pytest.mark.slow
def test_full_size_pool_larger_than_the_memory_cap_merges(tmp_path):
    """Three full-size SD1 fp16 files (6.4 GB) merged by a process whose whole address space is capped at 4 GiB
    (``RLIMIT_AS``; the torch import alone takes ~2 GiB of it): the pool does not fit, the merge still completes and
    the output is a valid full-size checkpoint. Files are read with pread, never mapped, so only a few tensors in
    flight count against the cap."""
    free = shutil.disk_usage(tmp_path).free
    if free < 12 * 2**30:
        pytest.skip(f"needs ~12 GiB free disk for three full-size files and the output ({free / 2**30:.1f} GiB free)")
    out = tmp_path / "out" / "merged.safetensors"
    models = [tmp_path / f"full{i}.safetensors" for i in range(3)]
    try:
        for i, m in enumerate(models):
            make_checkpoint(m, ModelSpec(arch="sd1", size="full", seed=70 + i))
        total = sum(p.stat().st_size for p in models)
        cap = 4 * 2**30
        assert total > 1.4 * cap  # the cap means something: the pool (and not even half of it beside torch) cannot be held
        r = subprocess.run([sys.executable, "-c", CAPPED, str(cap), *merge_argv(models, out)], cwd=tmp_path, env=_env(tmp_path),
                           capture_output=True, text=True, timeout=900)
        assert r.returncode == 0, r.stderr[-3000:]
        key = "model.diffusion_model.middle_block.1.proj_in.weight"
        want = torch.zeros(())
        for m in models:
            with open_checkpoint(m) as r:
                want = want + r.get(key).double() / 3
        with open_checkpoint(out) as merged, open_checkpoint(models[0]) as first:
            assert set(merged.keys()) == set(first.keys())
            assert torch.allclose(merged.get(key).double(), want, atol=2e-3)
    finally:  # 8 GB: never left on a shared disk, pass or fail (pytest keeps a failed test's folder)
        for p in (*models, out):
            p.unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------------------- PostgreSQL


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def postgres_url():
    """A throwaway PostgreSQL 127.0.0.1 server run as the ``postgres`` user; stopped in ``finally``."""
    pg_bin = next((Path(d) for d in ("/usr/local/bin", "/usr/lib/postgresql/15/bin") if (Path(d) / "initdb").exists()), None)
    if pg_bin is None or not (pg_bin / "pg_ctl").exists():
        pytest.skip("PostgreSQL binaries (initdb, pg_ctl) are not installed")
    try:
        import psycopg2  # noqa: F401
    except ImportError:
        pytest.skip("psycopg2 is not importable (pip install psycopg2-binary; it is in the dev extra)")
    if os.geteuid() != 0 or shutil.which("runuser") is None:
        pytest.skip("PostgreSQL refuses to run as root and we cannot switch user (need root + runuser)")
    try:
        import pwd

        pw = pwd.getpwnam("postgres")
    except KeyError:
        pytest.skip("no 'postgres' system user to run the server as")
    root = Path(tempfile.mkdtemp(prefix="astolfo-pg-"))
    root.chmod(0o755)
    data, sock = root / "data", root / "sock"
    os.chown(root, pw.pw_uid, pw.pw_gid)  # the server writes its log beside the data dir
    for d in (data, sock):
        d.mkdir()
        os.chown(d, pw.pw_uid, pw.pw_gid)
    port = _free_port()
    as_pg = ["runuser", "-u", "postgres", "--"]
    started = False
    try:
        r = subprocess.run([*as_pg, str(pg_bin / "initdb"), "-D", str(data), "-A", "trust", "-U", "postgres", "--no-sync"],
                           capture_output=True, text=True, timeout=120)
        if r.returncode != 0:
            pytest.skip(f"initdb failed: {r.stderr.strip()[-300:]}")
        opts = f"-h 127.0.0.1 -p {port} -k {sock} -F -c max_connections=50"
        r = subprocess.run([*as_pg, str(pg_bin / "pg_ctl"), "-D", str(data), "-o", opts, "-l", str(root / "log"), "-w", "start"],
                           capture_output=True, text=True, timeout=120)
        if r.returncode != 0:
            log = (root / "log").read_text()[-500:] if (root / "log").exists() else ""
            pytest.skip(f"PostgreSQL did not start: {r.stderr.strip()[-300:]} {log}")
        started = True
        yield f"postgresql+psycopg2://postgres@127.0.0.1:{port}/postgres"
    finally:
        if started:
            subprocess.run([*as_pg, str(pg_bin / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop"],
                           capture_output=True, timeout=120)
        shutil.rmtree(root, ignore_errors=True)


# Plain Optuna worker: the storage layer the search uses, hammered by two processes.
OPTUNA_WORKER = r"""
import json, os, sys, time
import optuna
optuna.logging.set_verbosity(optuna.logging.WARNING)
url, name, n, log = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
study = optuna.create_study(study_name=name, storage=url, load_if_exists=True)
def objective(trial):
    x = trial.suggest_float("x", -1, 1)
    with open(log, "a") as f:
        f.write(json.dumps({"pid": os.getpid(), "number": trial.number, "id": trial._trial_id}) + "\n")
    time.sleep(0.01)
    return x * x
study.optimize(objective, n_trials=n)
"""


def test_two_optuna_workers_on_postgres_lose_and_duplicate_nothing(postgres_url, tmp_path):
    import optuna

    name, per_worker = "astolfo-concurrency", 12
    optuna.create_study(study_name=name, storage=postgres_url)  # created once, so neither worker races on creation
    logs = [tmp_path / f"w{i}.jsonl" for i in range(2)]
    procs = [subprocess.Popen([sys.executable, "-c", OPTUNA_WORKER, postgres_url, name, str(per_worker), str(log)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=_env(tmp_path)) for log in logs]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err.decode()[-3000:]
    runs = [json.loads(line) for log in logs for line in log.read_text().splitlines()]
    assert len({r["pid"] for r in runs}) == 2
    study = optuna.load_study(study_name=name, storage=postgres_url)
    trials = study.get_trials(deepcopy=False)
    numbers = sorted(t.number for t in trials)
    assert numbers == list(range(2 * per_worker)), numbers  # none lost, none duplicated
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in trials)
    assert sorted(r["number"] for r in runs) == numbers  # each trial ran exactly once, in one worker
    for t in trials:
        assert t.value == pytest.approx(t.params["x"] ** 2)




@pytest.mark.slow
def test_two_search_workers_on_postgres_share_the_study(postgres_url, pool, tmp_path):
    """Two ``astolfo-opt search`` processes started together on one PostgreSQL study: exactly ``n_trials`` counted
    trials, unique numbers, nothing left RUNNING, both workers contributed."""
    import optuna
    from optuna.trial import TrialState

    n = 10
    argv = ["search", f"pool.folder={pool.folder}", "pool.base=base", "storage=rdb", f"storage.url='{postgres_url}'",
            "study_name=pg_workers", f"run_dir={tmp_path / 'run'}", f"n_trials={n}", "evaluator.kind=benchkit.evaluators.synthetic",
            "+evaluator.sleep=0.05", "progress=false", "artifacts=false", "reuse_duplicates=false", "pruner=none"]
    procs = [subprocess.Popen([sys.executable, "-m", "astolfo_opt.cli", *argv], cwd=tmp_path, env=_env(tmp_path),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(2)]
    errs = []
    for p in procs:
        try:
            _, err = p.communicate(timeout=400)
        finally:
            if p.poll() is None:
                p.kill()
        errs.append(err.decode())
        assert p.returncode == 0, err.decode()[-3000:]
    trials = optuna.load_study(study_name="pg_workers", storage=postgres_url).get_trials(deepcopy=False)
    counted = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    assert len(counted) == n, [(t.number, t.state) for t in trials]
    assert len({t.number for t in trials}) == len(trials)
    assert not [t for t in trials if t.state in (TrialState.RUNNING, TrialState.WAITING)]
    assert all(t.user_attrs.get("surplus") for t in trials if t.state == TrialState.FAIL), errs
    assert len({t.user_attrs["worker"]["pid"] for t in counted}) == 2, "both workers should have run trials"


def test_enqueued_warm_starts_are_never_left_waiting(pool, tmp_path):
    """``n_trials`` no larger than the warm starts: the enqueued trials must still run, not sit WAITING forever
    (they count towards the total, so a loop that stops at the total before popping them loses them)."""
    import optuna
    from optuna.trial import TrialState

    from astolfo_opt.search.app import run_search

    run = tmp_path / "run"
    cfg = {"study_name": "w", "run_dir": str(run), "n_trials": 2, "seed": 0, "progress": False, "artifacts": False,
           "warm_start": True, "pool": {"folder": str(pool.folder), "base": "base"}, "space": {"kind": "inclusion"},
           "evaluator": {"kind": "benchkit.evaluators.synthetic", "n_steps": 1}, "sampler": {"name": "random"}, "pruner": {"name": "none"},
           "storage": {"kind": "rdb"}, "strategy": {"name": "optuna"}}
    run_search(cfg)
    trials = optuna.load_study(study_name="w", storage=f"sqlite:///{run / 'study.db'}").get_trials(deepcopy=False)
    states = sorted(t.state.name for t in trials)
    assert states == ["COMPLETE", "COMPLETE"], f"n_trials=2 with 2 warm starts left {states}"
    assert not [t for t in trials if t.state == TrialState.WAITING]
