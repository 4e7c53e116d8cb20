import os
from pathlib import Path

import pytest

from npugen.sim.runner import COCOTB_SIMULATORS, simulator_available

# One build cache for the whole run (CI keeps it inside the checkout).
os.environ.setdefault("NPUGEN_BUILD", str(Path(__file__).resolve().parents[1] / "build"))


#: Fixtures that start an RTL simulation (the virtual board on Verilator).
RTL_FIXTURES = {"board", "any_board"}


def pytest_collection_modifyitems(config, items):
    """The fast tier (``pytest -m "not slow"``) is the unit and golden-model tests: a test
    that runs the RTL on a cocotb simulator or on the virtual board is ``slow``, like those
    marked so by hand (board builds, synthesized netlists)."""
    for item in items:
        callspec = getattr(item, "callspec", None)
        on_simulator = callspec is not None and callspec.params.get("simulator") in \
            COCOTB_SIMULATORS
        if on_simulator or RTL_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


def available_simulators() -> list:
    """The cocotb simulators, skipped where not installed (the Amaranth simulator is too
    slow for these tests' workloads; tests/test_pysim.py covers it)."""
    params = []
    for name in COCOTB_SIMULATORS:
        marks = [] if simulator_available(name) else [
            pytest.mark.skip(reason=f"{name} is not installed")]
        params.append(pytest.param(name, marks=marks, id=name))
    return params


def quantize_with_onnxruntime(float_path, qdq_path, samples, *, per_channel: bool) -> None:
    """onnxruntime's quantize_static (QDQ, int8), calibrated one sample at a time."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.items = iter([{"input": samples[i:i + 1]} for i in range(len(samples))])

        def get_next(self):
            return next(self.items, None)

    quantize_static(str(float_path), str(qdq_path), Reader(), quant_format=QuantFormat.QDQ,
                    activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                    per_channel=per_channel)


def reference_session(path):
    """The onnxruntime session every reference comparison uses: CPU, graph optimizations
    off (ORT_DISABLE_ALL). The default level fuses QDQ nodes into int8 kernels (QGemm,
    QLinearConv) whose results depend on the CPU: on x86 with AVX2 but no VNNI they
    saturate 16-bit pair sums and are up to 12 output steps off (issue 19; 35 on the demo
    CNN under `qemu-x86_64 -cpu Haswell`). Unoptimized, onnxruntime runs each node as its
    ONNX definition (DequantizeLinear, float Gemm/Conv, QuantizeLinear rounding once),
    which differs between CPUs at most in float32 summation order."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_DISABLE_ALL
    return onnxruntime.InferenceSession(str(path), sess_options=options,
                                        providers=["CPUExecutionProvider"])


#: How close (in float32 ulps of the value quantized) onnxruntime's float result may come
#: to a rounding tie of a QuantizeLinear before its side of the tie is a matter of float32
#: summation order, which ONNX leaves to the implementation (a Gemm's sum over K terms).
NEAR_TIE_ULPS = 16


def near_tie_samples(qdq_path, x):
    """Per sample: whether a QuantizeLinear inside the QDQ model got a float32 value within
    NEAR_TIE_ULPS of a rounding tie in onnxruntime (reference_session), where another
    float32 summation order may round the other way (e.g. 56.500004 on one CPU and batch
    size, 56.49999 on another)."""
    import numpy as np
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(str(qdq_path))
    graph_inputs = {i.name for i in model.graph.input}
    initializers = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    quantized = [(n.input[0], float(initializers[n.input[1]]))
                 for n in model.graph.node if n.op_type == "QuantizeLinear"
                 and n.input[0] not in graph_inputs and n.input[1] in initializers
                 and initializers[n.input[1]].size == 1]
    existing = {o.name for o in model.graph.output}
    for name, _ in quantized:
        if name not in existing:
            model.graph.output.append(helper.make_tensor_value_info(
                name, onnx.TensorProto.FLOAT, None))
    path = Path(str(qdq_path) + ".near-tie.onnx")
    onnx.save(model, str(path))
    values = reference_session(path).run([name for name, _ in quantized], {"input": x})
    near = np.zeros(len(x), dtype=bool)
    for (_, scale), value in zip(quantized, values, strict=True):
        value = np.asarray(value, dtype=np.float32).reshape(len(x), -1)
        steps = value.astype(np.float64) / scale
        distance = np.abs(steps - np.floor(steps) - 0.5)
        tolerance = NEAR_TIE_ULPS * np.spacing(np.abs(value)).astype(np.float64) / scale
        near |= (distance <= tolerance).any(axis=1)
    return near


def steps_from_onnxruntime(program, qdq_path, x):
    """|npugen's int8 outputs − onnxruntime's on the QDQ model|, in output steps
    (onnxruntime through reference_session: each node as defined, on any CPU).

    A sample whose outputs differ counts as 0 only where onnxruntime's float32 value at
    some QuantizeLinear of that sample lay within NEAR_TIE_ULPS of a rounding tie
    (:func:`near_tie_samples`): ONNX defines no summation order, so either side is its
    definition. At most 1 % of the samples (and at least one) may be excused so."""
    import numpy as np

    from npugen.runtime import run

    ours = run(program, x).quantized_output.astype(np.int64)
    reference = reference_session(qdq_path).run(None, {"input": x})[0]
    theirs = np.round(reference / program.output.scale).astype(np.int64) + \
        program.output.zero_point
    steps = np.abs(ours.reshape(len(x), -1) - theirs.reshape(len(x), -1))
    differing = steps.max(axis=1) > 0
    if differing.any():
        excused = differing & near_tie_samples(qdq_path, x)
        assert excused.sum() <= max(1, len(x) // 100), \
            f"{excused.sum()} of {len(x)} samples differ at a float32 rounding tie"
        steps[excused] = 0
    return steps.reshape(ours.shape)


MLPERF_TINY = Path(__file__).resolve().parents[1] / "benchmarks" / "models" / "mlperf-tiny"


def litert_reference(model):
    """LiteRT's reference kernels for a .tflite model (a path or its bytes): the arithmetic
    npugen reproduces (npugen.tflite_kernels.litert_reference; LiteRT is a test
    dependency, so it must be there)."""
    from npugen.tflite_kernels import litert_reference as reference

    outputs = reference(model)
    assert outputs is not None, "ai-edge-litert is not installed (pip install -e '.[test]')"
    return outputs
