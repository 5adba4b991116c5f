"""The one ``astolfo-opt`` command. Each subcommand lives in ``astolfo_opt.commands.<name>`` and is imported only
when used, so ``astolfo-opt inspect`` does not pay for diffusers / open_clip imports.

A subcommand module defines ``add_arguments(parser)`` and ``run(args) -> int``. Errors meant for users
(:class:`~astolfo_opt.errors.AstolfoError`) print as one ``error: ...`` line with exit status 2, never a traceback.
``search`` hands its arguments to Hydra untouched (overrides, ``-m`` sweeps).
"""

from __future__ import annotations

import argparse
import importlib
import sys

from astolfo_opt import __version__
from astolfo_opt.errors import AstolfoError

SUBCOMMANDS: dict[str, str] = {
    "inspect": "Inspect checkpoints or pools: architecture, hashes, health, identical components, weight-space maps.",
    "merge": "Merge checkpoints from a recipe (or --average N files) into a .safetensors file, streaming.",
    "render": "Render a prompt set with a checkpoint to PNGs and a labelled grid.",
    "search": "Run an Optuna study (Hydra app: overrides and -m sweeps are passed through).",
    "export": "Export a study's best (or any) trial as an A1111-layout .safetensors with provenance.",
    "dashboard": "Start optuna-dashboard on a study's storage with its artifact store (image grids).",
    "review": "Mark the worst of a few grids in optuna-dashboard; the answers calibrate the objective.",
    "demo": "Run the embedded demo: build the tiny trained world, search it, export and judge the best merge.",
    "world": "The tiny trained world: build it, check its properties, judge renders with its held-out judge.",
}
PASSTHROUGH = {"search"}  # Hydra owns the argument parsing


def _load(name: str):
    return importlib.import_module(f"astolfo_opt.commands.{name}")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="astolfo-opt", description="Automatic Stable Diffusion merge search.")
    parser.add_argument("--version", action="version", version=f"astolfo-opt {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, help_text in SUBCOMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=name not in PASSTHROUGH)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in SUBCOMMANDS:
        if argv and argv[0] not in ("-h", "--help", "--version"):
            parser.error(f"unknown command {argv[0]!r}")
        parser.parse_args(argv or ["--help"])
        return 0
    name = argv[0]
    try:
        module = _load(name)
        if name in PASSTHROUGH:
            return int(module.run_passthrough(argv[1:]) or 0)
        cmd_parser = argparse.ArgumentParser(prog=f"astolfo-opt {name}", description=SUBCOMMANDS[name])
        module.add_arguments(cmd_parser)
        args = cmd_parser.parse_args(argv[1:])
        return int(module.run(args) or 0)
    except AstolfoError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
