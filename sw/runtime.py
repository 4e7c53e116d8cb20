"""Running a compiled program: quantize the input, run batch after batch on a target,
dequantize the output. Targets: the golden model, the RTL, a virtual board, a board, each
a :class:`~npugen.target.Target` that :func:`open_target` opens by name; the runtime is
the one module that chooses among them (and so the one that imports the driver)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np

from .config import NpuConfig
from .golden import Counters
from .job import Job, JobResult
from .memory_map import Region
from .program import Program
from .target import GoldenTarget, Target, check_config, same_image

__all__ = ["RunResult", "run", "program_job", "program_jobs", "quantize_input", "TARGETS",
           "check_target", "open_target", "apply_host_ops", "float_softmax"]

TARGETS = ("golden", "rtl", "sim")  # or a device URL


@dataclass
class RunResult:
    """What :func:`run` returns: the outputs of every input and the runs' counters."""

    output: np.ndarray            # float32, batch-first, the model's output shape and layout
    quantized_output: np.ndarray  # int8 (batch, features), after any host operators
    counters: Counters            # summed over all runs
    runs: int                     # runs, each of up to ``batch`` inputs (and a job a stage)
    inferences: int               # inputs run

    @property
    def cycles_per_inference(self) -> float:
        """Cycles of all runs over the inputs (a last, partial run counts whole)."""
        return self.counters.cycles / self.inferences

    def stats(self, program: Program) -> dict:
        """Figures of this result: ``cycles`` and ``utilization`` over the inferences
        actually run (a last run with fewer inputs than the batch costs a whole run);
        ``cycles_full_batch`` and ``utilization_full_batch`` as if every run were full;
        ``cycles_per_run``; the summed counters as ``total_*``."""
        ideal = program.macs_per_inference / program.config.macs_per_cycle
        total_cycles = self.counters.cycles
        per_run_cycles = total_cycles / self.runs if self.runs else 0.0
        return {
            "inferences": self.inferences, "runs": self.runs, "batch": program.batch,
            "cycles": total_cycles / self.inferences if self.inferences else 0.0,
            "utilization": ideal * self.inferences / total_cycles if total_cycles else 0.0,
            "cycles_per_run": per_run_cycles,
            "cycles_full_batch": per_run_cycles / program.batch,
            "utilization_full_batch": (ideal * program.batch / per_run_cycles
                                       if per_run_cycles else 0.0),
            "macs": program.macs_per_inference,
            **{f"total_{k}": v for k, v in self.counters.as_dict().items()},
        }


#: pyserial's URL schemes (serial.serial_for_url), which a device target may use.
SERIAL_URL_SCHEMES = ("socket", "rfc2217", "loop", "spy", "alt", "hwgrep", "cp2110")


def check_target(target: str, baud: int | None = None) -> None:
    """Refuse a target that is not golden, rtl, sim or a device URL, before any work, and
    a ``baud`` for a target that has no baud rate.

    Device URLs: a serial port (``/dev/ttyUSB1``, ``COM3``, or an existing character
    device), ``socket://HOST:PORT`` or another of pyserial's URLs (``loop://``...).
    Raises ``ValueError`` echoing the target.
    """
    _check_target_name(target)
    if baud is None:
        return
    if baud <= 0:
        raise ValueError(f"baud must be a positive number of bits a second, not {baud}")
    if target in TARGETS or target.startswith("socket://"):
        where = {"golden": "the golden model has no link",
                 "rtl": "the RTL testbench loads its memories through the host port",
                 "sim": "the virtual board's UART runs at a few clock cycles a bit",
                 }.get(target, "a TCP socket carries bytes, not bits")
        raise ValueError(f"a baud rate ({baud}) sets a serial port's speed, and target "
                         f"{target!r} has none ({where}); give --baud only with a serial "
                         f"port such as /dev/ttyUSB1")


