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

# The two default board builds and the post-synthesis runs of the same two SoCs run in two
# streams balanced for a 2-core machine: the ULX3S-85F's build and netlist run (the longest
# place-and-route) beside the rest of the suite, which the iCEBreaker's build and netlist
# run follow. The 85F's output follows the suite's.
ECP5_TESTS := 'tests/test_boards.py::test_default_build_meets_timing[ulx3s-85f]' \
	'tests/test_post_synthesis.py::test_demo_mlp_on_the_synthesized_soc[ulx3s-85f]'
ICE40_TESTS := 'tests/test_boards.py::test_default_build_meets_timing[icebreaker]' \
	'tests/test_post_synthesis.py::test_demo_mlp_on_the_synthesized_soc[icebreaker]'

test: lint
	@mkdir -p build
	@$(BIN)/pytest -q -ra --durations=5 $(ECP5_TESTS) > build/ecp5-tests.log 2>&1 & ecp5=$$!; \
	$(BIN)/pytest -q -ra --durations=40 $(addprefix --deselect ,$(ECP5_TESTS) $(ICE40_TESTS)); \
	rest=$$?; \
	$(BIN)/pytest -q -ra --durations=5 $(ICE40_TESTS); ice40=$$?; \
	wait $$ecp5; built=$$?; \
	echo "--- the ULX3S-85F's build and post-synthesis run ---"; \
	cat build/ecp5-tests.log; \
	exit $$(( rest || ice40 || built ))

clean:
	rm -rf build $(VENV)
