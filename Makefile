# Two entry points: `make demo` (the main job) and `make test` (the test suite).
# Each creates .venv and installs npugen into it on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo test lint clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	touch $@

demo: $(VENV)/.installed
	$(BIN)/npugen demo

lint: $(VENV)/.installed
	$(BIN)/ruff check .

test: lint
	$(BIN)/pytest -q -ra

clean:
	rm -rf build $(VENV)
