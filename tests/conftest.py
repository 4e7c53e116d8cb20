import os
from pathlib import Path

import pytest

from npugen.sim.runner import SIMULATORS, simulator_available

# One build cache for the whole run (CI keeps it inside the checkout).
os.environ.setdefault("NPUGEN_BUILD", str(Path(__file__).resolve().parents[1] / "build"))


def available_simulators() -> list:
    params = []
    for name in SIMULATORS:
        marks = [] if simulator_available(name) else [
            pytest.mark.skip(reason=f"{name} is not installed")]
        params.append(pytest.param(name, marks=marks, id=name))
    return params
