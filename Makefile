# Two entry points: `make repro` runs the whole default pipeline, `make test` runs the tests.
# Each creates the virtual environment in .venv on first use.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PROFILE ?= embedded
ENGINE ?= queue
# Values given as `make VAR=...` reach the commands as environment variables, quoted by the shell ("$$VAR"), never
# pasted into the command line: a CI job's branch or tag name cannot run as a command.
export VERSION STAGE PROFILE STORAGE ENGINE SWEEP

.PHONY: setup repro test lint format profile register remote sweep clean-venv

# uv installs the pinned environment in 16 s where pip took 108 s (README: Quick start). It is handed pip's own index
# settings (pip.conf and PIP_* variables, the variable first, as pip ranks them), so it installs from where pip would,
# and weighs every index's versions as pip does.
UV_VERSION := 0.13.8
# `pip config list` runs once (about 0.4 s a call); each setting is read from its saved output.
PIP_CONFIG := $(VENV)/pip-config.txt
pip_setting = "$$(sed -n "s/^[^.]*\.$(1)='\(.*\)'$$/\1/p" $(PIP_CONFIG) | head -n 1)"
UV_INSTALL = UV_INDEX_STRATEGY=unsafe-best-match UV_INDEX_URL=$(call pip_setting,index-url) \
	UV_EXTRA_INDEX_URL=$(call pip_setting,extra-index-url) UV_FIND_LINKS=$(call pip_setting,find-links) \
	UV_CONSTRAINT=$(call pip_setting,constraint) $(BIN)/uv pip install --python $(BIN)/python --quiet
# Python writes the environment's bytecode as modules are first imported (about 8 s once, in the first stage that
# imports torch) rather than uv compiling every module up front (27 s more setup). So the commands here run with
# PYTHONDONTWRITEBYTECODE unset, which container images often set: with it, every stage process compiled its ~3,500
# imports anew (a train stage's took 12.4 s instead of 5.3-6.0).
unexport PYTHONDONTWRITEBYTECODE

$(VENV)/.installed: requirements.txt requirements-dev.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet uv==$(UV_VERSION)
	$(BIN)/python -m pip config list > $(PIP_CONFIG) 2>/dev/null || true
	$(UV_INSTALL) -r requirements-dev.txt
	$(UV_INSTALL) --no-deps -e .
	touch $@

# SkyPilot launches work on rented GPUs from this machine; it pins click < 8.2 where huggingface-hub (transformers)
# needs >= 8.4.2, so it lives in an environment of its own, as a command-line tool does (tests/test_skypilot.py
# parses configs/skypilot/ with it).
SKY_VENV ?= .venv-sky
SKYPILOT_VERSION := 0.14.1
$(SKY_VENV)/.installed: $(VENV)/.installed
	$(PYTHON) -m venv $(SKY_VENV)
	$(subst --python $(BIN)/python,--python $(SKY_VENV)/bin/python,$(UV_INSTALL)) skypilot==$(SKYPILOT_VERSION)
	touch $@

setup: $(VENV)/.installed

# params.yaml is validated before DVC runs (and again by the validate stage, first in dvc.yaml, which guards
# `dvc repro` and `dvc exp run` too): DVC deletes a stage's outputs before running it (README: When a stage fails).
repro: setup
	$(BIN)/python -m lorapipe.config params.yaml
	PATH="$(abspath $(BIN)):$$PATH" dvc repro

test: setup $(SKY_VENV)/.installed
	PATH="$(abspath $(BIN)):$$PATH" HF_HUB_OFFLINE=1 SKYPILOT_PYTHON="$(abspath $(SKY_VENV))/bin/python" python -m pytest

lint: setup
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

format: setup
	$(BIN)/ruff check --fix . && $(BIN)/ruff format .

# Switch params.yaml to another profile from profiles/ (then `dvc exp run` or `make repro`).
profile: setup
	$(BIN)/python -m lorapipe.cli.profiles "$$PROFILE"

# Register the adapters of this commit as VERSION (e.g. v1.0.0) with GTO; STAGE=prod also assigns a stage.
register: setup
	PATH="$(abspath $(BIN)):$$PATH" python -m lorapipe.cli.register --version "$$VERSION" $${STAGE:+--stage "$$STAGE"}

# A default DVC remote in a local folder (dvc push / dvc pull); STORAGE=... to choose where.
STORAGE ?= $(abspath ..)/lorapipe-dvc-storage
remote: setup
	$(BIN)/dvc remote add --force -d local "$$STORAGE"

# A sweep, one DVC experiment per combination (README: More GPUs, more machines), on DVC's queue or a Ray cluster:
#   make sweep SWEEP="-S lora.r=4,8,16 -S train.learning_rate=1e-3,2e-3" [ENGINE=ray]
# SWEEP is split into words (globbing off), never run as code.
sweep: setup
	set -f; PATH="$(abspath $(BIN)):$$PATH" python -m lorapipe.cli.sweep --engine "$$ENGINE" $$SWEEP

clean-venv:
	rm -rf $(VENV) $(SKY_VENV)
