"""Studies: storage, samplers, pruners, warm starts, crash recovery and the trial loop shared by all workers.

Storage (``storage`` group):
- ``kind: rdb`` + ``url`` - default ``sqlite:///runs/<study>/study.db``; any SQLAlchemy URL (PostgreSQL, MySQL) works
  the same. Optuna heartbeats (``heartbeat_interval`` / ``grace_period``) mark a killed worker's trial FAIL.
- ``kind: journal`` + ``path`` - an Optuna journal file (``JournalFileBackend``), safe for several workers on one
  machine or a shared file system without a database server.

Several workers: run the same command N times (or on N machines against one RDB URL): ``load_if_exists`` joins the
study. ``n_trials`` is a *total* over all workers: before each trial the loop counts COMPLETE + PRUNED + RUNNING +
WAITING trials and stops at ``n_trials``; a trial that two workers started in the same instant beyond the total is
detected inside the objective (``SurplusTrial``) and ends FAIL before evaluating anything (FAIL trials never count).

Resume / crash recovery: re-running the command continues the study. RUNNING trials of dead workers are marked FAIL
at start and before every trial: a worker on this host whose process is gone is dead at once; any other worker is
dead when its trial's ``heartbeat`` user attribute is older than ``grace_period``. RDB storages also use Optuna's own
heartbeat thread + ``fail_stale_trials``. Completed trials are never touched, and failed ones are not counted, so
the study refills to ``n_trials``.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import time
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState

from astolfo_opt.errors import ConfigError

log = logging.getLogger("astolfo_opt.search")
# group / heartbeat / QMC are stable enough for our use; the warnings would drown the progress output
warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)

SAMPLERS = ("tpe", "cmaes", "gp", "nsga2", "random", "qmc", "staged", "surrogate")
PRUNERS = ("none", "median", "successive_halving", "hyperband", "incumbent")


# ------------------------------------------------------------------------------------------------ storage
def make_storage(cfg: Mapping[str, Any], run_dir: Path) -> tuple[Any, str]:
    """``(storage, description)`` from the ``storage`` group."""
    kind = str(cfg.get("kind", "rdb"))
    if kind == "rdb":
        url = str(cfg.get("url") or f"sqlite:///{run_dir / 'study.db'}")
        if url.startswith("sqlite:///"):
            Path(url[len("sqlite:///"):]).expanduser().parent.mkdir(parents=True, exist_ok=True)
        hb = cfg.get("heartbeat_interval")
        kw: dict[str, Any] = {}
        if hb:
            kw = {"heartbeat_interval": int(hb), "grace_period": int(cfg.get("grace_period") or 4 * int(hb))}
        engine = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {}
        storage = None
        for attempt in range(5):  # workers started together race to create the tables: the loser retries
            try:
                with _creation_lock(url):
                    storage = optuna.storages.RDBStorage(url, engine_kwargs=engine or None, **kw)
                break
            except Exception as e:  # sqlalchemy raises many types for bad URLs / unreachable servers
                if attempt == 4 or "UNIQUE constraint" not in str(e) and "already exists" not in str(e):
                    raise ConfigError(f"cannot open storage {url}: {str(e).splitlines()[0]} (check storage.url)") from None
                time.sleep(0.2 * (attempt + 1))
        if url.startswith("sqlite"):
            _sqlite_setup(storage, wal=bool(cfg.get("sqlite_wal", True)))
        return storage, url
    if kind == "journal":
        from optuna.storages.journal import JournalFileBackend, JournalStorage

        path = Path(str(cfg.get("path") or run_dir / "journal.log")).expanduser()
        path.parent.mkdir(parents=True, exist_ok=True)
        return JournalStorage(JournalFileBackend(str(path))), f"journal:{path}"
    if kind == "memory":
        return optuna.storages.InMemoryStorage(), "memory"
    raise ConfigError(f"storage.kind={kind!r} is unknown; use rdb (sqlite / any SQLAlchemy URL), journal or memory")


@contextlib.contextmanager
def _creation_lock(url: str):
    """Serialise the first opening (table creation) of a SQLite file between local workers."""
    if not url.startswith("sqlite:///"):
        yield
        return
    import fcntl

    lock = Path(url[len("sqlite:///"):]).expanduser().with_suffix(".lock")
    with open(lock, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _sqlite_setup(storage: Any, *, wal: bool = True) -> None:
    """SQLite settings for every connection of every worker.

    - (``wal``) WAL journal + ``synchronous=NORMAL``: each Optuna write is its own transaction, and with the default rollback
      journal + full sync a trial's ~25 small writes cost over a second on slow disks. WAL stays crash-safe (a power
      cut may lose the last transactions, never corrupt the file) and lets readers (dashboard) run beside the writer.
    - ``BEGIN IMMEDIATE`` for every transaction: Optuna claims an enqueued (WAITING) trial by reading its state with
      ``SELECT ... FOR UPDATE`` and then writing RUNNING. SQLite ignores ``FOR UPDATE`` and pysqlite only opens the
      transaction at the UPDATE, so two workers could both read WAITING and both run the same trial (the second then
      dies on "Cannot tell a COMPLETE trial"). Taking the write lock at BEGIN makes read-then-write atomic; workers
      only wait for each other for the few milliseconds a storage call takes.
    """
    from sqlalchemy import event

    def on_connect(conn, _record) -> None:
        conn.isolation_level = None  # pysqlite must not emit its own (deferred, late) BEGIN
        if wal:
            cur = conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.close()

    def on_begin(conn) -> None:
        conn.exec_driver_sql("BEGIN IMMEDIATE")

    event.listen(storage.engine, "connect", on_connect)
    event.listen(storage.engine, "begin", on_begin)
    storage.engine.dispose()


def open_storage_url(url: str) -> Any:
    """Storage from a CLI string: ``sqlite:///x.db`` / any RDB URL, ``journal:PATH`` or a ``*.log`` journal file."""
    if url.startswith("journal:") or url.endswith((".log", ".journal")):
        from optuna.storages.journal import JournalFileBackend, JournalStorage

        p = Path(url.removeprefix("journal:")).expanduser()
        if not p.is_file():
            raise ConfigError(f"journal file not found: {p} (give --storage journal:/path/to/journal.log)")
        return JournalStorage(JournalFileBackend(str(p)))
    if url.startswith("sqlite:///"):
        p = Path(url[len("sqlite:///"):]).expanduser()
        if not p.is_file():
            raise ConfigError(f"study database not found: {p} (give --storage sqlite:///runs/<study>/study.db)")
    elif "://" not in url:
        p = Path(url).expanduser()
        if p.is_file():
            return optuna.storages.RDBStorage(f"sqlite:///{p}")
        raise ConfigError(f"--storage {url!r}: give an RDB URL (sqlite:///runs/<study>/study.db) or journal:/path/to/journal.log")
    return optuna.storages.RDBStorage(url)


