import argparse

import pytest

from npugen.config import NpuConfig


def test_defaults_are_valid_and_hashable():
    config = NpuConfig()
    assert config.macs_per_cycle == 64
    assert hash(config) == hash(NpuConfig())
    assert config.digest() == NpuConfig().digest() != NpuConfig(rows=4).digest()


@pytest.mark.parametrize("changes, error, message", [
    ({"rows": 0}, ValueError, r"rows must be between 1 and 64, not 0"),
    ({"cols": 65}, ValueError, r"cols must be between 1 and 64, not 65"),
    ({"rows": 2.5}, TypeError, r"rows must be an integer, not 2.5"),
    ({"rows": True}, TypeError, r"rows must be an integer, not True"),
    ({"input_width": 1}, ValueError, r"input_width must be between 2 and 16, not 1"),
    ({"accumulator_width": 33}, ValueError, r"accumulator_width must be between 16 and 32"),
    ({"input_width": 16, "weight_width": 16, "accumulator_width": 24}, ValueError,
     r"accumulator_width must be at least input_width \+ weight_width \(32\), not 24"),
    ({"activation_depth": 1000}, ValueError,
     r"activation_depth must be a power of two from 2 to 65536, or a multiple of 256 up "
     r"to it, not 1000"),
    ({"weight_depth": 4}, ValueError, r"weight_depth must hold one weight tile of rows=8"),
    ({"requant_lanes": 3}, ValueError,
     r"requant_lanes must divide both rows \(8\) and cols \(8\), not 3"),
    ({"dataflow": "os"}, ValueError, r"dataflow must be one of 'ws', not 'os'"),
    ({"rounding": "triple"}, ValueError,
     r"rounding must be one of 'double', 'single', 'both', not 'triple'"),
    ({"requant_overlap": 1}, TypeError, r"requant_overlap must be true or false, not 1"),
    ({"rows": 8, "cols": 4, "line_buffer_depth": 16}, ValueError,
     r"line_buffer_depth=16 \(the depthwise mode\) needs a square array of at least 3×3, "
     r"not 8×4; set it to 0"),
    ({"feature_maps": False, "line_buffer_depth": 16}, ValueError,
     r"line_buffer_depth=16 \(the depthwise mode\) needs feature_maps = true"),
    ({"line_buffer_depth": 2}, ValueError, r"line_buffer_depth must be 0 or at least 4, not 2"),
    ({"line_buffer_depth": 5000}, ValueError, r"line_buffer_depth must be between 0 and 4096"),
])
def test_invalid_parameters_are_named(changes, error, message):
    with pytest.raises(error, match=message):
        NpuConfig(**changes)


def test_rounding_defaults_to_both_and_a_lean_build_says_so():
    assert NpuConfig().rounding == "both"
    assert NpuConfig().describe() == "8x8 ws, int8 x int8 -> int32"
    assert NpuConfig(rounding="double").describe().endswith(", double rounding only")
    assert NpuConfig(rounding="single").describe().endswith(", single rounding only")


def test_frozen():
    with pytest.raises(AttributeError):
        NpuConfig().rows = 3


def test_toml_round_trip(tmp_path):
    path = tmp_path / "npu.toml"
    path.write_text("[npu]\nrows = 4\ncols = 8\nrequant_lanes = 4\n")
    assert NpuConfig.from_toml(path) == NpuConfig(rows=4, cols=8, requant_lanes=4)
    path.write_text("rows = 2\n")
    assert NpuConfig.from_toml(path).rows == 2


@pytest.mark.parametrize("text, message", [
    ("rows = [", r"is not valid TOML"),
    ("rowz = 4", r"unknown parameter\(s\) rowz"),
    ("rows = 100", r"rows must be between 1 and 64, not 100"),
])
def test_bad_toml(tmp_path, text, message):
    path = tmp_path / "npu.toml"
    path.write_text(text)
    with pytest.raises(ValueError, match=message):
        NpuConfig.from_toml(path)


