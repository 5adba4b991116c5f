"""Several workers on one storage (SQLite and journal) and resume after a SIGKILL, with the synthetic evaluator."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from astolfo_opt.search.app import run_search
from astolfo_opt.search.study import open_storage_url
from astolfo_opt.testing.factory import make_pool

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def pool_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("workers_pool")
    make_pool(d, n=4)
    return d


def cfg_for(pool_dir: Path, run_dir: Path, **over) -> dict:
    cfg = {"study_name": "s", "run_dir": str(run_dir), "n_trials": 12, "seed": 0, "progress": False, "artifacts": False,
           "pool": {"folder": str(pool_dir), "base": "base"}, "space": {"kind": "inclusion_mbw", "mbw": {"components": ["unet"]}},
           "evaluator": {"kind": "benchkit.evaluators.synthetic", "n_steps": 4, "noise": 0.02},
           "sampler": {"name": "tpe", "n_startup_trials": 4},
           "pruner": {"name": "none"}, "storage": {"kind": "rdb"}, "strategy": {"name": "optuna"}}
    for k, v in over.items():
        cfg[k] = {**cfg[k], **v} if isinstance(v, dict) and isinstance(cfg.get(k), dict) else v
    return cfg


def load(run_dir: Path, name: str = "s", journal: bool = False) -> optuna.Study:
    url = f"journal:{run_dir / 'journal.log'}" if journal else f"sqlite:///{run_dir / 'study.db'}"
    return optuna.load_study(study_name=name, storage=open_storage_url(url))


WORKER = """
import json, sys
from astolfo_opt.search.app import run_search
run_search(json.loads(sys.argv[1]))
"""


def _spawn(cfg: dict) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", WORKER, json.dumps(cfg)], cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, env={**os.environ, "PYTHONUNBUFFERED": "1"})


@pytest.mark.parametrize("journal", [False, True], ids=["sqlite", "journal"])
def test_four_workers_share_total(pool_dir, tmp_path, journal):
    """4 worker processes started together on one SQLite file (retries on lock / table creation) or one journal file
    finish exactly n_trials counted trials: none lost, none duplicated, none left running."""
    storage = {"kind": "journal"} if journal else {"kind": "rdb"}
    cfg = cfg_for(pool_dir, tmp_path, n_trials=16, storage=storage, evaluator={"sleep": 0.05},
                  pruner={"name": "median", "n_startup_trials": 3}, reuse_duplicates=False)
    if journal:
        cfg["storage"] = {"kind": "journal"}
    procs = [_spawn(cfg) for _ in range(4)]
    for p in procs:
        _, err = p.communicate(timeout=240)
        assert p.returncode == 0, err.decode()[-2000:]
    study = load(tmp_path, journal=journal)
    trials = study.get_trials()
    counted = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    assert len(counted) == 16
    assert len({t.number for t in trials}) == len(trials)
    assert not [t for t in trials if t.state in (TrialState.RUNNING, TrialState.WAITING)]
    assert all(t.user_attrs.get("surplus") for t in trials if t.state == TrialState.FAIL)
    workers = {t.user_attrs["worker"]["pid"] for t in counted}
    assert len(workers) >= 3, f"the workers should share the trials, got {len(workers)} distinct"


def test_resume_after_sigkill(pool_dir, tmp_path):
    cfg = cfg_for(pool_dir, tmp_path, n_trials=8, evaluator={"sleep": 0.4}, sampler={"name": "random"})
    p = _spawn(cfg)
    url = f"sqlite:///{tmp_path / 'study.db'}"
    deadline = time.time() + 180
    before = None
    while time.time() < deadline:
        time.sleep(0.3)
        try:
            study = optuna.load_study(study_name="s", storage=url)
        except Exception:
            continue
        done = study.get_trials(states=(TrialState.COMPLETE,))
        running = study.get_trials(states=(TrialState.RUNNING,))
        if len(done) >= 2 and running and running[0].intermediate_values == {} and "heartbeat" in running[0].user_attrs:
            os.kill(p.pid, signal.SIGKILL)
            p.wait()
            before = {t.number: (t.values, t.params) for t in study.get_trials(states=(TrialState.COMPLETE,))}
            break
    assert before is not None, "the worker never reached a killable state"
    study = optuna.load_study(study_name="s", storage=url)
    killed = [t.number for t in study.get_trials(states=(TrialState.RUNNING,))]
    assert len(killed) == 1
    run_search(cfg_for(pool_dir, tmp_path, n_trials=8, sampler={"name": "random"}))
    study = optuna.load_study(study_name="s", storage=url)
    after = {t.number: t for t in study.trials}
    assert after[killed[0]].state == TrialState.FAIL and "worker died" in after[killed[0]].user_attrs["failed_reason"]
    for n, (values, params) in before.items():
        assert after[n].state == TrialState.COMPLETE and after[n].values == values and after[n].params == params
    assert len(study.get_trials(states=(TrialState.COMPLETE, TrialState.PRUNED))) == 8




def test_sqlite_waiting_trial_is_claimed_once(tmp_path, monkeypatch):
    """Two workers that pop the same enqueued (WAITING) trial at the same moment: exactly one may claim it.

    Optuna claims by reading the state ``FOR UPDATE`` and then writing RUNNING; SQLite ignores ``FOR UPDATE``, so
    without ``BEGIN IMMEDIATE`` both reads see WAITING and both claims succeed (the CI failure "Cannot tell a COMPLETE
    trial"). A barrier after the read forces that interleaving: with the fix the second worker is still waiting for
    the write lock, the barrier times out, and its claim then sees RUNNING."""
    import threading

    from optuna.storages._rdb import models

    from astolfo_opt.search.study import make_storage

    storages = [make_storage({"kind": "rdb"}, tmp_path)[0] for _ in range(2)]
    study = optuna.create_study(study_name="race", storage=storages[0])
    study.enqueue_trial({"x": 1.0})
    trial_id = study.get_trials(deepcopy=False)[0]._trial_id
    barrier = threading.Barrier(2, timeout=1.5)
    original = models.TrialModel.find_or_raise_by_id.__func__

    def read_then_wait(cls, tid, session, for_update=False):
        trial = original(cls, tid, session, for_update=for_update)
        if for_update and threading.current_thread().name.startswith("claim"):
            with contextlib.suppress(threading.BrokenBarrierError):  # the fix holds the other worker at BEGIN
                barrier.wait()
        return trial

    monkeypatch.setattr(models.TrialModel, "find_or_raise_by_id", classmethod(read_then_wait))
    claimed: list[bool] = []

    def claim(storage) -> None:
        claimed.append(storage.set_trial_state_values(trial_id, TrialState.RUNNING))

    threads = [threading.Thread(target=claim, args=(s,), name=f"claim{i}") for i, s in enumerate(storages)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert sorted(claimed) == [False, True]
