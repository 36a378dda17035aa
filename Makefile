# Two commands for a newcomer: `make run` (set up + run the pipeline on the bundled ELPV data)
# and `make test` (set up + run the test suite). Everything installs into .venv.
VENV ?= .venv
PY := $(VENV)/bin/python
export DVC_NO_ANALYTICS := 1
export DO_NOT_TRACK := 1
export PREFECT_SERVER_ANALYTICS_ENABLED := false

.PHONY: setup run test test-fast bench bench-peers-env browser clean prefect-up deploy prefect-down

# uv installs what pip would, from the sources pip is configured with (tools/uv_sources.py: on our machines torch's
# wheels lie on disk), in ~90 s instead of pip's ~160 s (torch's CUDA build is 5.5 GB); pip if uv cannot.
UV_INSTALL := $(VENV)/bin/uv pip install --quiet --python $(PY) --no-cache --compile-bytecode \
	--index-strategy unsafe-best-match
$(VENV)/.installed: pyproject.toml tools/uv_sources.py
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet uv
	$(UV_INSTALL) $$(python3 tools/uv_sources.py) -e ".[dev]" \
		|| { echo "uv failed: installing with pip"; $(PY) -m pip install --quiet -e ".[dev]"; }
	touch $@

setup: $(VENV)/.installed  ## create .venv and install the project with its dev tools

run: setup  ## the whole pipeline as a Prefect flow, each stage through DVC
	$(VENV)/bin/finetune run

# One worker per core (at most 4), whole files per worker, so a file's module fixtures (a trained project, a Prefect
# server) are built once; tests/conftest.py orders the files longest first. `pytest tests/x.py` alone stays serial.
XDIST := -n auto --maxprocesses 4 --dist loadfile --no-loadscope-reorder

test: setup browser  ## full suite, end-to-end tests included
	$(PY) -m pytest $(XDIST) --durations=25

test-fast: setup  ## everything but the slow end-to-end tests
	$(PY) -m pytest $(XDIST) -m "not slow"

# fastai and Lightning live in their own environment, never in the project's dependencies (bench/peers/).
PEERS_VENV := bench/.venv-peers
$(PEERS_VENV)/.installed: bench/peers/requirements.txt
	python3 -m venv $(PEERS_VENV)
	$(PEERS_VENV)/bin/python -m pip install --quiet -r bench/peers/requirements.txt
	touch $@

bench-peers-env: $(PEERS_VENV)/.installed  ## the peers' environment (fastai, Lightning) for bench/bench_peers.py

# Every benchmark, then docs/benchmarks.md. ~40 min on 2 cores when the pipeline has run (`make run`), ~55 min
# when bench_elpv.py has to run it first (bench/README.md). The budgets here are the documented short settings.
bench: setup bench-peers-env  ## all benchmarks (tables, JSON in bench/results/), then docs/benchmarks.md
	$(PY) bench/bench_elpv.py
	$(PY) bench/bench_tta.py
	$(PY) bench/bench_label_issues.py
	$(PY) bench/bench_peers.py --size 224 --frozen-epochs 1 --unfrozen-epochs 2
	$(PY) bench/bench_onnx.py
	$(PY) bench/bench_train.py --n-train 256 --n-val 64 --epochs 2 --unfrozen-epochs 1
	$(PY) bench/bench_serving.py --configs default --seconds 5 --int8
	$(PY) bench/bench_drift.py
	$(PY) bench/report.py

# The web page's browser test drives Debian's chromium through Playwright (never `playwright install`, which
# downloads a browser). Installed with apt-get when missing and running as root (CI); otherwise the test is skipped
# locally and says how to install it.
browser:  ## Debian's chromium for the browser test (apt-get, non-interactive, when missing)
	@command -v chromium >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ]; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends chromium; \
	  else echo "chromium is missing: sudo apt-get install chromium (the browser test is skipped without it)"; fi; }

prefect-up: setup  ## a local Prefect server (dashboard: http://127.0.0.1:4200) and a process worker, in the background
	$(VENV)/bin/finetune prefect up

deploy: prefect-up  ## register prefect.yaml's deployments (run form + nightly retraining) and notifications
	$(VENV)/bin/finetune prefect deploy

prefect-down:  ## stop the worker, then the server
	$(VENV)/bin/finetune prefect down

clean:  ## remove pipeline outputs (not the venv)
	rm -rf data models reports dvc.lock