def test_missing_toml(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        NpuConfig.from_toml(tmp_path / "nope.toml")


def test_requant_overlap_is_read_back_from_the_npu_and_given_on_the_command_line():
    from npugen.cli import add_config_flags, config_from_args
    from npugen.memory_map import config_from_identity, identity_words

    config = NpuConfig(rows=4, cols=8, requant_overlap=True)
    assert config_from_identity(identity_words(config)) == config
    assert config.describe().endswith(", requant overlap")
    parser = argparse.ArgumentParser()
    add_config_flags(parser)
    args = parser.parse_args(["--rows", "4", "--cols", "8", "--requant-overlap", "yes"])
    assert config_from_args(args) == config
    with pytest.raises(SystemExit) as stop:
        parser.parse_args(["--requant-overlap", "maybe"])
    assert stop.value.code == 2


def test_line_buffers_are_read_back_and_the_default_lanes_divide_the_array():
    from npugen.memory_map import config_from_identity, identity_words

    config = NpuConfig(rows=12, cols=12, line_buffer_depth=64)
    assert config.requant_lanes == 6 and config.depthwise_groups == 3
    assert NpuConfig(rows=8, cols=8, line_buffer_depth=16).depthwise_groups == 2
    assert NpuConfig(rows=8, cols=8).depthwise_groups == 0
    assert config_from_identity(identity_words(config)) == config
    assert config.describe().endswith(", depthwise mode (rows of 64)")


def test_options_for_the_up5k_are_read_back_and_an_older_identity_is_named():
    """load_skew, max_pooling and adds travel in the identity block; an identity block
    of another length (a bitstream of an older npugen) is refused saying what to do."""
    from npugen.memory_map import config_from_identity, identity_words

    config = NpuConfig(rows=4, cols=4, load_skew=False, max_pooling=False, adds=False)
    assert config_from_identity(identity_words(config)) == config
    assert config.describe().endswith(", no load skew, no max pooling, no adds")
    assert not config.max_combine and not config.requant_to_acc
    assert not config.requant_from_map
    assert NpuConfig(feature_maps=False).describe().count("no max pooling") == 0
    with pytest.raises(ValueError, match="the identity block has 25 config words, this "
                                         "host expects 28: rebuild the bitstream"):
        config_from_identity(identity_words(config)[:-3])
    with pytest.raises(TypeError, match="max_pooling must be true or false, not 1"):
        NpuConfig(max_pooling=1)
    serial = config.replace(requant_serial_bits=4, activity_counters=False,
                            link_error_counters=False, weight_banks=1)
    assert config_from_identity(identity_words(serial)) == serial
    assert serial.requant_product_cycles == 8 and config.requant_product_cycles == 1
    assert serial.describe().endswith(
        ", cycles counter only, no link error counters, one weight bank, serial requantizer "
        "product (4 bits a cycle, 8 cycles a channel)")
    with pytest.raises(ValueError, match="weight_banks must be 1 or 2, not 3"):
        NpuConfig(weight_banks=3)
    segmented = config.replace(weight_segments=2)
    assert config_from_identity(identity_words(segmented)) == segmented
    assert segmented.load_rows == 2 and config.load_rows == 4
    assert segmented.describe().endswith(", no adds, weights loaded in 2 segments (2 cycles "
                                         "a tile)")
    for segments, rows in ((3, 4), (8, 4), (2, 6)):
        with pytest.raises(ValueError, match=(
                f"weight_segments must be 1 or a power of two dividing rows, on an array "
                f"whose rows are a power of two .*, not {segments} with rows = {rows}")):
            NpuConfig(rows=rows, weight_segments=segments)
    for what, changes in (("weight_banks = 1", {"weight_banks": 1}),
                          ("row_broadcast", {"row_broadcast": True, "load_skew": False})):
        with pytest.raises(ValueError, match=f"weight_segments = 2 cannot go with {what}: "
                                             "set weight_segments = 1"):
            NpuConfig(weight_segments=2, **changes)
    broadcast = config.replace(row_broadcast=True)
    assert config_from_identity(identity_words(broadcast)) == broadcast
    assert broadcast.skew_cols == 1 and config.skew_cols == 4
    assert broadcast.describe().endswith(", activations broadcast along the rows, no max "
                                         "pooling, no adds")
    with pytest.raises(ValueError, match=r"row_broadcast = true .* set load_skew = false"):
        NpuConfig(row_broadcast=True)
    single_port = config.replace(single_port_activations=True)
    assert config_from_identity(identity_words(single_port)) == single_port
    assert single_port.describe().endswith(", single-port activations")
    with pytest.raises(ValueError, match=r"single_port_activations = true .* set "
                                         "requant_overlap = false"):
        NpuConfig(single_port_activations=True, requant_overlap=True)
    with pytest.raises(ValueError, match=r"requant_serial_bits=4 \(a serial requantizer "
                                         r"product\) has no path back into the accumulators, "
                                         "which adds need; set adds = false"):
        NpuConfig(requant_serial_bits=4)
    with pytest.raises(ValueError, match=r"requant_serial_bits must be 0 \(products in DSP "
                                         r"blocks\) or 1 to 15 .*, not 16"):
        NpuConfig(accumulator_width=16, feature_maps=False, requant_serial_bits=16)


def test_the_depthwise_tap_row_completes_the_last_group_of_three_rows():
    """On 5 or 8 rows with line buffers the tap row makes one more group (an 8×8: three,
    a 3×3 kernel in one pass); other shapes, and what it cannot go with, are refused by
    name."""
    from npugen.memory_map import config_from_identity, identity_words

    tap = NpuConfig(line_buffer_depth=16, depthwise_tap_row=True)
    assert (tap.array_rows, tap.depthwise_groups) == (9, 3)
    assert NpuConfig(line_buffer_depth=16).depthwise_groups == 2
    assert NpuConfig(rows=5, cols=5, line_buffer_depth=8,
                     depthwise_tap_row=True).depthwise_groups == 2
    assert config_from_identity(identity_words(tap)) == tap
    assert "depthwise mode (rows of 16, a tap row)" in tap.describe()
    for changes in ({"rows": 6, "cols": 6}, {"rows": 11, "cols": 11}, {"line_buffer_depth": 0}):
        with pytest.raises(ValueError, match="depthwise_tap_row = true completes the depthwise "
                                             "mode's last group .* set depthwise_tap_row = "
                                             "false"):
            NpuConfig(**{"line_buffer_depth": 16, "depthwise_tap_row": True, **changes})
    for what, changes in (("weight_banks = 1", {"weight_banks": 1}),
                          ("row_broadcast", {"row_broadcast": True, "load_skew": False})):
        with pytest.raises(ValueError, match=f"depthwise_tap_row = true cannot go with {what}"):
            NpuConfig(line_buffer_depth=16, depthwise_tap_row=True, **changes)


def test_rescale_tables_need_the_add_path_beside_the_requantizer_and_are_read_back():
    """rescale_tables (TABLE, RESCALE) needs adds and requant_overlap on a square array,
    and says which setting is missing; it travels in the identity block."""
    from npugen.memory_map import config_from_identity, identity_words

    config = NpuConfig(rows=4, cols=4, requant_overlap=True, rescale_tables=True)
    assert config_from_identity(identity_words(config)) == config
    assert "rescale tables" in config.describe()
    assert config.table_entries == 256 and config.table_param_words == 64
    assert config.table_load_cycles == 512
    # Lanes that do not divide the entries: the last word's lanes past them are skipped.
    odd = NpuConfig(rows=6, cols=6, requant_lanes=6, requant_overlap=True,
                    rescale_tables=True)
    assert odd.table_param_words == 43 and odd.table_load_cycles == 2 * 43 * 6
    for changes, named in (({"requant_overlap": False}, "requant_overlap = false"),
                           ({"adds": False}, "adds = false"),
                           ({"feature_maps": False}, "feature_maps = false"),
                           ({"cols": 8}, "on 4×8")):
        with pytest.raises(ValueError, match=f"rescale_tables = true .*{named}.*set "
                                             "rescale_tables = false"):
            config.replace(**changes)


def test_rescale_tables_refuse_wide_inputs_and_too_few_parameter_words():
    """The tables hold 2^input_width entries in every column, loaded from parameter
    words: more than 8-bit inputs, or fewer parameter words than a TABLE reads, are
    refused by name."""
    base = dict(rows=4, cols=4, requant_overlap=True, rescale_tables=True)
    with pytest.raises(ValueError, match="at most 8-bit inputs, not input_width = 12"):
        NpuConfig(input_width=12, accumulator_width=32, **base)
    with pytest.raises(ValueError, match="loads its tables from 64 parameter words .256 "
                                         "entries over 4 lanes., param_depth is 32"):
        NpuConfig(param_depth=32, **base)
    assert NpuConfig(input_width=4, weight_width=4, accumulator_width=16, param_depth=16,
                     **base).table_param_words == 4
