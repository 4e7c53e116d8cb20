"""``npugen sweep``: the grid, its errors, caching and resuming, the executors, the outputs.

Place and route takes minutes a point, so these sweeps use points the resource estimate
refuses before any tool runs (an 8×8 array on the iCEBreaker's 8 DSPs): they go through
the same pool, cache, CSV and plot as built points. tests/test_boards.py builds real ones.
"""

import csv
import json
from pathlib import Path

import pytest

from npugen.cli import main
from npugen.sweep import (
    RECORD_VERSION,
    SweepError,
    evaluate_point,
    load_grid,
    pareto_front,
    run_sweep,
)

REFUSED_GRID = """
[sweep]
boards = ["icebreaker", "tang-nano-9k"]
seeds = [1, 2]
workload = [64, 32, 48]

[grid]
rows = [8, 12]

[grid.icebreaker]
cols = [8]

[grid.tang-nano-9k]
cols = [16]
"""


def write(tmp_path, text, name="grid.toml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_grid_is_the_product_over_boards_and_seeds(tmp_path):
    points = load_grid(write(tmp_path, REFUSED_GRID))
    assert len(points) == 2 * 2 * 2  # boards × rows × seeds (one cols value each)
    icebreaker = [p for p in points if p.board == "icebreaker"]
    assert {(p.config.rows, p.config.cols, p.seed) for p in icebreaker} == {
        (8, 8, 1), (8, 8, 2), (12, 8, 1), (12, 8, 2)}
    # The rest of each config is the board's default.
    assert all(p.config.single_port_activations and p.config.weight_depth == 16384
               for p in icebreaker)
    assert len({p.key() for p in points}) == len(points)
    assert points[0].workload == (64, 32, 48)


@pytest.mark.parametrize("text, words", [
    ('[sweep]\nboards = ["nope"]', ["unknown board 'nope'", "icebreaker"]),
    ('[sweep]\nboards = ["icebreaker"]\n[grid]\nrowz = [2]', ["unknown NpuConfig field 'rowz'"]),
    ('[sweep]\nboards = ["icebreaker"]\n[grid]\nrows = 2', ["grid rows must be a non-empty list",
                                                            "2"]),
    ('[sweep]\nboards = ["icebreaker"]\n[grid]\nrows = [0]', ["rows must be", "0"]),
    ('[sweep]\nboards = ["icebreaker"]\nworkload = [1, 2]', ["workload must be [M, K, N]"]),
    ('[sweep]\nboards = ["icebreaker"]\nseeds = [-1]', ["seeds must be a list"]),
    ('[sweep]\nboards = ["icebreaker"]\nsimulate = "spice"', ["simulate must be", "'spice'"]),
    ('[sweep]\nboards = ["icebreaker"]\n[grid.ulx3s-85f]\nrows = [2]',
     ["[grid.ulx3s-85f] names a board that is not in [sweep] boards"]),
    ('[sweep]\nboards = ["icebreaker"]\n[extra]', ["unknown table(s) extra"]),
    ("[sweep\n", ["is not valid TOML"]),
])
def test_bad_grids_are_named(tmp_path, capsys, text, words):
    path = write(tmp_path, text)
    with pytest.raises(SweepError) as error:
        load_grid(path)
    for word in words:
        assert word in str(error.value)
    assert main(["sweep", str(path)]) == 2
    assert words[0] in capsys.readouterr().err


def test_missing_grid_file_is_exit_2(tmp_path, capsys):
    assert main(["sweep", str(tmp_path / "none.toml")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_sweep_caches_and_resumes(tmp_path):
    points = load_grid(write(tmp_path, REFUSED_GRID))
    out = tmp_path / "out"
    lines = []
    first = run_sweep(points, out, jobs=2, progress=lines.append)
    assert [r["cached"] for r in first] == [False] * len(points)
    assert all(r["status"] == "does not fit" and "SB_MAC16" in r["reason"]
               for r in first if r["board"] == "icebreaker")
    assert all(r["status"] == "does not fit" and "MULT9X9" in r["reason"]
               for r in first if r["board"] == "tang-nano-9k")
    # The workload's cycles come from the cycle model even for a point that cannot build.
    assert all(r["workload_cycles"] > 64 * 32 * 48 / r["macs_per_cycle"] for r in first)
    assert "8 to run" in lines[0]
    # Interrupted: one result lost. Only that point runs again.
    lost = out / "points" / points[3].key() / "result.json"
    lost.unlink()
    lines.clear()
    second = run_sweep(points, out, jobs=1, progress=lines.append)
    assert [r["cached"] for r in second] == [i != 3 for i in range(len(points))]
    assert "7 cached, 1 to run" in lines[0]
    assert [r["key"] for r in second] == [p.key() for p in points]
    with open(out / "sweep.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [row["key"] for row in rows] == [p.key() for p in points]
    assert rows[0]["status"] == "does not fit" and rows[0]["board"] == "icebreaker"
    assert json.loads((out / "sweep.json").read_text())["points"][0]["key"] == points[0].key()
    assert (out / "pareto.png").read_bytes().startswith(b"\x89PNG")


@pytest.mark.slow
def test_sweep_simulates_the_workload_on_the_rtl(tmp_path):
    grid = write(tmp_path, '[sweep]\nboards = ["icebreaker"]\nworkload = [9, 8, 7]\n'
                           'simulate = "verilator"\n[grid]\nrows = [4]\ncols = [4]\n'
                           'requant_serial_bits = [0]\n')
    (point,) = load_grid(grid)
    assert point.simulate == "verilator"
    (record,) = run_sweep([point], tmp_path / "out", jobs=1)
    # 16 products and the requantizer's 4 on 8 DSPs: no build
    assert record["status"] == "does not fit"
    assert not record["deepened"]  # the board's own memories hold this GEMM
    assert record["rtl_cycles"] == record["workload_cycles"] and record["rtl_bit_exact"]


def test_sweep_on_a_local_dask_cluster(tmp_path):
    pytest.importorskip("dask.distributed")
    points = load_grid(write(tmp_path, REFUSED_GRID))[:3]
    records = run_sweep(points, tmp_path / "out", jobs=2, scheduler="local")
    assert [r["key"] for r in records] == [p.key() for p in points]
    assert all(r["status"] == "does not fit" and not r["cached"] for r in records)


def test_sweep_through_a_dask_scheduler_address(tmp_path, capsys):
    """The path a farm takes: a scheduler at tcp://HOST:PORT; its workers evaluate in their
    own temporary folders and the cache is written here."""
    distributed = pytest.importorskip("dask.distributed")
    path = write(tmp_path, REFUSED_GRID)
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                  dashboard_address=None) as cluster:
        assert cluster.scheduler_address.startswith("tcp://")
        status = main(["sweep", str(path), "-o", str(tmp_path / "out"), "--scheduler",
                       cluster.scheduler_address, "--json"])
    assert status == 1  # nothing built: every point was refused by the estimate
    records = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["points"]
    assert len(records) == 8 and all(r["status"] == "does not fit" for r in records)
    assert len(list((tmp_path / "out" / "points").glob("*/result.json"))) == 8


@pytest.mark.slow  # waits out dask's connection timeout
def test_unreachable_dask_scheduler_is_exit_2(tmp_path, capsys):
    pytest.importorskip("dask.distributed")
    path = write(tmp_path, REFUSED_GRID)
    status = main(["sweep", str(path), "-o", str(tmp_path / "out"),
                   "--scheduler", "tcp://127.0.0.1:9"])
    assert status == 2
    assert "cannot reach the Dask scheduler 'tcp://127.0.0.1:9'" in capsys.readouterr().err


def test_dry_run_lists_points(tmp_path, capsys):
    assert main(["sweep", str(write(tmp_path, REFUSED_GRID)), "--dry-run"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 8 and "icebreaker 8x8" in out[0]


def test_pareto_front():
    # (cost, value): the third is beaten by the first (cheaper and faster); ties are kept.
    assert pareto_front([(10, 1.0), (20, 2.0), (15, 0.5), (20, 2.0), (5, 0.1)]) == [
        True, True, False, True, True]


def test_project_grid_loads():
    points = load_grid(Path(__file__).parents[1] / "benchmarks" / "sweep.toml")
    assert len(points) >= 6 and len({p.board for p in points}) == 2


def fitting_point(tmp_path):
    """A point the estimate lets through, so evaluate_point reaches the build."""
    grid = write(tmp_path, '[sweep]\nboards = ["orangecrab-25f"]\nworkload = [8, 8, 8]\n'
                           '[grid]\nrows = [2]\ncols = [2]\nline_buffer_depth = [0]\n',
                 "fits.toml")
    (point,) = load_grid(grid)
    return point


def test_an_unexpected_error_is_the_points_result(tmp_path, monkeypatch):
    import npugen.boards.build as build

    def broken(*args, **kwargs):
        raise RuntimeError("the tool vanished")

    monkeypatch.setattr(build, "build_board", broken)
    record = evaluate_point(fitting_point(tmp_path), str(tmp_path / "point"))
    assert record["status"] == "error"
    assert record["reason"] == "RuntimeError: the tool vanished"
    assert record["record_version"] == RECORD_VERSION


def test_a_failed_retry_does_not_read_the_earlier_report(tmp_path, monkeypatch):
    import npugen.boards.build as build

    folder = tmp_path / "point"
    folder.mkdir()
    (folder / "report.json").write_text(json.dumps({"fmax_mhz": 99.0, "timing_met": True}))

    def failing(board, config, directory, **kwargs):
        raise build.BuildFailed(f"the build failed: see {directory}/build.log")

    monkeypatch.setattr(build, "build_board", failing)
    record = evaluate_point(fitting_point(tmp_path), str(folder))
    assert record["status"] == "failed" and "fmax_mhz" not in record
    assert record["reason"] == "the build failed: see build.log"  # no local folder


def test_damaged_or_older_cached_results_are_redone(tmp_path):
    points = load_grid(write(tmp_path, REFUSED_GRID))[:3]
    out = tmp_path / "out"
    run_sweep(points, out, jobs=1)
    (out / "points" / points[0].key() / "result.json").write_text("{not json")
    older = out / "points" / points[1].key() / "result.json"
    older.write_text(json.dumps({**json.loads(older.read_text()), "record_version": 1}))
    records = run_sweep(points, out, jobs=1)
    assert [r["cached"] for r in records] == [False, False, True]


def test_a_workload_no_memory_holds_is_refused(tmp_path):
    path = write(tmp_path, '[sweep]\nboards = ["icebreaker"]\nworkload = [70000, 8, 8]\n')
    with pytest.raises(SweepError, match=r"workload \[70000, 8, 8\] is too large"):
        load_grid(path)
