# The two commands the README opens with: `make demo` and `make test`.
# Both set up what they need from pinned files: .venv from requirements-*.txt,
# SIPp from Debian's sip-tester, the CDK CLI from package.json (npm).
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
export CDK_DISABLE_CLI_TELEMETRY := 1
export JSII_SILENCE_WARNING_END_OF_LIFE_NODE_VERSION := 20
export PYTHONDONTWRITEBYTECODE := 1

.PHONY: all setup demo test lint typecheck unit integration infra metrics bench synth clean

all: test

$(BIN)/.installed: requirements-runtime.txt requirements-dev.txt pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check -r requirements-dev.txt
	$(BIN)/python -m pip install -q --disable-pip-version-check --no-deps -e .
	touch $@

node_modules/.bin/cdk: package.json
	npm install --no-audit --no-fund --loglevel=error
	touch $@

.sipp:
	@command -v sipp >/dev/null || { \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq sip-tester; \
	  else sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq sip-tester; fi; }
	@touch $@

setup: $(BIN)/.installed node_modules/.bin/cdk .sipp

demo: $(BIN)/.installed
	$(BIN)/python -m proxy_runtime demo

lint: $(BIN)/.installed
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(BIN)/.installed
	$(BIN)/mypy

test: setup lint typecheck
	$(BIN)/pytest

unit: $(BIN)/.installed
	$(BIN)/pytest tests/unit

integration: setup
	$(BIN)/pytest tests/integration

infra: setup
	$(BIN)/pytest tests/infra

metrics: setup
	$(BIN)/pytest tests/metrics

bench: setup
	$(BIN)/python -m bench

synth: setup
	node_modules/.bin/cdk synth --quiet

clean:
	rm -rf $(VENV) node_modules cdk.out .sipp .pytest_cache .mypy_cache .ruff_cache
