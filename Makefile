# One command per task; each target also works on its own (it installs what it needs first).
# Settings come from CRM_EVENTS_* environment variables (see devtools/stack.py and README).

SHELL := /bin/bash
.DEFAULT_GOAL := help

BIN := .venv/bin
STACK := $(BIN)/crm-events-stack

.PHONY: help install up down status lint unit test chaos browser token bench bench-full

help:
	@echo "make install   Debian packages, .venv, Kafka jars (idempotent, fast when done)"
	@echo "make up        start the local stack (Kafka, Redis, ingest, edges, nginx, producer)"
	@echo "make down      stop what 'make up' started"
	@echo "make status    table of the stack's parts"
	@echo "make token     a development JWT for the local stack (every type, 24 h)"
	@echo "make lint      ruff and mypy"
	@echo "make unit      unit tests only (no services)"
	@echo "make test      lint, then all tests against a local Kafka and Redis"
	@echo "make chaos     the full chaos test alone (20,000 events, faults, 20 clients)"
	@echo "make browser   the browser tests alone (Chromium and Firefox ESR)"
	@echo "make bench     benchmarks beside Centrifugo, quick (~8 min; bench/README.md)"
	@echo "make bench-full the full benchmark (~25 min; Centrifugo built once, ~10 min)"

install:
	@bash scripts/install.sh

up: install
	@$(STACK) up

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

token: install
	@$(STACK) token

bench: install
	$(BIN)/python -m bench --profile quick

bench-full: install
	$(BIN)/python -m bench --profile full
