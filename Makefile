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

.PHONY: all setup deploy-setup wheels lock destroy demo test lint typecheck unit integration compiled test-compiled infra metrics bench fuzz synth clean

all: test

$(BIN)/.installed: requirements-runtime.txt requirements.txt requirements-dev.txt pyproject.toml
	@test -x $(BIN)/python || $(PY) -m venv $(VENV) 2>/dev/null || { \
	  rm -rf $(VENV); echo "installing python3-venv"; \
	  if [ "$$(id -u)" = 0 ]; then SUDO=""; else SUDO=sudo; fi; \
	  $$SUDO apt-get update -qq && $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >/dev/null && \
	  $(PY) -m venv $(VENV); }
	$(BIN)/python -m pip install -q --disable-pip-version-check -r requirements-dev.txt
	$(BIN)/python -m pip install -q --disable-pip-version-check --no-deps -e .
	touch $@

node_modules/.bin/cdk: package.json
	npm install --no-audit --no-fund --loglevel=error
	touch $@

# Debian packages the tests run (tests/conftest.py's require_tool skips a test without its tool,
# and fails it under CI=true): SIPp (sip-tester) as the real SIP peer, shellcheck for deploy/,
# nft (nftables) to check the firewall rules install.sh writes, tcpdump to read back the pcap
# files the proxy's trace writes, openssl for test certificates, systemd-analyze (systemd) to
# verify the unit, python3.11 for the scratch install of the runtime venv (the EC2 image's Python).
APT_TEST := sip-tester shellcheck nftables tcpdump openssl systemd python3.11
APT_BENCH := kamailio
define apt_install
	@missing=""; for p in $(1); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  if [ "$$(id -u)" = 0 ]; then SUDO=""; else SUDO=sudo; fi; \
	  $$SUDO apt-get update -qq && $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	fi
endef

.sysdeps: Makefile
	$(call apt_install,$(APT_TEST))
	@touch $@

.benchdeps: .sysdeps
	$(call apt_install,$(APT_BENCH))
	@touch $@

setup: $(BIN)/.installed node_modules/.bin/cdk .sysdeps

# What `cdk deploy` needs and nothing else, without root, apt or sudo (Linux and macOS): a venv with
# requirements.txt, the pinned CDK CLI, and the code asset's wheels.
deploy-setup:
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check -r requirements.txt
	npm ci --no-audit --no-fund --loglevel=error
	$(BIN)/python -m infra.wheels download

# The runtime's wheels for the code asset (x86_64 and aarch64, checked against
# requirements-runtime.lock; cached). cdk.json's build step runs the same before every synth.
wheels: $(BIN)/.installed
	$(BIN)/python -m infra.wheels download

# cdk destroy, then what it kept (the Elastic IPs) and the settings that adopt them again.
destroy:
	$(BIN)/python -m infra.destroy --stack $${STACK:-ClearIpProxy}

# After changing requirements-runtime.txt: pin the new wheels by hash.
lock: $(BIN)/.installed
	$(BIN)/python -m infra.wheels lock

demo: $(BIN)/.installed
	$(BIN)/python -m proxy_runtime demo

lint: $(BIN)/.installed
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports

typecheck: $(BIN)/.installed
	$(BIN)/mypy

test: setup lint typecheck compiled
	$(BIN)/pytest -q
	$(MAKE) --no-print-directory test-compiled

# The sans-I/O core (proxy_runtime/sip, proxy_runtime/core) compiled with mypyc (setup.py), installed
# into .build/compiled beside the pure-Python editable install the other targets use. Remade when any
# source changes. `make test` runs the unit and integration suites against it as well (tests/conftest.py
# puts it first on sys.path when CLEARIP_COMPILED_DIR names it); `python -m bench` measures it.
COMPILED := .build/compiled
PROXY_SOURCES := $(shell find proxy_runtime -name '*.py')

$(COMPILED)/.built: $(BIN)/.installed setup.py pyproject.toml $(PROXY_SOURCES)
	rm -rf $(COMPILED) build
	CLEARIP_COMPILE=1 $(BIN)/python -m pip install -q --disable-pip-version-check \
	  --no-build-isolation --no-deps --target $(COMPILED) .
	rm -rf build
	touch $@

compiled: $(COMPILED)/.built

test-compiled: compiled
	CLEARIP_COMPILED_DIR=$(COMPILED) $(BIN)/pytest -q tests/unit tests/integration tests/metrics

unit: $(BIN)/.installed
	$(BIN)/pytest -q tests/unit

integration: setup
	$(BIN)/pytest -q tests/integration

infra: setup
	$(BIN)/pytest -q tests/infra

metrics: setup
	$(BIN)/pytest -q tests/metrics

bench: setup .benchdeps compiled
	$(BIN)/python -m bench

fuzz: $(BIN)/.installed requirements-fuzz.txt
	$(BIN)/python -m pip install -q --disable-pip-version-check -r requirements-fuzz.txt
	$(BIN)/python -m bench.fuzz_atheris -runs=1000000

synth: setup
	node_modules/.bin/cdk synth --quiet

clean:
	rm -rf $(VENV) node_modules cdk.out wheels build .build .sysdeps .benchdeps .pytest_cache .mypy_cache .ruff_cache .import_linter_cache
