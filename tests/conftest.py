"""Shared test helpers: where the repository and the shared real data are."""

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture
def shared_data() -> Path:
    if not (SHARED_DATA / "rsna-half" / "labels.csv").exists():
        pytest.skip(f"real RSNA test data not found at {SHARED_DATA} (see ../shared/data/README.md)")
    return SHARED_DATA
