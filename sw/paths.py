"""Where npugen's own files are: the checkout it runs from."""

from __future__ import annotations

from pathlib import Path

__all__ = ["project_root"]


def project_root() -> Path:
    """The checkout npugen runs from (where ``benchmarks/`` is), else the current folder."""
    root = Path(__file__).resolve().parents[1]
    return root if (root / "benchmarks").is_dir() else Path.cwd()