def _check_target_name(target: str) -> None:
    import os
    import re
    import stat

    if target in TARGETS:
        return
    scheme, separator, rest = target.partition("://")
    if separator and scheme in SERIAL_URL_SCHEMES:
        if scheme in ("socket", "rfc2217"):
            host, _, port = rest.split("/")[0].rpartition(":")
            if not host or not port.isdigit() or not 1 <= int(port) <= 65535:
                raise ValueError(f"target {target!r}: a {scheme}:// URL needs HOST:PORT with "
                                 f"a port from 1 to 65535, e.g. {scheme}://127.0.0.1:5555")
        return
    if target.startswith("/dev/") or re.fullmatch(r"COM\d+", target):
        return
    try:
        if stat.S_ISCHR(os.stat(target).st_mode):   # e.g. a socat pty's link
            return
    except (OSError, ValueError):
        pass
    raise ValueError(f"target {target!r} is not golden, rtl, sim or a device URL (a serial "
                     f"port such as /dev/ttyUSB1, socket://HOST:PORT, loop://)")


@contextlib.contextmanager
def open_target(target: str, config: NpuConfig, *, simulator: str = "verilator",
                baud: int | None = None) -> Iterator[Target]:
    """The :class:`~npugen.target.Target` named ``target``, open for a ``with`` block
    (a device is closed after it), nothing loaded yet:

    - ``"golden"``: a :class:`~npugen.target.GoldenTarget` of ``config``;
    - ``"rtl"``: a :class:`~npugen.sim.runner.RtlTarget` of ``config`` on ``simulator``;
    - ``"sim"``: a virtual board of ``config`` on ``simulator``, started here and stopped
      after, and any other device URL: an open :class:`~npugen.driver.Device` (it reports
      its own configuration; loading a program compiled for another is refused).

    ``baud``: a serial port's rate (default the driver's, 115,200), the one the board's
    SoC was built for (``npugen build --baud``).

    Raises ``ValueError`` for a target :func:`check_target` refuses, and
    :class:`~npugen.driver.DeviceError` if a device cannot be opened."""
    check_target(target, baud)
    if target == "golden":
        yield GoldenTarget(config)
    elif target == "rtl":
        from .sim.runner import RtlTarget

        yield RtlTarget(config, simulator=simulator)
    else:
        from .driver import DEFAULT_BAUD, Device

        with Device.open(target, config=config, simulator=simulator,
                         baud=baud or DEFAULT_BAUD) as device:
            yield device


def quantize_input(program: Program, x: np.ndarray) -> np.ndarray:
    """Input (batch, *shape) in the model's type and layout → int8 (batch, features) in
    the NPU's C·H·W order. Float values are quantized with the input's scale and zero
    point (as the model's framework does: TFLite rounds half away from zero, in float32);
    integer values are taken as they are where the model's input is int8."""
    x = np.asarray(x)
    expected = tuple(program.input.shape)
    if x.ndim < 1 or tuple(x.shape[1:]) != expected:
        raise ValueError(f"input must have shape (batch, {', '.join(map(str, expected))}), "
                         f"not {x.shape}")
    if len(x) == 0:
        raise ValueError(f"input has no rows (shape {x.shape}): give at least one input of "
                         f"shape ({', '.join(map(str, expected))})")
    if np.issubdtype(x.dtype, np.integer):
        if program.input.dtype != "int8":
            raise ValueError(f"the model's input is {program.input.dtype}; give floating "
                             f"point values, not {x.dtype}")
        if x.min() < -128 or x.max() > 127:
            bad = int(x[(x < -128) | (x > 127)].flat[0])
            raise ValueError(f"int8 input value {bad} is outside -128 to 127")
        q = x.astype(np.int64)
    elif not np.issubdtype(x.dtype, np.floating):
        raise ValueError(f"input must be floating point (float32), or int8 for a model with "
                         f"an int8 input, not {x.dtype}")
    elif not np.all(np.isfinite(x)):
        raise ValueError("input contains NaN or infinite values")
    elif program.framework == "tflite":
        from .tflite_kernels import quantize

        q = quantize(x, program.input.scale, program.input.zero_point).astype(np.int64)
    else:
        q = np.round(x.astype(np.float64) / program.input.scale) + program.input.zero_point
        q = np.clip(q, -128, 127).astype(np.int64)
    return program.input.to_npu_order(q).astype(np.int64)


