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

# The two default board builds (several minutes of place-and-route on one core) and the
# post-synthesis runs of the same two SoCs run beside the rest of the suite; their output
# follows it.
BOARD_TESTS := tests/test_boards.py::test_default_build_meets_timing tests/test_post_synthesis.py

test: lint
	@mkdir -p build
	@$(BIN)/pytest -q -ra --durations=10 $(BOARD_TESTS) > build/board-tests.log 2>&1 & boards=$$!; \
	$(BIN)/pytest -q -ra --durations=40 $(addprefix --deselect ,$(BOARD_TESTS)); rest=$$?; \
	wait $$boards; built=$$?; \
	echo "--- board builds and post-synthesis runs ($(BOARD_TESTS)) ---"; cat build/board-tests.log; \
	exit $$(( rest || built ))

clean:
	rm -rf build $(VENV)
