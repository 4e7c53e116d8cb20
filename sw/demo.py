"""``npugen demo``: a trained network on the NPU, end to end.

Trains one of :mod:`npugen.train`'s networks on scikit-learn's bundled 8×8 digits (no
download): an MLP (scikit-learn) or, with ``--model cnn``, a small CNN (NumPy). Exports
it to ONNX, quantizes it with calibration images, compiles it, and runs the held-out
images on the golden model and on a target (by default the virtual board).

``--model kws`` (or ``resnet``, ``vww``, ``ad``) runs one of the MLPerf Tiny reference int8
TFLite models (benchmarks/models/mlperf-tiny/) instead: compiled as it is, run on random
int8 inputs (the data sets are not bundled) on the golden model and the target, and
checked against LiteRT's reference kernels where LiteRT is installed.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

from .config import NpuConfig
from .mlperf import MODELS as MLPERF_TINY
from .mlperf import REFERENCE_CONFIG, model_path
from .train import cnn_to_onnx, digits, init_cnn_params, mlp_to_onnx, train_cnn, train_mlp

__all__ = ["train_demo_model", "check_demo_fits", "run_demo", "run_mlperf_demo", "MODELS",
           "MLPERF_DEMOS"]

#: The MLPerf Tiny reference models by demo name (kws, resnet, vww, ad).
MLPERF_DEMOS = {model.demo: key for key, model in MLPERF_TINY.items()}
MODELS = ("mlp", "cnn", *MLPERF_DEMOS)


def _progress(label: str):
    def show(done: int, total: int) -> None:
        width = 30
        filled = width * done // total
        sys.stderr.write(f"\r{label} [{'#' * filled}{'.' * (width - filled)}] {done}/{total}")
        if done == total:
            sys.stderr.write("\n")
        sys.stderr.flush()
    return show


def _describe_layers(model) -> str:
    from .graph import Conv, Dense, Pool

    parts = []
    for layer in model.layers:
        if isinstance(layer, Conv):
            kh, kw = layer.kernel
            parts.append(f"{'dw' if layer.depthwise else ''}conv{kh}×{kw}({layer.out_features})")
        elif isinstance(layer, Pool):
            parts.append("gap" if layer.kind == "global" else f"{layer.kind}pool{layer.kernel}")
        elif isinstance(layer, Dense):
            parts.append(f"dense({layer.out_features})")
    return "-".join(parts)


def train_demo_model(kind: str, folder: Path, hidden: tuple[int, ...] = (64, 32)):
    """Train the demo ``kind`` ("mlp" or "cnn") and export it to ``folder/KIND.onnx``;
    return (onnx path, x_train, x_test, y_test), the inputs shaped for the model."""
    x_train, x_test, y_train, y_test = digits()
    path = Path(folder) / f"{kind}.onnx"
    if kind == "cnn":
        cnn_to_onnx(train_cnn(x_train, y_train), path)
        x_train, x_test = x_train.reshape(-1, 1, 8, 8), x_test.reshape(-1, 1, 8, 8)
    else:
        mlp_to_onnx(train_mlp(x_train, y_train, hidden), path)
    return path, x_train, x_test, y_test


def check_demo_fits(kind: str, config: NpuConfig, hidden: tuple[int, ...] = (64, 32)) -> None:
    """Compile an untrained network of the demo's shapes for ``config``: a config too
    small for it raises :class:`~npugen.schedule.DoesNotFit` before any training."""
    import tempfile
    from types import SimpleNamespace

    from .compiler import compile_model
    from .importers import load_onnx

    rng = np.random.default_rng(0)
    x = digits()[0][:16]
    with tempfile.TemporaryDirectory(prefix="npugen-demo-") as folder:
        path = Path(folder) / f"{kind}.onnx"
        if kind == "cnn":
            cnn_to_onnx(init_cnn_params(rng=rng), path)
            x = x.reshape(-1, 1, 8, 8)
        else:
            sizes = (x.shape[1], *hidden, 10)
            shapes = list(zip(sizes, sizes[1:], strict=False))
            untrained = SimpleNamespace(
                coefs_=[rng.standard_normal(shape) / 8 for shape in shapes],
                intercepts_=[np.zeros(shape[1]) for shape in shapes])
            mlp_to_onnx(untrained, path)
        compile_model(load_onnx(path), config, calibration=x)


def _run_on_target(program, x: np.ndarray, golden, target: str, simulator: str,
                   record: dict, baud: int | None):
    """Run ``x`` on ``target`` and add to ``record`` whether it is bit-exact with the
    golden run and its counters equal the cycle model's; returns (label, result)."""
    from .runtime import run

    label = (f"virtual board ({simulator})" if target == "sim" else
             f"RTL ({simulator})" if target == "rtl" else target)
    npu = run(program, x, target=target, simulator=simulator, baud=baud,
              progress=_progress(f"running on {label}"))
    record["bit_exact"] = bool(np.array_equal(npu.quantized_output, golden.quantized_output))
    record["cycles_match_model"] = npu.counters == golden.counters
    record.update(npu.stats(program))
    return label, npu


