"""``npugen bench --quick``: every comparison the benchmark report promises is in its JSON,
measured, and the report and its plots are written. The figures themselves are
benchmarks, not test targets; here only their presence and their checks (bit-exact,
cycles equal to the model, SCALE-Sim equal to its formula) are asserted."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from npugen.cli import main
from npugen.sim.runner import COCOTB_SIMULATORS, simulator_available

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow  # runs every bench section, RTL included
def test_bench_quick(tmp_path):
    results, docs = tmp_path / "results", tmp_path / "BENCHMARKS.md"
    run = subprocess.run(
        [sys.executable, "-m", "npugen", "bench", "--quick", "--json", "--results",
         str(results), "--docs", str(docs), "--recorded", str(ROOT / "benchmarks" / "results")],
        capture_output=True, text=True, cwd=ROOT)
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads(run.stdout.strip().splitlines()[-1])
    assert set(report) == {"gemm", "simspeed", "boards", "sweep", "e2e", "mlperf", "cnn",
                           "compile", "link"}
    for name, section in report.items():
        assert section["quick"] and section["date"] and section["machine"]["cores"], name
        assert json.loads((results / f"{name}.json").read_text())["section"] == name

    gemm = report["gemm"]["records"]
    assert {(r["rows"], r["cols"]) for r in gemm} == {(4, 4), (8, 8)} and len(gemm) >= 8
    for r in gemm:
        assert r["bit_exact"] and r["cycles"] == r["model_cycles"]
        assert r["scalesim_cycles"] == r["scalesim_formula_cycles"]  # the package ran
        assert r["ratio_to_scalesim"] == round(r["cycles"] / r["scalesim_cycles"], 4)

    speeds = report["simspeed"]["records"]
    simulators = {r["simulator"] for r in speeds}
    installed = {name for name in COCOTB_SIMULATORS if simulator_available(name)}
    assert {"verilator", "amaranth"} | installed <= simulators
    assert len({(r["m"], r["k"], r["n"]) for r in speeds}) == 1  # the same workload
    assert all(r["bit_exact"] and r["cycles_per_second"] > 0 for r in speeds)

    models = {r["model"]: r for r in report["e2e"]["records"]}
    assert set(models) == {"mlp", "cnn"}
    for r in models.values():
        assert r["bit_exact"] and r["cycles_equal_model"]
        assert r["int8_accuracy"] > 0.9 and r["float_accuracy"] > 0.9
        boards = {b["board"]: b for b in r["boards"]}
        assert boards["ulx3s-85f"]["fits"]
        # At the recorded Fmax, where the recorded build of the board's array succeeded
        # (the iCEBreaker's, which CI builds too, always).
        timed = [b for b in boards.values() if "batch1_latency_us" in b]
        assert "icebreaker" in {b["board"] for b in timed} or r["model"] == "cnn"
        assert timed and all(b["batch1_latency_us"] > 0 for b in timed)
    assert not models["cnn"]["boards"][0]["fits"]  # the iCEBreaker runs MLPs only

    assert all(r["bit_exact"] for r in report["cnn"]["records"])
    assert report["compile"]["compile_seconds_best_of_3"] > 0
    assert 0.5 < report["link"]["fraction_of_line_rate"] <= 1

    boards = report["boards"]["records"]
    assert {r["board"] for r in boards} >= {"icebreaker", "ulx3s-85f"}
    assert report["boards"]["recorded_from"]["command"].startswith("npugen bench")
    assert all(r["status"] == "ok" for r in boards
               if r["board"] in ("icebreaker", "ulx3s-12f"))   # the boards CI builds
    for r in boards:
        if r["status"] == "ok":
            assert r["peak_gmacs_at_fmax"] >= r["achieved_gmacs"] > 0
        else:  # a recorded build that failed keeps the tool's reason
            assert r["reason"]
    assert len(report["sweep"]["records"]) >= 6

    text = docs.read_text()
    for heading in ("## GEMM on the RTL beside SCALE-Sim", "## Simulation speed",
                    "## End to end", "## Boards", "## Design-space sweep"):
        assert heading in text
    for image in ("gemm_utilization", "simulation_speed", "latency", "boards", "pareto"):
        assert f"img/{image}.png" in text
        assert (tmp_path / "img" / f"{image}.png").read_bytes().startswith(b"\x89PNG")


def test_unknown_bench_section_is_exit_2(capsys):
    assert main(["bench", "--only", "gemm,nope"]) == 2
    assert "unknown bench section 'nope'" in capsys.readouterr().err


def test_quick_without_a_recording_is_an_error_naming_it(tmp_path, capsys):
    status = main(["bench", "--quick", "--only", "boards", "--recorded", str(tmp_path),
                   "--results", str(tmp_path / "results"), "--no-docs"])
    assert status == 1
    err = capsys.readouterr().err
    assert "section boards" in err and f"no recorded {tmp_path / 'boards.json'}" in err


def test_one_section_keeps_the_others_in_the_report(tmp_path, capsys):
    results, docs = tmp_path / "results", tmp_path / "B.md"
    results.mkdir()
    recorded = ROOT / "benchmarks" / "results"
    (results / "link.json").write_text((recorded / "link.json").read_text())
    assert main(["bench", "--only", "compile", "--results", str(results), "--docs",
                 str(docs)]) == 0
    text = docs.read_text()
    assert "## Model compilation" in text and "## Host link: upload throughput" in text
    assert "Command: `npugen bench --only compile --results" in text  # as typed
    assert "Not measured yet: `npugen bench --only gemm`" in text


def test_boards_of_an_unknown_name_or_outside_the_boards_section_are_exit_2(capsys):
    assert main(["bench", "--only", "boards", "--boards", "ulx3s-45f,nope"]) == 2
    assert "unknown board 'nope' in --boards" in capsys.readouterr().err
    assert main(["bench", "--only", "e2e", "--boards", "ulx3s-45f"]) == 2
    assert "--boards picks the boards section's builds" in capsys.readouterr().err
    assert main(["bench", "--quick", "--boards", "ulx3s-45f"]) == 2
    capsys.readouterr()
    assert main(["bench", "--only", "boards", "--boards", ""]) == 2   # not every board
    assert "unknown board '' in --boards" in capsys.readouterr().err


def test_a_run_of_some_boards_keeps_the_others_records_and_says_which_is_which(
        tmp_path, monkeypatch):
    """``--boards`` rebuilds those boards only: their records replace the recorded ones,
    the others and the recorded run's origin stay, and ``updated`` names the new run."""
    import npugen.bench as bench
    import npugen.bench.boards as boards_section

    recorded = json.loads((ROOT / "benchmarks" / "results" / "boards.json").read_text())
    (tmp_path / "recorded").mkdir()
    (tmp_path / "recorded" / "boards.json").write_text(json.dumps(recorded))
    built = []

    def run_boards(*, quick, progress, recorded_dir, boards):
        built.extend(boards)
        record = next(r for r in recorded["records"] if r["board"] == "ulx3s-45f")
        return {"records": [{**record, "fmax_mhz": 75.41}], "workload": "256x256x256"}

    monkeypatch.setattr(boards_section, "run_boards", run_boards)
    monkeypatch.setattr(bench, "source_revision", lambda: "abc1234")
    result = bench.run_bench(quick=False, sections=["boards"], boards=["ulx3s-45f"],
                             results_dir=tmp_path / "results", docs_path=tmp_path / "B.md",
                             recorded_dir=tmp_path / "recorded",
                             command="npugen bench --only boards --boards ulx3s-45f")["boards"]
    assert built == ["ulx3s-45f"]
    saved = json.loads((tmp_path / "results" / "boards.json").read_text())
    assert saved == result
    assert [r["board"] for r in saved["records"]] == [r["board"] for r in recorded["records"]]
    by_board = {r["board"]: r for r in saved["records"]}
    assert by_board["ulx3s-45f"]["fmax_mhz"] == 75.41
    others = [r for r in recorded["records"] if r["board"] != "ulx3s-45f"]
    assert all(by_board[r["board"]] == r for r in others)
    assert (saved["revision"], saved["command"]) == (recorded["revision"], recorded["command"])
    update = next(u for u in saved["updated"] if u["board"] == "ulx3s-45f")
    assert update["revision"] == "abc1234" and "--boards ulx3s-45f" in update["command"]
    assert update["seconds"] < 60 <= saved["seconds"]   # this run's time, the record's
    assert "The ulx3s-45f record since: npugen bench --only boards --boards ulx3s-45f " \
        "(at commit abc1234" in (tmp_path / "B.md").read_text()


