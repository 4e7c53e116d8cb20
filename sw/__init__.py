"""npugen: a generator of neural processing units for FPGA prototyping.

``import npugen`` is light (NumPy only): the gateware is in ``npugen.hw``, the
simulators in ``npugen.sim``, the boards in ``npugen.boards``.
"""

from .compiler import compile_model
from .config import NpuConfig
from .golden import GoldenNpu
from .isa import ISA_VERSION
from .program import Program
from .runtime import open_target, run
from .target import GoldenTarget, Target

__version__ = "0.1.0"
__all__ = ["NpuConfig", "GoldenNpu", "ISA_VERSION", "Program", "compile_model", "run",
           "Target", "GoldenTarget", "RtlTarget", "Device", "open_target", "__version__"]


def __getattr__(name: str):
    # npugen.Device imports the driver (and pyserial), npugen.RtlTarget the simulation
    # runner, on first use only.
    if name == "Device":
        from .driver import Device

        return Device
    if name == "RtlTarget":
        from .sim.runner import RtlTarget

        return RtlTarget
    raise AttributeError(f"module 'npugen' has no attribute {name!r}")
