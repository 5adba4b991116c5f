"""Code only tests and benchmarks use: stand-in evaluators and the weight-space oracles (kept out of the installed
``astolfo_opt`` package). Importable from the repository root (pytest and ``experiments/`` put it on the path)."""
