"""The timing constants are defined once (sw/timing.py): the gateware's pipelines have
those depths, and docs/ARCHITECTURE.md's timing section is generated from them."""

from pathlib import Path

import pytest

from npugen.hw.requant import Requantizer
from npugen.timing import (
    REQUANT_PIPELINE_STAGES,
    _formula,
    array_latency,
    load_next_cycles,
    results_written_cycles,
    splice_timing,
    timing_markdown,
    weight_load_cycles,
    weight_use_cycles,
)

ARCHITECTURE = Path(__file__).resolve().parents[1] / "docs" / "ARCHITECTURE.md"


def test_docs_timing_section_is_generated():
    text = ARCHITECTURE.read_text()
    assert text == splice_timing(text), \
        "regenerate: python -m npugen.timing docs/ARCHITECTURE.md"
    assert timing_markdown() in text


def test_splice_needs_the_markers():
    with pytest.raises(ValueError, match="no timing section"):
        splice_timing("# Architecture\n")
    spliced = splice_timing("a\n<!-- timing:begin -->\nold\n<!-- timing:end -->\nb\n")
    assert spliced == f"a\n<!-- timing:begin -->\n{timing_markdown()}\n<!-- timing:end -->\nb\n"


def test_formulas():
    assert _formula(weight_use_cycles) == "rows−1"
    assert _formula(weight_load_cycles) == "rows−1"
    assert _formula(load_next_cycles) == "rows"
    assert _formula(array_latency) == "rows+cols+1"
    assert _formula(results_written_cycles) == "rows+cols+4"
    assert _formula(lambda rows, cols: 2 * rows - 3) == "2·rows−3"
    with pytest.raises(ValueError, match="is not linear"):
        _formula(lambda rows, cols: rows * cols)


def test_gateware_pipelines_have_the_timing_depths():
    assert Requantizer.latency == REQUANT_PIPELINE_STAGES
