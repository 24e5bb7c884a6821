# btc-anomaly — every developer and CI entry point. `make help` lists the targets.
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
JARS ?= .jars
MVN := mvn -q -B -s jvm/settings.xml -f jvm/pom.xml
PYTEST_ARGS ?=
# Component extras, each pinned into requirements/<extra>.txt by `make requirements`.
EXTRAS := producer spark model api dashboard stream api-postgres
# Java + Maven for the JVM jars, Prometheus + Alertmanager (promtool, amtool) for the observability tests,
# Chromium + chromedriver for the dashboard browser tests, wrk as the API benchmark's load generator.
APT_PACKAGES := openjdk-17-jre-headless maven prometheus prometheus-alertmanager chromium chromium-driver wrk

.PHONY: help setup venv jars system-deps test unit integration lint format bench requirements readme screenshots clean \
	demo smoke-compose mutation audit

# `make demo`: replay speed of the bundled sample (N x real time; a block every 600/N s), or SOURCE=ws for
# the live Blockchain.com feed. State (Kafka, lake, MLflow, Prometheus) goes to DEMO_STATE (git-ignored).
SPEED ?= 20
SOURCE ?= replay
DEMO_STATE ?= $(CURDIR)/var/demo
DEMO_PROCS := kafka mlflow producer stream trainer detect api dashboard
# honcho loads this into every process (over the environment); tests pass /dev/null to isolate themselves.
DEMO_ENV_FILE ?= .env
ifeq ($(SOURCE),ws)
DEMO_PRODUCE_ARGS := --source ws
else
DEMO_PRODUCE_ARGS := --source replay --loop --speed $(SPEED)
endif
# On Ctrl-C honcho SIGTERMs every process at once and SIGKILLs what is left KILL_WAIT s later (5 by
# default). Each process stops by itself, in order: Kafka and MLflow wait for their clients first
# (at most 90 s, runtime/process.ManagedProcess.drain), the stream lets its running micro-batch finish
# (at most 60 s, processing/stream.STOP_TIMEOUT_S). KILL_WAIT is only the backstop above those bounds.
HONCHO := $(BIN)/python -c 'import sys, honcho.command, honcho.manager; honcho.manager.KILL_WAIT = 120; sys.exit(honcho.command.main())'

help:  ## list targets
	@grep -hE '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed -E 's/:.*## /\t/' | column -t -s $$'\t'

setup: system-deps venv jars  ## everything a fresh machine needs: Debian packages, venv, JVM jars

system-deps:  ## Debian packages (Java, Maven) when missing; needs root and apt
	@missing=""; for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  if command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
	    echo "installing Debian packages:$$missing"; apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; \
	  else echo "missing Debian packages:$$missing (install them, or run as root with apt)"; exit 1; fi; \
	fi

venv: $(VENV)/.installed  ## virtualenv with the pinned dev requirements and an editable install

$(VENV)/.installed: requirements/dev.txt pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -r requirements/dev.txt
	$(BIN)/pip install -q --no-deps -e .
	touch $@

jars: $(JARS)/.resolved  ## resolve jvm/pom.xml into .jars/{kafka,spark} with Maven

$(JARS)/.resolved: jvm/pom.xml jvm/settings.xml
	rm -rf $(JARS)/kafka $(JARS)/spark
	$(MVN) -Pkafka dependency:copy-dependencies
	$(MVN) -Pspark dependency:copy-dependencies
	touch $@

test: setup  ## lint + the whole suite in two parallel lanes (installs what it needs first; TEST_LANES=1: one)
	$(BIN)/ruff check src tests bench scripts
	bash scripts/test_lanes.sh $(BIN) $(PYTEST_ARGS)

unit: venv  ## unit tests only (seconds)
	$(BIN)/pytest tests/unit $(PYTEST_ARGS)

integration: setup  ## integration tests against a real local Kafka broker (and later Spark, MLflow)
	$(BIN)/pytest tests/integration $(PYTEST_ARGS)

lint: venv  ## ruff lint and format check
	$(BIN)/ruff check src tests bench scripts
	$(BIN)/ruff format --check src tests bench scripts

