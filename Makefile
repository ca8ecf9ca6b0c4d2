# synrep: the README's two commands are `make demo` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
SYNREP := $(VENV)/bin/synrep
STAMP := $(VENV)/.synrep-installed

.PHONY: setup demo quick test test-fast bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml constraints-cpu.txt scripts/setup.sh
	bash scripts/setup.sh $(VENV)

demo: setup          ## the default end-to-end run on the embedded default (~10 min on 2 cores)
	$(SYNREP) run

quick: setup         ## the ~2-minute profile
	$(SYNREP) run --quick

test: setup          ## the whole test suite, slow end-to-end tests included (what CI runs)
	$(PY) -m pytest -q --durations=25

test-fast: setup     ## everything but the tests marked slow
	$(PY) -m pytest -q -m "not slow"

bench: setup         ## every benchmark, side by side, results in benchmarks/results/
	$(PY) benchmarks/run_all.py

clean:
	rm -rf runs .pytest_cache
