# Two entry points: `make repro` runs the whole default pipeline, `make test` runs the tests.
# Each creates the virtual environment in .venv on first use.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PROFILE ?= embedded

.PHONY: setup repro test lint format profile register remote clean-venv

$(VENV)/.installed: requirements.txt requirements-dev.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -r requirements-dev.txt
	$(BIN)/python -m pip install --quiet --no-deps -e .
	touch $@

setup: $(VENV)/.installed

# params.yaml is validated before DVC runs (and again by the validate stage, first in dvc.yaml, which guards
# `dvc repro` and `dvc exp run` too): DVC deletes a stage's outputs before running it (README: When a stage fails).
repro: setup
	$(BIN)/python -m lorapipe.config params.yaml
	PATH="$(abspath $(BIN)):$$PATH" dvc repro

test: setup
	PATH="$(abspath $(BIN)):$$PATH" HF_HUB_OFFLINE=1 python -m pytest

lint: setup
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

format: setup
	$(BIN)/ruff check --fix . && $(BIN)/ruff format .

# Switch params.yaml to another profile from profiles/ (then `dvc exp run` or `make repro`).
profile: setup
	$(BIN)/python -m lorapipe.cli.profiles $(PROFILE)

# Register the adapters of this commit as VERSION (e.g. v1.0.0) with GTO; STAGE=prod also assigns a stage.
register: setup
	PATH="$(abspath $(BIN)):$$PATH" python -m lorapipe.cli.register --version $(VERSION) $(if $(STAGE),--stage $(STAGE))

# A default DVC remote in a local folder (dvc push / dvc pull); STORAGE=... to choose where.
STORAGE ?= $(abspath ..)/lorapipe-dvc-storage
remote: setup
	$(BIN)/dvc remote add --force -d local $(STORAGE)

clean-venv:
	rm -rf $(VENV)
