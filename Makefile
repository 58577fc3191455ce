# One command per task; each target also works on its own (it installs what it needs first).
# Settings come from CRM_EVENTS_* environment variables (see devtools/stack.py and README).

SHELL := /bin/bash
.DEFAULT_GOAL := help

BIN := .venv/bin
STACK := $(BIN)/crm-events-stack

.PHONY: help install up down status lint unit test chaos browser token wheel soak bench bench-full

help:
	@echo "make install   Debian packages, .venv, Kafka jars, chart tools (idempotent, fast when done)"
	@echo "make up        start the local stack (Kafka, Redis, ingest, edges, nginx, producer, watchdog)"
	@echo "make down      stop what 'make up' started"
	@echo "make status    table of the stack's parts"
	@echo "make token     a development JWT for the local stack (every type, 24 h)"
	@echo "make wheel     the crm-events wheel into dist/ (shared, ingest, edge; no devtools)"
	@echo "make lint      ruff and mypy"
	@echo "make unit      unit tests only (no services)"
	@echo "make test      lint, then all tests against a local Kafka and Redis"
	@echo "make chaos     the full chaos test alone (20,000 events, faults, 20 clients)"
	@echo "make failover  Redis Sentinel failover and wipe under load, 3 seeds x 20,000 events"
	@echo "make rebalance two ingest workers through rebalances, each record applied once"
	@echo "make browser   the browser tests alone (Chromium and Firefox ESR)"
	@echo "make soak      edge memory under reconnect churn, 2 h (SOAK_ARGS='--minutes 20'; bench/README.md)"
	@echo "make bench     benchmarks beside Centrifugo, quick (~8 min; bench/README.md)"
	@echo "make bench-full the full benchmark (~25 min; Centrifugo built once, ~10 min)"
	@echo "make grafana-schemas  refresh the vendored Grafana JSON schemas (GRAFANA_SDK_REF=tag)"

install:
	@bash scripts/install.sh

# The revision shown in crm_events_build_info and --version: the checkout's commit, unless
# CRM_EVENTS_REVISION is set (the processes themselves never ask git).
up: install
	@CRM_EVENTS_REVISION="$${CRM_EVENTS_REVISION:-$$(git rev-parse --short=12 HEAD 2>/dev/null || echo unknown)}" \
	$(STACK) up

# No install here: with no .venv there is nothing of ours to stop.
down:
	@if [[ -x $(STACK) ]]; then $(STACK) down; else echo "no .venv: nothing to stop"; fi

status:
	@if [[ -x $(STACK) ]]; then $(STACK) status; else echo "no .venv: run 'make install'"; fi

lint: install
	$(BIN)/ruff check .
	$(BIN)/mypy

unit: install
	@bash scripts/test.sh --unit

test: lint
	@bash scripts/test.sh

# Seed with CRM_EVENTS_CHAOS_SEED=N to replay a run; the report is printed and kept in run/.
chaos: install
	@mkdir -p run
	CRM_EVENTS_CHAOS_EVENTS=$${CRM_EVENTS_CHAOS_EVENTS:-20000} \
	CRM_EVENTS_CHAOS_REPORT=$${CRM_EVENTS_CHAOS_REPORT:-run/chaos-report.json} \
	bash scripts/test.sh tests/integration/test_chaos.py -s -q

browser: install
	@bash scripts/test.sh tests/browser -q -s

# Only the token goes to stdout, so that TOKEN=$(make token) works. It needs only .venv;
# when install has to run first, its progress goes to stderr.
token:
	@[[ -x $(STACK) ]] || bash scripts/install.sh >&2
	@$(STACK) token

# build/ goes first: setuptools packs whatever an earlier build left in build/lib. No build
# isolation: .venv has setuptools (test extra), so nothing is downloaded.
wheel: install
	@rm -rf build
	$(BIN)/python -m pip wheel -q --no-deps --no-build-isolation -w dist .

# The stack from `make up` under 300 reconnecting clients and 100 events/s, memory sampled each
# minute; report, plot and verdict in run/soak/<time>/. SOAK_ARGS passes options through
# (python -m bench.soak --help).
soak: up
	$(BIN)/python -m bench.soak $(SOAK_ARGS)

bench: install
	$(BIN)/python -m bench --profile quick

bench-full: install
	$(BIN)/python -m bench --profile full

# Not part of install or test: the tests read only the vendored copy. Without
# GRAFANA_SDK_REF, the newest release tag (monitoring/grafana/schemas/README.md).
.PHONY: grafana-schemas
grafana-schemas:
	@bash scripts/refresh-grafana-schemas.sh $(GRAFANA_SDK_REF)

# Redis failover and wipe under load, three seeds of 20,000 events; the table is printed and
# kept in run/failover-report.json.
.PHONY: failover
failover: install
	@mkdir -p run
	CRM_EVENTS_FAILOVER_SEEDS=$${CRM_EVENTS_FAILOVER_SEEDS:-3} \
	CRM_EVENTS_FAILOVER_EVENTS=$${CRM_EVENTS_FAILOVER_EVENTS:-20000} \
	CRM_EVENTS_FAILOVER_REPORT=$${CRM_EVENTS_FAILOVER_REPORT:-run/failover-report.json} \
	bash scripts/test.sh tests/integration/test_failover.py -s -q -p no:randomly

# Two ingest workers through rebalances mid-stream (kept out of `make test`: see the test's docstring).
.PHONY: rebalance
rebalance: install
	CRM_EVENTS_REBALANCE_TEST=1 bash scripts/test.sh tests/integration/test_rebalance.py -q -p no:randomly