def test_a_board_rebuilt_without_meeting_its_clock_is_recorded_and_exit_1(
        tmp_path, monkeypatch, capsys):
    import npugen.bench.boards as boards_section

    recorded = json.loads((ROOT / "benchmarks" / "results" / "boards.json").read_text())
    (tmp_path / "boards.json").write_text(json.dumps(recorded))
    record = next(r for r in recorded["records"] if r["board"] == "ulx3s-45f")
    monkeypatch.setattr(boards_section, "run_boards", lambda **_: {
        "records": [{**record, "status": "timing missed"}], "workload": "256x256x256"})
    status = main(["bench", "--only", "boards", "--boards", "ulx3s-45f", "--recorded",
                   str(tmp_path), "--results", str(tmp_path / "out"), "--no-docs"])
    assert status == 1
    assert "did not build to its clock: ulx3s-45f (timing missed)" in capsys.readouterr().err
    saved = json.loads((tmp_path / "out" / "boards.json").read_text())
    assert {r["board"]: r["status"] for r in saved["records"]}["ulx3s-45f"] == "timing missed"


@pytest.mark.parametrize("text", ["{}", "not json", '{"records": 3}'])
def test_a_run_of_some_boards_refuses_a_recording_without_board_records(
        tmp_path, capsys, text):
    (tmp_path / "boards.json").write_text(text)
    status = main(["bench", "--only", "boards", "--boards", "ulx3s-45f", "--recorded",
                   str(tmp_path), "--results", str(tmp_path / "out"), "--no-docs"])
    assert status == 2
    err = capsys.readouterr().err
    assert f"--boards keeps the other boards' records: {tmp_path / 'boards.json'}" in err
    assert "run the whole boards section" in err
    assert not (tmp_path / "out").exists()   # refused before any build