# ------------------------------------------------------------------------------------------------ samplers / pruners
def constraint_of(trial: optuna.trial.FrozenTrial) -> list[float]:
    """Optuna constraints: > 0 means the sampled inclusion violated ``min_models`` (the recipe was repaired)."""
    return [float(trial.user_attrs.get("constraint", 0.0))]


def make_sampler(cfg: Mapping[str, Any], seed: int | None, *, multi: bool, constraints: bool, x0: dict | None = None):
    name = str(cfg.get("name", "tpe"))
    opts = {k: v for k, v in cfg.items() if k not in ("name",)}
    cf = constraint_of if constraints else None
    S = optuna.samplers
    if name == "tpe":
        return S.TPESampler(seed=seed, multivariate=bool(opts.get("multivariate", True)), group=bool(opts.get("group", True)),
                            n_startup_trials=int(opts.get("n_startup_trials", 10)), constant_liar=bool(opts.get("constant_liar", True)),
                            constraints_func=cf)
    if name == "cmaes":
        if multi:
            raise ConfigError("sampler=cmaes is single-objective; use sampler=nsga2 or sampler=tpe for multi-objective")
        return S.CmaEsSampler(seed=seed, n_startup_trials=int(opts.get("n_startup_trials", 1)), sigma0=opts.get("sigma0"),
                              with_margin=bool(opts.get("with_margin", True)), restart_strategy=opts.get("restart_strategy"), x0=x0)
    if name == "gp":
        return S.GPSampler(seed=seed, n_startup_trials=int(opts.get("n_startup_trials", 10)), constraints_func=cf,
                           deterministic_objective=bool(opts.get("deterministic_objective", False)))
    if name == "nsga2":
        return S.NSGAIISampler(seed=seed, population_size=int(opts.get("population_size", 20)), constraints_func=cf)
    if name == "random":
        return S.RandomSampler(seed=seed)
    if name == "staged":  # astolfo_opt.search.strategies (benchmark engineer): structure-aware coordinate search
        if multi:
            raise ConfigError("sampler=staged is single-objective; use sampler=nsga2 or sampler=tpe for multi-objective")
        from astolfo_opt.search.strategies import make_staged_sampler

        return make_staged_sampler(seed, **opts)
    if name == "surrogate":  # the default (conf/config.yaml) - astolfo_opt.search.surrogate: weight-space surrogate
        if multi:
            raise ConfigError("sampler=surrogate (the default) is single-objective; with scorer.multi=true set sampler=nsga2 "
                              "or sampler=tpe")
        from astolfo_opt.search.surrogate import make_surrogate_sampler

        return make_surrogate_sampler(seed, **opts)
    if name == "qmc":
        return S.QMCSampler(seed=seed, qmc_type=str(opts.get("qmc_type", "sobol")), scramble=True, warn_independent_sampling=False)
    raise ConfigError(f"sampler.name={name!r} is unknown; use one of {', '.join(SAMPLERS)}")


