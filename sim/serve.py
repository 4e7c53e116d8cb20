"""``npugen serve-sim``: the virtual board, its UART bytes bridged to TCP."""

from __future__ import annotations

import signal
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

from ..config import NpuConfig
from ..hw.implementation import Implementation
from .common import SimulationError
from .runner import build, run_test

__all__ = ["serve", "start_bridge"]

STARTUP_TIMEOUT_SECONDS = 600.0


def start_bridge(simulate: Callable[[dict[str, str], Path], None], scratch: Path,
                 what: str) -> tuple[threading.Thread, int, Path]:
    """Start ``simulate(environment, scratch)`` (a run of ``npugen.sim.tb_board``, the TCP
    bridge) in a thread and wait until it listens; return the thread, the port and the
    stop file (touch it to stop the bridge). Raises ``SimulationError`` with the end of
    ``scratch/sim.log`` if ``what`` does not start."""
    port_file, stop_file = scratch / "port", scratch / "stop"
    outcome: dict[str, BaseException] = {}
    environment = {"NPUGEN_PORT_FILE": str(port_file), "NPUGEN_STOP_FILE": str(stop_file)}

    def run() -> None:
        try:
            simulate(environment, scratch)
        except BaseException as error:  # reported here (SystemExit from cocotb's runner too)
            outcome["error"] = error

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    started = time.monotonic()
    while not port_file.exists():
        if not thread.is_alive() or time.monotonic() - started > STARTUP_TIMEOUT_SECONDS:
            stop_file.touch()
            log = scratch / "sim.log"
            detail = log.read_text()[-3000:] if log.exists() else ""
            raise SimulationError(f"{what} did not start: {outcome.get('error', '')}\n{detail}")
        time.sleep(0.05)
    return thread, int(port_file.read_text()), stop_file


def serve(config: NpuConfig, *, port: int = 0, simulator: str = "verilator",
          primitives: str | Implementation | None = None,
          on_listening: Callable[[int], None] = lambda port: None) -> None:
    """Build and run the virtual board until SIGINT or SIGTERM; call ``on_listening``
    with the TCP port once it accepts connections. ``primitives``: what the SoC is built
    for, a family whose hand-instantiated primitives it uses, as on that family's boards,
    or an ``Implementation`` (a board's, with its DSP budget; see
    :func:`npugen.sim.runner.build`)."""
    build(config, simulator, design="board", primitives=primitives)
    with tempfile.TemporaryDirectory(prefix="npugen-board-") as scratch:

        def simulate(environment: dict[str, str], scratch: Path) -> None:
            run_test(config, simulator=simulator, design="board",
                     test_module="npugen.sim.tb_board", work_dir=scratch, primitives=primitives,
                     extra_env={"NPUGEN_PORT": str(port), **environment})

        stop_file = Path(scratch) / "stop"

        def stop(signum, frame) -> None:
            stop_file.touch()

        previous = {s: signal.signal(s, stop) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            thread, bound, _ = start_bridge(simulate, Path(scratch), "the virtual board")
            on_listening(bound)
            while thread.is_alive():
                thread.join(0.2)
        finally:
            stop_file.touch()
            for s, handler in previous.items():
                signal.signal(s, handler)
