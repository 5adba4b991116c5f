"""``astolfo-opt search [overrides] [-m sweeps]``: the Hydra app over ``conf/``.

Hydra owns the argument parsing, so every option of ``conf/config.yaml`` and its groups is an override
(``pool.folder=/models space=pairwise_mbw sampler=cmaes n_trials=200``), ``-m`` runs sweeps
(``-m sampler=tpe,cmaes seed=0,1,2 'study_name=cmp_${sampler.name}_s${seed}'``) and ``--cfg job`` prints the
composed config.

Config location: the repository's top-level ``conf/`` resolved from this package's location (works for the source
tree and editable installs, which is how the project is installed: ``make`` runs ``pip install -e``). Set
``ASTOLFO_OPT_CONF=/path/to/conf`` to use another tree (e.g. a non-editable install), or add a directory of your own
groups with Hydra's ``--config-dir``.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from astolfo_opt.errors import AstolfoError, ConfigError


def conf_dir() -> Path:
    """Absolute path of the Hydra config tree (``$ASTOLFO_OPT_CONF`` or the repo's ``conf/``)."""
    env = os.environ.get("ASTOLFO_OPT_CONF")
    d = Path(env).expanduser().resolve() if env else Path(__file__).resolve().parents[2] / "conf"
    if not (d / "config.yaml").is_file():
        raise ConfigError(f"Hydra config tree not found at {d} (install with `pip install -e .` from the repo, "
                          "or set ASTOLFO_OPT_CONF=/path/to/astolfo-opt/conf)")
    return d


_STATUS = {"rc": 0}


def _task(cfg) -> None:
    """The Hydra task: errors for users become one line and exit status 2 (Hydra would print a traceback)."""
    from astolfo_opt.search.app import run_search

    try:
        res = run_search(cfg)
    except AstolfoError as e:
        print(f"error: {e}", file=sys.stderr)
        _STATUS["rc"] = 2
        return
    for line in res.lines():
        print(line)
    arts = res.run_dir / "artifacts"
    print(f"dashboard: astolfo-opt dashboard --storage {res.storage}" + (f" --artifacts {arts}" if arts.is_dir() else ""))
    print(f"export:    astolfo-opt export --storage {res.storage} --study {res.study_name} --out {res.run_dir / 'best.safetensors'}")


def run_passthrough(argv: list[str]) -> int:
    """Run the Hydra app with ``argv`` as its command line; returns the exit status."""
    import hydra

    main = hydra.main(version_base="1.3", config_path=str(conf_dir()), config_name="config")(_task)
    saved = sys.argv
    sys.argv = ["astolfo-opt search", *argv]
    _STATUS["rc"] = 0
    try:
        main()
    except SystemExit as e:  # Hydra exits on bad overrides / --help
        return int(e.code or 0) if not isinstance(e.code, str) else 2
    finally:
        sys.argv = saved
    return _STATUS["rc"]
