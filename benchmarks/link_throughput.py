"""Upload throughput of the host link as a fraction of the UART's line rate, on the
virtual board (the SoC's real UART, 8N1 at SIM_DIVISOR clock cycles a bit).

    python benchmarks/link_throughput.py [--kib N] [--json]

Elapsed time is read from the device's own UPTIME counter, so the figure is in device
cycles: payload bits × 10/8 × divisor / cycles. A real board has the same frames and
the same engine, at its own baud rate.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

from npugen.config import NpuConfig
from npugen.driver import Device
from npugen.memory_map import Region, address
from npugen.sim.board import SIM_DIVISOR


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kib", type=int, default=64, help="payload to upload (KiB)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    config = NpuConfig()
    words = np.random.default_rng(0).integers(0, 1 << 32, args.kib * 256, dtype=np.uint64)
    region_words = config.weight_depth * 2  # weight entries are two host words
    with Device.open("sim", config=config) as device:
        device.identify()
        started_wall = time.perf_counter()
        before = device.uptime()
        for start in range(0, len(words), region_words):
            device.write(address(Region.WEIGHTS, 0), words[start:start + region_words])
        after = device.uptime()
        wall = time.perf_counter() - started_wall
        retried = device.retried
    cycles = after - before
    payload_bytes = 4 * len(words)
    line_cycles = payload_bytes * 10 * SIM_DIVISOR  # 8N1: ten bit times a byte
    record = {"payload_bytes": payload_bytes, "device_cycles": cycles,
              "divisor": SIM_DIVISOR, "fraction_of_line_rate": line_cycles / cycles,
              "wall_seconds": round(wall, 2), "retried": retried}
    print(f"uploaded {payload_bytes} bytes in {cycles} device cycles: "
          f"{record['fraction_of_line_rate']:.3f} of the line rate "
          f"({wall:.1f} s wall clock on the virtual board, {retried} retries)")
    if args.json:
        print(json.dumps(record))


if __name__ == "__main__":
    main()
