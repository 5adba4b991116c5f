# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
# Both install from requirements.lock (every package pinned, with hashes), so a fresh clone gets the set CI tested.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
LOCK := requirements.lock
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml $(LOCK) | sha1sum | cut -c1-12)
# pip constraint files configured on this machine (pip's global.constraint / PIP_CONSTRAINT): `make lock` honours them
# so that the lock installs where pip would refuse a newer release.
PIP_CONSTRAINTS := $(strip $(PIP_CONSTRAINT) $(shell $(PY) -m pip config list 2>/dev/null | sed -n "s/^global.constraint='\(.*\)'/\1/p"))
LATEST := .venv-latest

.PHONY: demo test lint venv clean bench lock test-latest gpu-check

$(STAMP): pyproject.toml $(LOCK)
	@test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --require-hashes -r $(LOCK)
	$(BIN)/python -m pip install -q --no-deps --no-build-isolation -e .
	@rm -f $(VENV)/.installed-* && touch $@

venv: $(STAMP)

demo: $(STAMP)
	$(BIN)/astolfo-opt demo

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check .

# Regenerate the lock from pyproject.toml's ranges (latest versions that satisfy them), then run `make test`.
lock: $(STAMP)
	$(BIN)/uv pip compile --quiet pyproject.toml --extra dev --universal --python-version 3.11 --generate-hashes \
		$(foreach c,$(PIP_CONSTRAINTS),--constraint $(c)) --custom-compile-command 'make lock' --upgrade -o $(LOCK)

# Drift check (not part of CI): the suite on today's unpinned latest, in its own venv.
test-latest:
	rm -rf $(LATEST) && $(PY) -m venv $(LATEST)
	$(LATEST)/bin/python -m pip install -q -e '.[dev]'
	$(LATEST)/bin/python -m pip freeze --exclude-editable > $(LATEST)/freeze.txt
	ASTOLFO_UNLOCKED=1 $(LATEST)/bin/ruff check .
	ASTOLFO_UNLOCKED=1 $(LATEST)/bin/python -m pytest -q

# One prepared script for CUDA machines (exits 0 with one line where there is no CUDA).
# On a machine with its own CUDA torch and no package registry (the lent GPU machine), `make gpu-check SYSTEM_PY=python3`
# skips the venv and runs that interpreter with the repository on PYTHONPATH; packages it lacks travel as wheels
# (README, "GPU figures"). GPU_ARGS passes options through, e.g. GPU_ARGS="--budget 330 --only cuda_tests".
ifdef SYSTEM_PY
gpu-check:
	PYTHONPATH=$(CURDIR)$${PYTHONPATH:+:$$PYTHONPATH} $(SYSTEM_PY) experiments/gpu_check.py --json experiments/results/gpu_check.json $(GPU_ARGS)
else
gpu-check: $(STAMP)
	$(BIN)/python experiments/gpu_check.py --json experiments/results/gpu_check.json $(GPU_ARGS)
endif

# The benchmarks behind the README's figures (CPU: ~30 min and ~25 GB of generated files under /tmp).
bench: $(STAMP)
	$(BIN)/python experiments/bench_inspect.py --json experiments/results/bench_inspect.json
	$(BIN)/python experiments/bench_merge.py --json experiments/results/bench_merge.json
	$(BIN)/python experiments/bench_swap.py --json experiments/results/bench_swap.json
	$(BIN)/python experiments/bench_trial.py --json experiments/results/bench_trial.json
	$(BIN)/python experiments/bench_search.py --seed 0,1,2,3,4 --models 12 --trials 60 --repeats 3 \
		--json experiments/results/bench_search.json --png experiments/results/bench_search.png

clean:
	rm -rf $(VENV) $(LATEST) runs outputs multirun .pytest_cache