def test_every_section_records_the_revision_the_bench_started_on(tmp_path, monkeypatch):
    """A section's results are tracked files: once the first is written the tree is
    dirty, which must not make the later sections' records say "+dirty"."""
    import npugen.bench as bench

    revisions = iter(["abc1234", "abc1234+dirty", "abc1234+dirty"])
    monkeypatch.setattr(bench, "source_revision", lambda: next(revisions))
    results = bench.run_bench(quick=True, sections=["boards", "sweep"],
                              results_dir=tmp_path, docs_path=None,
                              recorded_dir=ROOT / "benchmarks" / "results")
    assert {name: r["revision"] for name, r in results.items()} == {
        "boards": "abc1234", "sweep": "abc1234"}


def test_mlperf_quick_checks_every_fitting_model_against_litert(tmp_path):
    """``--only mlperf --quick``: a record for each of the four models, with a row for
    every board's default NPU and the reference 8×8; where a model fits, its golden-model
    outputs equal LiteRT's reference kernels and its counters the cycle model; where it
    does not, the reason names the memory. The report section and its plot are written."""
    from npugen.bench import run_bench
    from npugen.boards import BOARDS

    docs = tmp_path / "BENCHMARKS.md"
    result = run_bench(quick=True, sections=["mlperf"], results_dir=tmp_path / "results",
                       docs_path=docs, recorded_dir=ROOT / "benchmarks" / "results")["mlperf"]
    records = {r["model"]: r for r in result["records"]}
    assert set(records) == {"ad", "ic", "kws", "vww"}
    for r in records.values():
        assert r["reference"] == "LiteRT BUILTIN_REF"
        assert [t["name"] for t in r["targets"]] == [*BOARDS, "reference 8×8"]
        assert r["targets"][-1]["fits"]  # every model has a row on the reference 8×8
        for t in r["targets"]:
            assert t["physical_limit_ms"] > 0
            if not t["fits"]:
                assert t["reason"]  # DoesNotFit's message: which memory, how much
                continue
            assert t["bit_exact"] is True and t["cycles_equal_model"]
            assert 0 < t["utilization"] <= 1
            # The array streams within the cycles: its ceiling is at least what it made.
            assert t["utilization"] <= t["array_bound_utilization"] <= 1
            assert t["requant_cycles_per_inference"] > 0
            assert t["latency_ms"] >= t["physical_limit_ms"]
        assert r["layers"] and r["virtual_board"] == {"skipped": "not run with --quick"}
    assert records["ad"]["targets"][-1]["batch"] > 1  # per inference at its batch
    assert result["published_ms"]["Cortex-M85 480 MHz, TFLite Micro"]["kws"] == 3.47
    text = docs.read_text()
    assert "## MLPerf Tiny" in text and "### Beside published results" in text
    assert "| array-bound | requantizer |" in text
    assert "Produced by `npugen bench --quick --only mlperf`" in text
    assert (tmp_path / "img" / "mlperf.png").read_bytes().startswith(b"\x89PNG")