def run_demo(*, target: str = "sim", simulator: str = "verilator",
             config: NpuConfig | None = None, workdir: str | Path = "build/demo",
             hidden: tuple[int, ...] = (64, 32), model_kind: str = "mlp",
             baud: int | None = None) -> dict:
    """Train, export, compile, run; print the figures and return them. ``baud``: a serial
    port target's rate."""
    from .compiler import compile_model
    from .importers import load_onnx
    from .runtime import check_target, run

    if model_kind not in MODELS:
        raise ValueError(f"model must be one of {', '.join(MODELS)}, not {model_kind!r}")
    check_target(target, baud)   # before the training, which takes a while
    config = config or NpuConfig()
    check_demo_fits(model_kind, config, hidden)
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    onnx_path, x_train, x_test, y_test = train_demo_model(model_kind, workdir, hidden)
    model = load_onnx(onnx_path)
    float_accuracy = float(np.mean(model.forward(x_test).argmax(1) == y_test))
    program = compile_model(model, config, calibration=x_train[:256])
    program_path = workdir / f"{model_kind}.npu"
    program.save(program_path)
    if model_kind == "cnn":
        shape = _describe_layers(model)
    else:
        shape = "-".join(str(d) for d in (model.layers[0].in_features,
                                          *(layer.out_features for layer in model.layers)))
    print(f"trained {model_kind.upper()} {shape} on {len(x_train)} digits; exported "
          f"{onnx_path}; compiled {program_path} for a {config.describe()} NPU "
          f"(batch {program.batch})")
    golden = run(program, x_test, target="golden")
    int8_accuracy = float(np.mean(golden.output.argmax(1) == y_test))
    record = {"model": f"{model_kind.upper()} {shape}", "test_images": len(x_test),
              "float_accuracy": float_accuracy, "int8_accuracy": int8_accuracy,
              **golden.stats(program)}
    if target != "golden":
        label, npu = _run_on_target(program, x_test, golden, target, simulator, record,
                                    baud)
        record["npu_accuracy"] = float(np.mean(npu.output.argmax(1) == y_test))
    record["target"] = target
    record["seconds"] = round(time.perf_counter() - started, 1)
    print(f"accuracy on {len(x_test)} held-out digits: float {float_accuracy:.4f}, "
          f"int8 (golden) {int8_accuracy:.4f}")
    if target != "golden":
        print(f"NPU ({label}) bit-exact with golden: {record['bit_exact']}; "
              f"accuracy {record['npu_accuracy']:.4f}")
    if record["inferences"] == record["runs"] * program.batch:
        print(f"cycles per inference {record['cycles']:.1f} (batch {program.batch}, "
              f"{record['macs']} MACs, utilization {record['utilization']:.3f}); "
              f"{record['seconds']} s")
    else:   # a last run with fewer inputs than the batch costs a whole run
        print(f"cycles per inference {record['cycles']:.1f} over {record['inferences']} "
              f"inputs in {record['runs']} runs of batch {program.batch} "
              f"({record['cycles_full_batch']:.1f} at a full batch: {record['macs']} MACs, "
              f"utilization {record['utilization_full_batch']:.3f}); {record['seconds']} s")
    if "cycles" in program.layers[0]:
        record["layers"] = [{k: layer[k] for k in ("name", "kind", "output", "macs", "cycles",
                                                   "utilization")}
                            for layer in program.layers]
        if program.batch > 1:
            print(f"  per layer: the cycles of a run of {program.batch} inputs, the MACs of "
                  f"one")
        for layer in record["layers"]:
            shape_text = "×".join(map(str, layer["output"]))
            print(f"  {layer['name']:<10} {layer['kind']:<19} → {shape_text:<9} "
                  f"{layer['cycles']:>7} cycles  {layer['macs']:>7} MACs  "
                  f"utilization {layer['utilization']:.3f}")
    return record


