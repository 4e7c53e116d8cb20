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

# The board tests (the iCEBreaker's and the ULX3S-12F's default builds, the post-synthesis
# runs of the iCEBreaker's and the ULX3S-45F's SoCs) and the bench's quick run and its KWS
# on a virtual board run beside the rest of the suite, one stream per core of a 2-core
# machine; their output follows the suite's. The 85F's place and route (17 minutes alone,
# 43 beside the tests) is measured by `npugen bench --only boards`, not here.
BOARD_TESTS := 'tests/test_post_synthesis.py::test_demo_mlp_on_the_synthesized_soc[ulx3s-45f]' \
	'tests/test_boards.py::test_default_build_meets_timing[ulx3s-12f]' \
	'tests/test_boards.py::test_default_build_meets_timing[icebreaker]' \
	'tests/test_post_synthesis.py::test_demo_mlp_on_the_synthesized_soc[icebreaker]' \
	'tests/test_bench.py::test_bench_quick' \
	'tests/test_bench.py::test_mlperf_kws_on_the_virtual_board_equals_litert_and_the_golden_model'

test: lint
	@mkdir -p build
	@$(BIN)/pytest -q -ra --durations=5 $(BOARD_TESTS) > build/board-tests.log 2>&1 & boards=$$!; \
	$(BIN)/pytest -q -ra --durations=40 $(addprefix --deselect ,$(BOARD_TESTS)); rest=$$?; \
	wait $$boards; built=$$?; \
	echo "--- the board builds and post-synthesis runs ---"; \
	cat build/board-tests.log; \
	exit $$(( rest || built ))

clean:
	rm -rf build $(VENV)
