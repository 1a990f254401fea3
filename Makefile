# The two commands of the README. Both create .venv on first use and reinstall only when
# pyproject.toml changes (the stamp file .venv/.installed records the last install).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: repro test test-slow bench clean-venv

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[test]"
	@touch $(STAMP)

repro: $(STAMP)
	@test -d .dvc || $(BIN)/dvc init --quiet
	$(BIN)/dvc repro report

test: $(STAMP)
	$(BIN)/python -m pytest -q

test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m slow

bench: $(STAMP)
	$(BIN)/python -m vspa.cli bench

clean-venv:
	rm -rf $(VENV)