def run_mlperf_demo(name: str, *, target: str = "sim", simulator: str = "verilator",
                    config: NpuConfig | None = None, workdir: str | Path = "build/demo",
                    inputs: int = 4, seed: int = 0, baud: int | None = None) -> dict:
    """Compile MLPerf Tiny model ``name`` and run ``inputs`` random int8 inputs on the golden
    model and on ``target`` (``baud``: a serial port's rate); print the figures and return
    them."""
    from .compiler import BATCH_CHOICES, compile_model
    from .runtime import check_target, run
    from .tflite_kernels import litert_reference

    check_target(target, baud)
    if name not in MLPERF_DEMOS:
        raise ValueError(f"model must be one of {', '.join(MLPERF_DEMOS)}, not {name!r}")
    path = model_path(MLPERF_DEMOS[name])
    config = config or REFERENCE_CONFIG
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    program = compile_model(path, config)
    if program.batch > inputs:   # a dense chain: no larger a batch than the inputs run
        program = compile_model(path, config, batch=max(
            batch for batch in BATCH_CHOICES if batch <= inputs))
    program_path = workdir / f"{name}.npu"
    program.save(program_path)
    print(f"compiled {path.name} ({len(program.layers)} layers on the NPU, "
          f"{program.macs_per_inference} MACs; "
          f"{', '.join(op['op'] for op in program.host_ops) or 'nothing'} on the host) to "
          f"{program_path} for a {config.describe()} NPU")
    shape = program.input.shape
    x = np.random.default_rng(seed).integers(-128, 128, size=(inputs, *shape), dtype=np.int8)
    golden = run(program, x, target="golden")
    reference_of = litert_reference(path)
    reference = None if reference_of is None else reference_of(x)
    record = {"model": f"MLPerf Tiny {name} ({path.name})", "inputs": inputs,
              "batch": program.batch, "input": f"random int8 (seed {seed})",
              "equal_to_litert_reference": None if reference is None else bool(
                  np.array_equal(golden.quantized_output, reference)),
              **golden.stats(program)}
    if target != "golden":
        label, _ = _run_on_target(program, x, golden, target, simulator, record, baud)
        print(f"NPU ({label}) bit-exact with golden: {record['bit_exact']}")
    record["target"] = target
    record["seconds"] = round(time.perf_counter() - started, 1)
    agreement = {None: "not checked (LiteRT is not installed)", True: "equal",
                 False: "DIFFERENT"}[record["equal_to_litert_reference"]]
    print(f"outputs against LiteRT's reference kernels: {agreement}")
    print(f"cycles per inference {record['cycles']:.1f} (batch {program.batch}, "
          f"{record['macs']} MACs, utilization {record['utilization']:.3f}); "
          f"{record['seconds']} s")
    record["layers"] = [{k: layer[k] for k in ("name", "kind", "macs", "cycles",
                                               "utilization") if k in layer}
                        for layer in program.layers]
    return record
