# The README's commands. Each sets up everything it needs on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
RUN ?= runs/quickstart

export RAY_USAGE_STATS_ENABLED := 0
# Ray's token authentication stays on for the demo and benchmarks; the tests switch it off for themselves
# (tests/conftest.py), on a Ray that binds to 127.0.0.1 only.

.PHONY: demo test test-all setup data bench clean

demo: setup data
	$(VENV)/bin/raydistill distill --preset quickstart --out $(RUN)-$$(date +%Y%m%d-%H%M%S)

# The fast tier: unit tests and a few end-to-end smoke runs (a few minutes on 2 cores). test-all: every test (CI).
test: setup data
	$(PY) -m pytest -q -m "unit or smoke"

test-all: setup data
	$(PY) -m pytest -q

bench: setup data
	$(PY) -m pip install -q -e '.[bench]'
	$(PY) benchmarks/bench_step.py
	$(PY) benchmarks/bench_conv.py
	$(PY) benchmarks/bench_scaling.py
	$(PY) benchmarks/bench_boost.py

setup: $(VENV)/.installed

# torch/torchvision are pinned to the builds this project is tested with; pip resolves the rest from pyproject.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -e '.[test]'
	touch $@

data:
	@scripts/ensure-fashion-mnist.sh

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