def make_pruner(cfg: Mapping[str, Any], *, multi: bool):
    name = str(cfg.get("name", "none"))
    if name not in PRUNERS:
        raise ConfigError(f"pruner.name={name!r} is unknown; use one of {', '.join(PRUNERS)}")
    if multi or name == "none":
        if multi and name != "none":
            log.warning("pruner %s disabled: Optuna does not prune multi-objective studies", name)
        return optuna.pruners.NopPruner()
    P = optuna.pruners
    if name == "incumbent":  # astolfo_opt.search.strategies: stop trials that cannot beat the best finished one
        from astolfo_opt.search.strategies import make_incumbent_pruner

        return make_incumbent_pruner(**{k: v for k, v in cfg.items() if k != "name"})
    if name == "median":
        return P.MedianPruner(n_startup_trials=int(cfg.get("n_startup_trials", 5)), n_warmup_steps=int(cfg.get("n_warmup_steps", 0)),
                              interval_steps=int(cfg.get("interval_steps", 1)), n_min_trials=int(cfg.get("n_min_trials", 1)))
    if name == "successive_halving":
        return P.SuccessiveHalvingPruner(min_resource=cfg.get("min_resource", "auto"), reduction_factor=int(cfg.get("reduction_factor", 4)),
                                         min_early_stopping_rate=int(cfg.get("min_early_stopping_rate", 0)))
    return P.HyperbandPruner(min_resource=int(cfg.get("min_resource", 1)), max_resource=cfg.get("max_resource", "auto"),
                             reduction_factor=int(cfg.get("reduction_factor", 3)))


