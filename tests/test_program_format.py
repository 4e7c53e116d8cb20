"""The ``.npu`` file: every changed byte is refused, older formats are named, and a path
that cannot be read says why."""

import hashlib
import json
import os
import struct

import numpy as np
import pytest

from npugen import NpuConfig, compile_model
from npugen.graph import Dense, Model
from npugen.program import FORMAT_VERSION, MAGIC, Program, ProgramFormatError


def tiny_program() -> Program:
    """A two-layer MLP on a 2×2 NPU: a file of a few kilobytes."""
    rng = np.random.default_rng(3)
    layers = [Dense("fc0", rng.normal(size=(5, 4)).astype(np.float32),
                    rng.normal(size=4).astype(np.float32), 0.0),
              Dense("fc1", rng.normal(size=(4, 3)).astype(np.float32),
                    np.zeros(3, np.float32))]
    model = Model(layers, (5,), (3,))
    return compile_model(model, NpuConfig(rows=2, cols=2), rng.normal(size=(16, 5)), batch=2)


@pytest.fixture(scope="module")
def blob() -> bytes:
    return tiny_program().to_bytes()


def test_round_trip(blob):
    program = Program.from_bytes(blob)
    assert program.to_bytes() == blob
    assert struct.unpack_from("<I", blob, 8)[0] == FORMAT_VERSION == 3


def test_every_changed_byte_is_refused(blob):
    """One flipped byte anywhere (preamble, checksum, header, segments) is refused."""
    assert len(blob) < 20_000
    for position in range(len(blob)):
        for flip in (0x01, 0xFF):
            changed = bytearray(blob)
            changed[position] ^= flip
            with pytest.raises(ProgramFormatError) as error:
                Program.from_bytes(bytes(changed), source="'p.npu'")
            message = str(error.value)
            assert "'p.npu'" in message
            if position >= 16:
                assert "is corrupt: checksum mismatch" in message, (position, message)


def test_header_change_is_named_corrupt(blob):
    """A changed digit in the header's input scale, which only the checksum catches."""
    text = blob.decode("latin-1")
    at = text.index('"scale": ') + len('"scale": ') + 2
    changed = bytearray(blob)
    changed[at] = ord("7") if changed[at] != ord("7") else ord("3")
    with pytest.raises(ProgramFormatError, match="is corrupt: checksum mismatch"):
        Program.from_bytes(bytes(changed))


def test_segment_damage_is_located(blob):
    changed = bytearray(blob)
    changed[-3] ^= 0x10
    with pytest.raises(ProgramFormatError, match=r"checksum mismatch; segment \w+ is corrupt "
                       r"\(CRC-32 mismatch\)"):
        Program.from_bytes(bytes(changed))


def test_bytes_appended_are_named(blob):
    """A file with bytes after its last segment fails the checksum, and the message says
    how many follow and where they start."""
    with pytest.raises(ProgramFormatError, match=rf"checksum mismatch; 3 bytes follow its "
                       rf"last segment \(byte {len(blob)} on: the file was appended to\)"):
        Program.from_bytes(blob + b"\0\1\2")


@pytest.mark.parametrize("cut, message", [
    (10, "too short for an npugen program"),
    (60, "checksum mismatch; the file is truncated: its header has"),
    (-4, "the file is truncated: segment"),
])
def test_truncated(blob, cut, message):
    with pytest.raises(ProgramFormatError, match=message):
        Program.from_bytes(blob[:cut])


def test_older_and_unknown_versions(blob):
    version_1 = MAGIC + struct.pack("<II", 1, 2) + b"{}"
    with pytest.raises(ProgramFormatError, match=r"written by an older npugen \(format "
                       r"version 1\); recompile the model"):
        Program.from_bytes(version_1)
    version_9 = bytearray(blob)
    version_9[8:12] = struct.pack("<I", 9)
    with pytest.raises(ProgramFormatError, match="unknown program format version 9"):
        Program.from_bytes(bytes(version_9))
    with pytest.raises(ProgramFormatError, match="not an npugen program"):
        Program.from_bytes(b"NOTANNPU" + blob[8:])


def test_unreadable_paths(tmp_path):
    with pytest.raises(ProgramFormatError, match="is a directory"):
        Program.load(tmp_path)
    with pytest.raises(ProgramFormatError, match="does not exist"):
        Program.load(tmp_path / "missing.npu")
    if os.geteuid() != 0:   # root reads anything
        locked = tmp_path / "locked.npu"
        locked.write_bytes(b"")
        locked.chmod(0)
        with pytest.raises(ProgramFormatError, match="cannot read program file"):
            Program.load(locked)


def test_unknown_host_operator_is_refused():
    """A program (from a newer npugen, say) that asks the host for an operator this one
    does not know is refused at load, not run without it."""
    import dataclasses

    program = dataclasses.replace(tiny_program(), host_ops=[{"op": "gelu"}])
    with pytest.raises(ProgramFormatError, match=r"asks the host for operator 'gelu', which "
                       r"this npugen does not know \(it knows softmax, float_softmax\)"):
        Program.from_bytes(program.to_bytes())


def test_unknown_host_operator_exits_2_on_the_command_line(tmp_path, capsys):
    import dataclasses

    from npugen.cli import main

    path = tmp_path / "p.npu"
    dataclasses.replace(tiny_program(), host_ops=[{"op": "gelu"}]).save(path)
    np.save(tmp_path / "x.npy", np.zeros((2, 5), np.float32))
    for command in (["inspect", str(path)],
                    ["run", str(path), "--input", str(tmp_path / "x.npy"),
                     "-o", str(tmp_path / "y.npy")]):
        assert main(command) == 2
        assert "operator 'gelu', which this npugen does not know" in capsys.readouterr().err
    assert not (tmp_path / "y.npy").exists()


def resigned(blob: bytes, edit, version: int = FORMAT_VERSION) -> bytes:
    """``blob`` with its header edited by ``edit`` (a function of the header dict) and
    its format version set, checksum and lengths made right again: a well-formed file."""
    length = struct.unpack_from("<I", blob, 12)[0]
    header = json.loads(blob[48:48 + length])
    edit(header)
    text = json.dumps(header, sort_keys=True).encode()
    preamble = MAGIC + struct.pack("<II", version, len(text))
    rest = text + blob[48 + length:]
    return preamble + hashlib.sha256(preamble + rest).digest() + rest


def test_version_2_files_still_load(blob):
    """Written before programs in stages: no stage fields, one image."""
    def strip(header):
        header.pop("stages")
        for segment in header["segments"]:
            segment.pop("stage")

    old = Program.from_bytes(resigned(blob, strip, version=2))
    assert not old.stages and old.to_bytes() == blob


@pytest.mark.parametrize("edit, message", [
    (lambda h: h.update(stages=5), "corrupt program header: 5 stages"),
    (lambda h: h["segments"][0].update(stage=7), "corrupt program header: list index"),
    (lambda h: h.update(stages=2), "corrupt program header: a stage has no image"),
])
def test_stages_the_segments_do_not_make_are_refused(blob, edit, message):
    with pytest.raises(ProgramFormatError, match=message):
        Program.from_bytes(resigned(blob, edit))


def test_a_version_2_file_in_stages_is_refused(blob):
    with pytest.raises(ProgramFormatError, match="2 stages"):
        Program.from_bytes(resigned(blob, lambda h: h.update(stages=2), version=2))
