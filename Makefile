# The commands the README names. Everything installs itself into .venv on first use.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install lock demo run down status codec-server replay-record chaos dlq bench conformance test lint format unit integration e2e clean

VIEWER_CLIENT := tests/viewer/node_modules/.package-lock.json

install: $(STAMP) $(VIEWER_CLIENT)

$(STAMP): pyproject.toml constraints.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e '.[dev,video]'
	@touch $(STAMP)

## The JavaScript dicomweb-client OHIF Viewer uses, exactly as package-lock.json pins it (Node.js 20 and npm),
## for the viewer test (tests/integration/test_records_viewer.py).
$(VIEWER_CLIENT): tests/viewer/package.json tests/viewer/package-lock.json
	@if command -v npm >/dev/null; then \
	  npm ci --prefix tests/viewer --no-audit --no-fund --loglevel=error && touch $(VIEWER_CLIENT); \
	else echo "npm not found: make test's viewer test needs Node.js 20 and npm (make demo does not)"; fi

## Take the newest releases pyproject.toml allows: install them into a scratch venv and write constraints.txt.
## Run the tests on the result (make test) before committing it.
lock:
	rm -rf .lock-venv && $(PYTHON) -m venv .lock-venv
	.lock-venv/bin/pip install --quiet --upgrade pip
	.lock-venv/bin/pip install --quiet -e '.[dev,video]'
	{ sed -n '1,2p' constraints.txt; .lock-venv/bin/pip freeze --exclude-editable | grep -v '^secondopinion'; } > constraints.new
	mv constraints.new constraints.txt && rm -rf .lock-venv

## Start Temporal, the four services and the worker (idempotent), then run one sample case end to end.
demo: install
	$(PY) -m scripts.demo

run: demo

## Stop what `make demo` started.
down: install
	$(PY) -m scripts.stack down

status: install
	$(PY) -m scripts.stack status

## The codec server alone (make demo starts it too): the Temporal UI and CLI decode case payloads through it.
codec-server: install
	$(PY) -m services.common.codec_server

## Record fresh workflow histories for the replay test (keep the old ones: running cases still need them).
replay-record: install
	RECORD_HISTORIES=1 $(PY) -m scripts.run_pytest -q tests/integration/test_case_workflow.py

## Crash tests: 50 cases while the worker, each service, RabbitMQ and Temporal are killed with kill -9 (~7 min).
chaos: install
	$(PY) -m tests.chaos --cases 50 --faults 30 --minutes 12

## Dead letters of every queue (QUEUE=insurance for one); replay/purge with `secondopinion dlq replay|purge ...`.
dlq: install
	@for q in $(or $(QUEUE),intake records insurance review workflows.bridge); do echo "$$q.dlq"; $(PY) -m services.common.cli dlq list $$q; done

## Benchmarks against the real stack (about 20 min): a table, bench/results/latest.json, one verdict line each.
bench: install
	$(PY) -m bench

## Lint, type-check and run the whole suite (unit, integration on real PostgreSQL/RabbitMQ/Temporal, e2e), on
## TEST_WORKERS pytest-xdist workers, a test file each at a time: the suite mostly waits on servers and
## subprocesses, so two workers take about half the time one does on two cores. TEST_WORKERS=0: one process.
TEST_WORKERS ?= 2
test: install lint
	$(PY) -m scripts.run_pytest -q $(if $(filter 0,$(TEST_WORKERS)),,-n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder)

## The DICOM Conformance Statement (docs/dicom-conformance-statement.md), written from the code.
conformance: install
	$(PY) -m scripts.conformance_statement

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy contracts services workflows scripts

format: install
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

unit: install
	$(PY) -m scripts.run_pytest -q tests/unit

integration: install
	$(PY) -m scripts.run_pytest -q tests/integration

e2e: install
	$(PY) -m scripts.run_pytest -q tests/e2e

clean: down
	rm -rf .data