def apply_host_ops(program: Program, quantized: np.ndarray) -> tuple[np.ndarray, float, int]:
    """The NPU's int8 output (batch, features, model layout) through the program's host
    operators; returns the result and its scale and zero point."""
    scale, zero_point = program.output.scale, program.output.zero_point
    for op in program.host_ops:
        rows = quantized.reshape(len(quantized), -1)
        if op["op"] == "softmax":
            from .tflite_kernels import softmax_int8

            rows = softmax_int8(rows.astype(np.int8), op["input_scale"], op["beta"])
        elif op["op"] == "float_softmax":
            rows = float_softmax(rows, scale, zero_point, op["output_scale"],
                                 op["output_zero_point"])
        else:
            raise ValueError(f"the program asks the host for operator {op['op']!r}, which "
                             f"this npugen does not know; recompile the model")
        quantized = rows.reshape(quantized.shape)
        scale, zero_point = op["output_scale"], op["output_zero_point"]
    return quantized, scale, zero_point


def float_softmax(q: np.ndarray, input_scale: float, input_zero_point: int,
                  output_scale: float, output_zero_point: int) -> np.ndarray:
    """ONNX's Softmax between a DequantizeLinear and a QuantizeLinear, over the last axis of
    int8 ``q`` (batch, features), in float32 as onnxruntime computes it: x = (q − z)·s,
    exp(x − max x) times the reciprocal of its sum, then rounded half to even at the
    output's scale and zero point."""
    x = (q.astype(np.int32) - np.int32(input_zero_point)).astype(np.float32) \
        * np.float32(input_scale)
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    y = e * (np.float32(1) / e.sum(axis=-1, keepdims=True, dtype=np.float32))
    out = np.rint(y / np.float32(output_scale)) + output_zero_point
    return np.clip(out, -128, 127).astype(np.int8)


