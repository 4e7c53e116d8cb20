"""Upload throughput of the host link against the UART's line rate, on the virtual board
(the SoC's real UART, 8N1 at SIM_DIVISOR clock cycles a bit).

Elapsed time is read from the device's own UPTIME counter, so the figure is in device
cycles: payload bits × 10/8 × divisor / cycles. A real board has the same frames and the
same engine, at its own baud rate.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from ..config import NpuConfig


def run_link(*, quick: bool, progress: Callable[[str], None], recorded_dir: Path
             ) -> dict[str, Any]:
    """Section ``link``: 64 KiB (``quick``: 4 KiB) of random words written to the weight
    memory of a virtual board of the default :class:`~npugen.config.NpuConfig` (built and
    started here), timed by the device's UPTIME counter. Returns the payload bytes, the
    device cycles they took, the fraction of the line rate reached (payload bytes only),
    the wall time and the requests the driver had to resend. ``recorded_dir`` is not used.

    Raises :class:`~npugen.driver.DeviceError` (a ``RuntimeError``) if the virtual board
    does not start or the link fails."""
    from ..driver import Device
    from ..memory_map import Region, address, memories
    from ..sim.board import SIM_DIVISOR

    kib = 4 if quick else 64
    progress(f"link: uploading {kib} KiB to the virtual board")
    config = NpuConfig()
    words = np.random.default_rng(0).integers(0, 1 << 32, kib * 256, dtype=np.uint64)
    region_words = config.weight_depth * memories(config)[Region.WEIGHTS].stride
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
    return {"payload_bytes": payload_bytes, "device_cycles": cycles, "divisor": SIM_DIVISOR,
            "fraction_of_line_rate": round(line_cycles / cycles, 4),
            "wall_seconds": round(wall, 2), "retried": retried}