# ------------------------------------------------------------------------------------------------ study
def open_study(name: str, storage: Any, directions: list[str], sampler=None, pruner=None,
               metric_names: list[str] | None = None) -> optuna.Study:
    """Create or join a study (``load_if_exists``); refuse a study whose directions differ. ``metric_names`` (the
    objective's names, aligned with ``directions``) label the values in optuna-dashboard, which otherwise shows
    "Objective 0"; they are written when missing or different."""
    try:
        study = optuna.create_study(study_name=name, storage=storage, directions=directions, sampler=sampler, pruner=pruner,
                                    load_if_exists=True)
    except ValueError as e:
        raise ConfigError(f"study {name!r}: {e} (use another study_name)") from None
    have = [d.name.lower() for d in study.directions]
    if have != [d.lower() for d in directions]:
        raise ConfigError(f"study {name!r} exists with directions {have}, this config wants {directions}; use another study_name")
    if metric_names is not None and study.metric_names != list(metric_names):
        if len(metric_names) != len(directions):
            raise ConfigError(f"study {name!r}: {len(metric_names)} objective names for {len(directions)} directions")
        with warnings.catch_warnings():  # set_metric_names is marked experimental by Optuna
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            study.set_metric_names(list(metric_names))
    return study


def _pid_alive(pid: int, started: float | None) -> bool:
    import psutil

    try:
        p = psutil.Process(pid)
        return started is None or abs(p.create_time() - float(started)) < 1.0
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return False


def fail_dead_trials(study: optuna.Study, grace_period: float = 300.0) -> list[int]:
    """Mark RUNNING trials of dead workers FAIL; returns their numbers. Works for every storage (see module doc)."""
    if isinstance(study._storage, optuna.storages.RDBStorage) and study._storage.get_heartbeat_interval():
        optuna.storages.fail_stale_trials(study)
    host, now, failed = socket.gethostname(), time.time(), []
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        w = t.user_attrs.get("worker") or {}
        hb = t.user_attrs.get("heartbeat")
        if w.get("host") == host:
            dead = not _pid_alive(int(w.get("pid", -1)), w.get("started"))
        else:
            last = hb if hb is not None else (t.datetime_start.timestamp() if t.datetime_start else now)
            dead = now - float(last) > grace_period
        if dead:
            try:
                study._storage.set_trial_user_attr(t._trial_id, "failed_reason", "worker died (killed or crashed) while running")
                study._storage.set_trial_state_values(t._trial_id, TrialState.FAIL)
            except Exception:  # another worker finished / failed it in between
                continue
            failed.append(t.number)
    if failed:
        log.warning("marked trials %s FAIL: their worker died mid-trial", failed)
    return failed


def counted(study: optuna.Study) -> int:
    """Trials that count towards ``n_trials`` (FAIL never does)."""
    from astolfo_opt.search.objective import COUNTED_STATES

    return len(study.get_trials(deepcopy=False, states=COUNTED_STATES))


def enqueue_warm_starts(study: optuna.Study, warm: list[dict[str, Any]], limit: int) -> int:
    """Enqueue the warm starts once per study (skipped when the same params already exist)."""
    n = 0
    for params in warm[: max(limit, 0)]:
        study.enqueue_trial(params, user_attrs={"warm_start": True}, skip_if_exists=True)
        n += 1
    return n


def run_trials(study: optuna.Study, objective, n_trials: int, *, grace_period: float = 300.0, callbacks=(),
               max_in_process: int | None = None) -> int:
    """Run trials until the study holds ``n_trials`` counted trials (all workers together). Returns trials run here."""
    from astolfo_opt.search.objective import SurplusTrial

    ran = 0
    while max_in_process is None or ran < max_in_process:
        fail_dead_trials(study, grace_period)
        if counted(study) >= n_trials and not study.get_trials(deepcopy=False, states=(TrialState.WAITING,)):
            break  # enqueued (WAITING) trials count towards the total, but still have to be run by someone
        study.optimize(objective, n_trials=1, catch=(SurplusTrial,), callbacks=list(callbacks), gc_after_trial=False,
                       show_progress_bar=False)
        ran += 1
    return ran