def _words(program: Program, features: int) -> int:
    if program.output.map_shape is not None:
        return program.output.feature_map(program.config).data_words
    return -(-features // program.config.rows) * program.batch


@contextlib.contextmanager
def _loaded(program: Program, target: str | Target, simulator: str,
            baud: int | None) -> Iterator[Target]:
    """``target`` itself if it is a Target (the caller loaded the program), else the target
    it names, opened with the program loaded."""
    if not isinstance(target, str):
        yield target
        return
    with open_target(target, program.config, simulator=simulator, baud=baud) as opened:
        opened.load(program)
        yield opened


def program_job(program: Program, rows: np.ndarray, *, load_program: bool = True) -> Job:
    """One run of a program not in stages: (optionally) the program's image, ``batch``
    input rows, the output read. A program in stages takes :func:`program_jobs`."""
    if program.stages:
        raise ValueError(f"the program runs in {len(program.stages)} stages, a job each: "
                         f"use program_jobs")
    config = program.config
    job = Job(config)
    if load_program:
        for region, entry, values in program.segments:
            job.write(region, entry, values)
    _write_input(job, program, rows)
    job.read("output", Region.ACTIVATIONS, program.output.base,
             _words(program, program.output.features))
    return job


def program_jobs(program: Program, rows: np.ndarray) -> list[Job]:
    """The jobs of one run on a target that holds the program (after ``load``): one, with
    the input rows and the output read; for a program in stages, one per stage, each
    writing its stage's image first (the first with the input rows, the last reading the
    output, each after the first :attr:`~npugen.job.Job.follows` the one before)."""
    if not program.stages:
        return [program_job(program, rows, load_program=False)]
    jobs = []
    for number, image in enumerate(program.stages):
        job = Job(program.config, follows=number > 0)
        for region, entry, values in image:
            job.write(region, entry, values)
        if number == 0:
            _write_input(job, program, rows)
        jobs.append(job)
    jobs[-1].read("output", Region.ACTIVATIONS, program.output.base,
                  _words(program, program.output.features))
    return jobs


def _write_input(job: Job, program: Program, rows: np.ndarray) -> None:
    """``rows`` (up to ``batch`` inputs, int8 in NPU order) into the program's input."""
    config = program.config
    if program.input.map_shape is not None:
        job.write(Region.ACTIVATIONS, program.input.base, program.input.pack(config, rows))
    else:
        padded = np.zeros((program.batch,
                           -(-program.input.features // config.rows) * config.rows),
                          dtype=np.int64)
        padded[:len(rows), :program.input.features] = rows
        tiles = padded.reshape(program.batch, -1, config.rows).transpose(1, 0, 2)
        job.write(Region.ACTIVATIONS, program.input.base, tiles.reshape(-1, config.rows))


def _decode(program: Program, words: np.ndarray, count: int) -> np.ndarray:
    if program.output.map_shape is not None:
        fmap = program.output.feature_map(program.config)
        return fmap.unpack(words).reshape(1, -1)[:count, :program.output.features]
    rows = program.config.rows
    tiles = np.asarray(words).reshape(-1, program.batch, rows).transpose(1, 0, 2)
    return tiles.reshape(program.batch, -1)[:count, :program.output.features]


def run(program: Program, x: np.ndarray, *, target: str | Target = "golden",
        simulator: str = "verilator", config: NpuConfig | None = None,
        progress: Callable[[int, int], None] | None = None,
        baud: int | None = None) -> RunResult:
    """Run ``program`` on float input ``x`` (batch, *input shape).

    ``target``: ``"golden"`` (the NumPy model), ``"rtl"`` (the NPU's RTL in a cocotb
    testbench on ``simulator``, memories loaded over the host port), ``"sim"`` (a virtual
    board: the SoC in simulation, through the UART link), a device URL (``/dev/ttyUSB1``,
    ``socket://HOST:PORT``), each opened by :func:`open_target` and the program loaded on
    it; or a :class:`~npugen.target.Target` that holds the program already (a
    :class:`~npugen.target.GoldenTarget`, an open :class:`~npugen.driver.Device`... after
    ``load(program)``): only the inputs are written to it.
    ``config``: the target NPU's configuration, if known; a different one is refused
    (:class:`~npugen.target.ConfigMismatch`).
    ``progress(done, total)`` is called as batches finish. ``baud``: a serial port's rate
    (:func:`open_target`).

    Raises ``ValueError`` for a target name :func:`check_target` refuses or bad input,
    ``TypeError`` for a target that is neither a name nor a Target.
    """
    if isinstance(target, str):
        check_target(target, baud)
    elif baud is not None:
        raise ValueError("baud applies to a target opened by name; an open target has its "
                         "own rate")
    elif not isinstance(target, Target):
        missing = [name for name in ("load", "execute", "execute_many")
                   if not callable(getattr(target, name, None))]
        raise TypeError(f"target must be golden, rtl, sim, a device URL or a Target (such as "
                        f"npugen.GoldenTarget or an open npugen.Device), not an object of "
                        f"type {type(target).__name__}, which has no {', '.join(missing)}")
    check_config(program, config)
    loaded = getattr(target, "loaded", None)
    if not isinstance(target, str) and loaded is not None and not same_image(loaded, program):
        raise ValueError("the target holds another program than the one given to run: "
                         "load this one on it first (target.load(program))")
    q = quantize_input(program, x)
    chunks = [q[i:i + program.batch] for i in range(0, len(q), program.batch)]
    jobs = [job for chunk in chunks for job in program_jobs(program, chunk)]
    per_run = len(program.images())
    results: list[JobResult] = []
    with _loaded(program, target, simulator, baud) as npu:
        for result in npu.execute_many(jobs):
            results.append(result)
            if progress and len(results) % per_run == 0:
                progress(len(results) // per_run, len(chunks))
    # Each run's output is its last job's (its last stage's).
    outputs = [_decode(program, r.outputs["output"], len(chunk))
               for r, chunk in zip(results[per_run - 1::per_run], chunks, strict=True)]
    quantized = np.concatenate(outputs) if outputs else np.zeros((0, program.output.features))
    total = sum((r.counters for r in results),
                Counters().as_counted_by(program.config))
    shaped = program.output.from_npu_order(quantized)
    shaped, scale, zero_point = apply_host_ops(program, shaped)
    real = ((shaped.astype(np.float64) - zero_point) * scale).astype(np.float32)
    return RunResult(real, shaped.reshape(len(q), -1).astype(np.int8), total, len(chunks),
                     len(q))