format: venv  ## apply ruff formatting and safe fixes
	$(BIN)/ruff check --fix src tests bench scripts
	$(BIN)/ruff format src tests bench scripts

bench: setup  ## every benchmark (long): bench/results.json, then the README's and RESULTS.md's tables from it
	$(BIN)/python -m bench.run_all; status=$$?; $(BIN)/python scripts/update_readme.py; exit $$status

audit: venv  ## check the pinned requirements against the advisories PyPI publishes (needs PyPI)
	$(BIN)/python scripts/audit_requirements.py

requirements:  ## re-pin requirements/*.txt from the pyproject extras (needs PyPI)
	$(BIN)/pip install -q pip-tools
	for extra in $(EXTRAS); do \
	  $(BIN)/pip-compile -q --strip-extras --no-header --no-emit-find-links --extra $$extra -o requirements/$$extra.txt pyproject.toml; \
	done
	$(BIN)/pip-compile -q --strip-extras --no-header --no-emit-find-links $(foreach e,$(EXTRAS) dev,--extra $(e)) -o requirements/dev.txt pyproject.toml
	# An extra that depends on another (api -> btc-anomaly[model]) makes pip-compile pin the project itself
	# by its local path; the project is installed separately (`pip install -e .` / the image's COPY).
	sed -i '/^btc-anomaly @ file:/d' requirements/*.txt

demo: setup  ## the whole stack locally, no Docker: replay of the bundled sample (SPEED=20) or SOURCE=ws
	@procs="$(DEMO_PROCS)"; \
	if command -v prometheus >/dev/null; then procs="$$procs prometheus"; \
	else echo "demo: Debian's prometheus is not installed (make setup installs it as root with apt): running without Prometheus"; fi; \
	echo "demo: dashboard http://127.0.0.1:$${BTC_ANOMALY_DASHBOARD_PORT:-8050}  API http://127.0.0.1:$${BTC_ANOMALY_API_PORT:-5001}/docs  state in $(DEMO_STATE)  (Ctrl-C stops everything)"; \
	BTC_ANOMALY_STATE_DIR=$(DEMO_STATE) DEMO_PRODUCE_ARGS="$(DEMO_PRODUCE_ARGS)" PATH="$(CURDIR)/$(BIN):$$PATH" \
	  $(HONCHO) start -f Procfile -e $(DEMO_ENV_FILE) $$procs

smoke-compose:  ## build and run docker-compose.yml for real here (own dockerd, stand-in images), then tear down
	bash scripts/smoke_compose.sh

clean:  ## remove local state (lake, broker data, MLflow store) — not the venv or jars
	rm -rf var

screenshots: setup  ## regenerate docs/*.png from the dashboard browser test (headless Chromium)
	UPDATE_DOCS_SCREENSHOTS=1 $(BIN)/pytest tests/e2e/test_dashboard_browser.py -q -k every_panel_renders

readme: venv  ## regenerate the README's Settings, metrics and benchmark tables (code, bench/results.json)
	$(BIN)/python scripts/update_readme.py

# Mutation testing (issue #20): mutmut mutates the modules of pyproject's [tool.mutmut] and runs the unit tests that
# reach each mutant, one worker at low priority (the machine is shared); not part of `make test`. A fresh
# copy every run, so the score is of the code and tests as they are now. Fails under 90 % killed per module.
# NUMBA_THREADING_LAYER=forksafe: mutmut forks each mutant from its own process, which ran the tests, and
# numba's GNU OpenMP pool SIGTERMs a child forked after its use ("suspicious" mutants; pyproject.toml).
mutation: venv  ## mutation score (mutmut) of the gate, risk, rules, stored hashes, features, API validation
	rm -rf mutants && mkdir mutants
	NUMBA_THREADING_LAYER=forksafe nice -n 10 $(BIN)/mutmut run --max-children 1 > mutants/run.log 2>&1 \
		|| { tail -c 3000 mutants/run.log; exit 1; }
	$(BIN)/python scripts/mutation_score.py
