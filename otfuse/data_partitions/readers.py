"""Readers of one split from a local Parquet file or from the Hugging Face Hub, with clear errors."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

import pandas as pd
import pyarrow.parquet as pq

from otfuse.data_partitions.errors import DataError

logger = logging.getLogger(__name__)

DATA_DIR_ENV = "OTFUSE_DATA_DIR"


def raise_missing_file(path: Path) -> NoReturn:
    """Raise DataError for a data file that does not exist, listing its folder's files."""
    present = sorted(p.name for p in path.parent.glob("*.parquet")) if path.parent.is_dir() else []
    raise DataError(
        f"data file {str(path)!r} not found (files in that folder: {present or 'none'}); "
        f"check the data folder and the split name, or unset {DATA_DIR_ENV} to use the Hub"
    )


def read_parquet_columns(path: Path, columns: Sequence[str]) -> pd.DataFrame:
    """Read ``columns`` of a Parquet file, raising DataError if the file or a column is missing."""
    if not path.is_file():
        raise_missing_file(path)
    schema_names = pq.read_schema(path).names
    missing = [column for column in columns if column not in schema_names]
    if missing:
        raise DataError(
            f"data file {str(path)!r} has no column {missing[0]!r} (columns: {schema_names}); "
            "the file must follow the Hugging Face Hub schema of this data set"
        )
    logger.debug("reading %s", path)
    return pd.read_parquet(path, columns=list(columns))


def read_hub_split(
    hub_path: str, hub_config: str | None, split: str, columns: Sequence[str]
) -> pd.DataFrame:
    """Download one split from the Hugging Face Hub, raising DataError if it or a column is missing."""
    # Imported here because the library is large and only the Hub path needs it.
    import datasets

    logger.info("loading split %r of %s (config %s) from the Hugging Face Hub", split, hub_path, hub_config)
    try:
        dataset = datasets.load_dataset(hub_path, hub_config, split=split)
    except (OSError, ValueError) as error:
        raise DataError(
            f"could not load split {split!r} of {hub_path!r} from the Hugging Face Hub "
            f"({error}); pass data_dir or set {DATA_DIR_ENV} to a folder of local Parquet files"
        ) from error
    frame = dataset.to_pandas()
    missing = [column for column in columns if column not in frame.columns]
    if missing:
        raise DataError(
            f"Hub data set {hub_path!r} split {split!r} has no column {missing[0]!r} "
            f"(columns: {list(frame.columns)}); its schema changed, so update the loader's mapping"
        )
    return frame
