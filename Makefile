# VRS — the two commands a newcomer needs are `make run` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# The dashboard's chart library (Apache ECharts), from services/stats/web's npm lock file.
ECHARTS := services/stats/web/node_modules/echarts/dist/echarts.min.js

.PHONY: run run-full test lint format bench soak clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	@# devtools/ (launcher, harness, bench) is not part of the installed package: put the checkout on the path.
	$(BIN)/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])' | xargs -I{} sh -c 'echo "$(CURDIR)" > {}/vrs-devtools.pth'
	@touch $@

$(ECHARTS): services/stats/web/package.json services/stats/web/package-lock.json
	npm ci --prefix services/stats/web --no-audit --no-fund
	@touch $@

run: $(STAMP) $(ECHARTS)  ## all services, embedded (SQLite + event log under var/), demo data
	$(BIN)/vrs run

run-full: $(STAMP) $(ECHARTS)  ## the same on local PostgreSQL (2 shards) + Kafka under var/
	$(BIN)/vrs run --full

test: $(STAMP) $(ECHARTS)  ## the whole suite, PostgreSQL + Kafka included (started by the harness)
	$(BIN)/pytest

lint: $(STAMP)  ## ruff (format + lint) and mypy --strict
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .
	$(BIN)/mypy shared services devtools tests

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

bench: $(STAMP) $(ECHARTS)  ## throughput and lag on PostgreSQL + Kafka; prints numbers
	$(BIN)/python -m devtools.bench

soak: $(STAMP)  ## mixed load with injected faults on PostgreSQL + Kafka, then reconcile; prints a table
	$(BIN)/python -m devtools.soak

clean:
	rm -rf var .pytest_cache .mypy_cache .ruff_cache services/stats/web/node_modules