@pytest.mark.slow
@pytest.mark.skipif(not simulator_available("verilator"), reason="verilator is not installed")
def test_mlperf_kws_on_the_virtual_board_equals_litert_and_the_golden_model():
    """The full section's run of one model: KWS on the virtual board (the SoC in Verilator,
    through its UART) gives LiteRT's outputs, and the board's counters the golden model's."""
    from npugen.bench.mlperf import bench_targets, model_record

    record = model_record("kws", False, bench_targets(ROOT / "benchmarks" / "results"),
                          lambda line: None)
    board = record["virtual_board"]
    assert "error" not in board, board.get("error")
    assert board["inputs"] == 2 and board["bit_exact"] and board["equal_golden"]
    assert board["cycles_equal_golden"] and board["cycles"] == board["golden_cycles"] > 0


def test_latencies_take_the_fmax_of_a_recorded_build_of_the_same_array_only():
    """A board's default changed since its recorded build: another array's Fmax is not
    used (the e2e and mlperf sections then give no latency at Fmax); other memories are
    named beside it."""
    from npugen.bench.models import recorded_build
    from npugen.boards import BOARDS

    board = BOARDS["ulx3s-85f"]
    config = board.default_config
    same = {"board": board.name, "rows": config.rows, "cols": config.cols,
            "fmax_mhz": 70.0, "config": config.to_dict()}
    assert recorded_build(board, {board.name: same}) == (same, [])
    deeper = {**same, "config": {**config.to_dict(), "weight_depth": 2 * config.weight_depth}}
    assert recorded_build(board, {board.name: deeper}) == (deeper, ["weight_depth"])
    # A build recorded before a field existed had that field's default.
    older = {**same, "config": {k: v for k, v in config.to_dict().items()
                                if k != "requant_overlap"}}
    assert config.requant_overlap
    assert recorded_build(board, {board.name: older}) == (older, ["requant_overlap"])
    for other in ({**same, "rows": config.rows + 4}, {**same, "fmax_mhz": None}):
        assert recorded_build(board, {board.name: other}) == (None, [])
    assert recorded_build(board, {}) == (None, [])


def test_mlperf_layer_tables_say_when_their_cycles_are_of_a_whole_batch(tmp_path):
    """AD runs at a batch (64 on the 85F): its per-layer cycles are of the run, its MACs
    of one inference."""
    from npugen.bench.report import write_report

    results = {"mlperf": json.loads((ROOT / "benchmarks/results/mlperf.json").read_text())}
    record = next(r for r in results["mlperf"]["records"] if r["model"] == "ad")
    batch = next(t["batch"] for t in record["targets"] if t["name"] == record["layers_on"])
    assert batch > 1
    docs = tmp_path / "BENCHMARKS.md"
    write_report(results, docs)
    text = docs.read_text()
    ad = text[text.index("AD layers on"):].splitlines()[0]
    assert f"cycles of a run of batch {batch}, MACs of one inference" in ad
    kws = text[text.index("KWS layers on"):].splitlines()[0]
    assert "batch" not in kws


def test_mlperf_layer_tables_have_a_tables_column_only_where_a_layer_used_them(tmp_path):
    """The rescale tables' work (TABLE loads, RESCALE lookups) gets a column in a model's
    layer table when some layer of it has any; recordings made before the column have
    none."""
    from npugen.bench.report import write_report

    results = {"mlperf": json.loads((ROOT / "benchmarks/results/mlperf.json").read_text())}
    record = next(r for r in results["mlperf"]["records"] if r["model"] == "ic")
    for layer in record["layers"]:
        layer["table_cycles"] = 515 if layer["kind"] == "add" else 0
    docs = tmp_path / "BENCHMARKS.md"
    write_report(results, docs)
    text = docs.read_text()
    ic = text[text.index("IC layers on"):].split("\n\n")[1].splitlines()
    assert ic[0].endswith("| array | loads | requant | tables |")
    assert ic[2].count("|") == ic[0].count("|")
    assert any("| add |" in row and row.endswith("| 515 |") for row in ic)
    kws = text[text.index("KWS layers on"):].split("\n\n")[1].splitlines()
    assert kws[0].endswith("| array | loads | requant |")
