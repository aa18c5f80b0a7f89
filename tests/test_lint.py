"""The lint configuration in pyproject.toml ([tool.ruff]: pyflakes F, syntax E9, line length) holds for src/ and
tests/ (issue 14): CI runs it through this test. Skipped when ruff is not installed (it is in the `test` extra)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _ruff() -> list[str] | None:
    exe = Path(sys.executable).parent / "ruff"
    if exe.is_file():
        return [str(exe)]
    found = shutil.which("ruff")
    return [found] if found else None


def test_ruff_passes_on_src_and_tests():
    ruff = _ruff()
    if ruff is None:
        pytest.skip("ruff is not installed (pip install -e '.[test]')")
    done = subprocess.run([*ruff, "check", "--no-cache", "src", "tests"], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, f"ruff check src tests:\n{done.stdout}\n{done.stderr}"
