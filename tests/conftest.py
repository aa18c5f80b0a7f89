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


RELION_TOMO_FIXTURES = Path(os.environ.get("CRYOPIPE_RELION_TOMO_FIXTURES",
                                           REPO.parent / "shared" / "fixtures" / "relion_tomo"))


@pytest.fixture(scope="session")
def relion_tomo_dir() -> Path:
    """Directory of the RELION 5.0.1 tomography fixtures (read-only; paths inside are relative to it)."""
    if not (RELION_TOMO_FIXTURES / "tomograms.star").exists():
        pytest.skip(f"RELION tomography fixtures not found at {RELION_TOMO_FIXTURES} "
                    "(set CRYOPIPE_RELION_TOMO_FIXTURES)")
    return RELION_TOMO_FIXTURES
