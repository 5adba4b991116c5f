"""``astolfo-opt dashboard``: optuna-dashboard on a study's storage, with its artifact store (image grids, recipes)."""

from __future__ import annotations

import argparse
from pathlib import Path

from astolfo_opt.errors import ConfigError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--storage", required=True, help="sqlite:///runs/<study>/study.db, any RDB URL, or journal:PATH")
    parser.add_argument("--artifacts", default=None, help="artifact folder (default: artifacts/ beside a sqlite/journal file)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--dry-run", action="store_true", help="print what would be served and exit")


def default_artifacts(storage: str) -> Path | None:
    """``runs/<study>/artifacts`` for ``sqlite:///runs/<study>/study.db`` or ``journal:runs/<study>/journal.log``."""
    for prefix in ("sqlite:///", "journal:"):
        if storage.startswith(prefix):
            return Path(storage[len(prefix):]).expanduser().parent / "artifacts"
    if storage.endswith((".db", ".log")):
        return Path(storage).expanduser().parent / "artifacts"
    return None


def server_args(args: argparse.Namespace) -> dict:
    """Keyword arguments for ``optuna_dashboard.run_server`` (separate so tests check them without serving)."""
    from optuna.artifacts import FileSystemArtifactStore

    from astolfo_opt.search.study import open_storage_url

    storage = open_storage_url(args.storage)
    art = Path(args.artifacts).expanduser() if args.artifacts else default_artifacts(args.storage)
    if args.artifacts and not art.is_dir():
        raise ConfigError(f"artifact folder not found: {art} (give --artifacts runs/<study>/artifacts)")
    store = FileSystemArtifactStore(str(art)) if art is not None and art.is_dir() else None
    return {"storage": storage, "host": args.host, "port": int(args.port), "artifact_store": store, "artifacts_dir": art}


def run(args: argparse.Namespace) -> int:
    kw = server_args(args)
    art = kw.pop("artifacts_dir")
    print(f"optuna-dashboard: storage {args.storage}, artifacts {art if kw['artifact_store'] else 'none'}, "
          f"http://{kw['host']}:{kw['port']}/")
    if args.dry_run:
        return 0
    import optuna_dashboard

    optuna_dashboard.run_server(kw["storage"], host=kw["host"], port=kw["port"], artifact_store=kw["artifact_store"])
    return 0
