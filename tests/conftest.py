"""Shared test fixtures: location of RELION-written reference files (../shared/fixtures/relion)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
RELION_FIXTURES = Path(os.environ.get("CRYOPIPE_RELION_FIXTURES", REPO.parent / "shared" / "fixtures" / "relion"))


@pytest.fixture(scope="session")
def relion_dir() -> Path:
    """Directory of the RELION 5.0.1 fixtures (read-only). Skips when the shared folder is absent."""
    if not (RELION_FIXTURES / "ref_map.mrc").exists():
        pytest.skip(f"RELION fixtures not found at {RELION_FIXTURES} (set CRYOPIPE_RELION_FIXTURES)")
    return RELION_FIXTURES
