# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | sha1sum | cut -c1-12)

.PHONY: demo test lint venv clean bench

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	@rm -f $(VENV)/.installed-* && touch $@

venv: $(STAMP)

demo: $(STAMP)
	$(BIN)/astolfo-opt demo

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check .

# The benchmarks behind the README's figures (CPU: ~30 min and ~25 GB of generated files under /tmp).
bench: $(STAMP)
	$(BIN)/python experiments/bench_inspect.py --json experiments/results/bench_inspect.json
	$(BIN)/python experiments/bench_merge.py --json experiments/results/bench_merge.json
	$(BIN)/python experiments/bench_swap.py --json experiments/results/bench_swap.json
	$(BIN)/python experiments/bench_trial.py --json experiments/results/bench_trial.json
	$(BIN)/python experiments/bench_search.py --seed 0,1,2,3,4 --models 12 --trials 60 --repeats 3 \
		--json experiments/results/bench_search.json --png experiments/results/bench_search.png

clean:
	rm -rf $(VENV) runs outputs multirun .pytest_cache
