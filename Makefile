# The two commands: `make demo` (set-up + data + training + dashboard + speech) and `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export JAX_PLATFORMS ?= cpu

.PHONY: venv constraints test lint demo demo-data browser bench clean-demo

$(STAMP): requirements.txt requirements-dev.txt constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements-dev.txt -c constraints.txt
	$(PY) -m pip install --quiet --no-deps -e .
	touch $@

venv: $(STAMP)

# Re-resolves every package from the requirements files alone, in a fresh environment, and pins the result in
# constraints.txt (its comment kept): after a requirement changed. `make venv` then installs it.
constraints:
	rm -rf .constraints-venv
	$(PYTHON) -m venv .constraints-venv
	.constraints-venv/bin/python -m pip install --quiet --upgrade pip
	.constraints-venv/bin/python -m pip install --quiet -r requirements-dev.txt
	{ grep '^#' constraints.txt; .constraints-venv/bin/python -m pip freeze | sort -f; } > constraints.txt.new
	mv constraints.txt.new constraints.txt
	rm -rf .constraints-venv

# The dashboard's browser test drives Debian's Chromium (never a downloaded browser build).
browser:
	@command -v chromium >/dev/null || { \
	  echo "installing Debian's chromium for the dashboard browser test"; \
	  SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo); \
	  $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq chromium >/dev/null; }

# Two workers, each test module whole on one (its module fixtures are made once, and the fake pods of test_launch.py
# run one at a time: each one's stop matches every fake pod's trainers on the machine): a serial run kept the 2 CPU cores about 36% busy, waiting on subprocesses,
# timeouts and slow links. The 25 slowest tests are listed at the end.
test: venv browser
	$(PY) -m pytest -q -n 2 --dist loadscope --durations=25

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/shellcheck launch.sh bench/gpu_figures.sh .ci/run

demo-data: venv
	$(PY) -m echo_jax.data.demo --out data/demo

demo: demo-data
	$(PY) -m echo_jax.demo

bench: venv
	$(PY) bench/train_step.py && $(PY) bench/data_pipeline.py && $(PY) bench/checkpoint.py

clean-demo:
	rm -rf data/demo runs/demo demo.wav
