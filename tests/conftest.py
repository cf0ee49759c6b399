"""Shared pytest fixtures."""

import os
from pathlib import Path

import pytest

# The repository is cloned beside a `shared/` folder, whose `data/` contains the offline data
# sets; OTFUSE_DATA_DIR names another folder, for example for a checkout elsewhere.
DATA_DIR = Path(
    os.environ.get("OTFUSE_DATA_DIR") or Path(__file__).resolve().parents[1].parent / "shared" / "data"
)


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """Return the offline data folder, failing the test if it is missing."""
    if not (DATA_DIR / "sst2" / "train.parquet").is_file():
        pytest.fail(
            f"offline data folder {DATA_DIR} is missing or incomplete; place the shared data "
            "beside the repository as ../shared/data"
        )
    return DATA_DIR
