"""Parallel corpora for translation, and their partitioning across clients.

Two corpora are known: ``tatoeba_en_fi`` (Tatoeba English-Finnish sentence pairs) and
``multi30k_en_de`` (Multi30k English-German image captions). Each split is read from
``<data_dir>/<name>/<split>.parquet`` with one string column per language, or, for a corpus
that has a Hugging Face Hub copy with the same splits, from the Hub by name.

Partitioning schemes (both seeded and deterministic):

* ``"iid"``: the pairs are shuffled and cut into equal contiguous shards.
* ``"length"``: the pairs are sorted by the number of whitespace-separated words of the
  source sentence, ties in a seeded random order, and cut into equal contiguous shards, so
  partition 0 contains the shortest sentences and the last partition the longest. Clients then
  differ in sentence length, and with it in vocabulary and syntax.
"""

from __future__ import annotations

import logging
import numbers
import os
from dataclasses import dataclass

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from otfuse.data_partitions.errors import DataError
from otfuse.data_partitions.sources import DATA_DIR_ENV, resolve_data_dir

logger = logging.getLogger(__name__)

TRANSLATION_SPLITS = ("train", "validation", "test")
PARTITION_SCHEMES = ("iid", "length")


@dataclass(frozen=True)
class ParallelCorpus:
    """Languages and Hub location of one parallel corpus.

    ``hub_path`` is None when no Hub copy has the same splits as the local files.
    """

    languages: tuple[str, str]
    hub_path: str | None


TRANSLATION_CORPORA: dict[str, ParallelCorpus] = {
    # The local Tatoeba files carry their own grouped train/validation/test split, which no
    # Hub data set reproduces, so this corpus is read from local files only.
    "tatoeba_en_fi": ParallelCorpus(languages=("en", "fi"), hub_path=None),
    "multi30k_en_de": ParallelCorpus(languages=("en", "de"), hub_path="bentrevett/multi30k"),
}


def load_translation_split(
    name: str, split: str, data_dir: str | os.PathLike | None = None
) -> pd.DataFrame:
    """Load one split of a parallel corpus.

    Parameters
    ----------
    name : str
        A key of :data:`TRANSLATION_CORPORA`.
    split : str
        ``"train"``, ``"validation"`` or ``"test"``.
    data_dir : str, os.PathLike or None
        Folder with ``<name>/<split>.parquet``. Without it, the folder in the
        ``OTFUSE_DATA_DIR`` environment variable is read, and without that the Hugging Face Hub.

    Returns
    -------
    pandas.DataFrame
        One str column per language, named by its code (for example ``en`` and ``fi``), in
        the corpus's order, with a fresh 0-based index.

    Raises
    ------
    DataError
        If the name or split is unknown, the file or a column is missing, a value is
        missing, or the corpus has no Hub copy and no data folder is set.
    """
    corpus = _corpus(name)
    if split not in TRANSLATION_SPLITS:
        raise DataError(f"unknown split {split!r} of corpus {name!r}; choose one of {list(TRANSLATION_SPLITS)}")
    root = resolve_data_dir(data_dir)
    if root is None:
        raw = _read_hub(name, corpus, split)
    else:
        raw = _read_parquet(root / name / f"{split}.parquet", corpus)
    frame = pd.DataFrame({language: raw[language] for language in corpus.languages})
    missing = frame.isna().sum()
    if int(missing.sum()):
        column = str(missing.idxmax())
        raise DataError(
            f"{name} split {split!r} has {int(missing.max())} missing values in column "
            f"{column!r}; repair the file or drop those rows"
        )
    frame = frame.astype(str).reset_index(drop=True)
    logger.debug("%s split %r: %d pairs", name, split, len(frame))
    return frame


def partition_pairs(
    pairs: pd.DataFrame,
    num_partitions: int,
    scheme: str,
    *,
    seed: int,
    source_column: str | None = None,
) -> list[pd.DataFrame]:
    """Split sentence pairs into disjoint partitions of equal size (the first ones get the rest).

    Parameters
    ----------
    pairs : pandas.DataFrame
        Sentence pairs, for example from :func:`load_translation_split`.
    num_partitions : int
        Number of partitions (>= 1), at most the number of pairs.
    scheme : str
        ``"iid"`` or ``"length"``, as described in the module docstring.
    seed : int
        Seeds the shuffle (``"iid"``) or the order of equally long sentences (``"length"``).
    source_column : str, optional
        Column whose word count orders ``"length"`` partitions. Default: the first column.

    Returns
    -------
    list of pandas.DataFrame
        ``num_partitions`` frames with fresh 0-based indexes.
    """
    if scheme not in PARTITION_SCHEMES:
        raise DataError(f"unknown partition scheme {scheme!r}; choose one of {list(PARTITION_SCHEMES)}")
    if not isinstance(num_partitions, numbers.Integral) or isinstance(num_partitions, bool) or num_partitions < 1:
        raise DataError(f"num_partitions must be a positive integer, got {num_partitions!r}")
    if num_partitions > len(pairs):
        raise DataError(
            f"cannot cut {len(pairs)} sentence pairs into {num_partitions} partitions; use fewer partitions"
        )
    generator = np.random.default_rng(seed)
    order = generator.permutation(len(pairs))
    if scheme == "length":
        column = source_column if source_column is not None else pairs.columns[0]
        if column not in pairs.columns:
            raise DataError(f"source_column {column!r} is not a column of the pairs ({list(pairs.columns)})")
        words = pairs[column].str.split().str.len().to_numpy()[order]
        # A stable sort keeps the shuffled order among sentences of equal length.
        order = order[np.argsort(words, kind="stable")]
    return [pairs.iloc[shard].reset_index(drop=True) for shard in np.array_split(order, num_partitions)]


def _corpus(name: str) -> ParallelCorpus:
    if name not in TRANSLATION_CORPORA:
        raise DataError(f"unknown parallel corpus {name!r}; choose one of {list(TRANSLATION_CORPORA)}")
    return TRANSLATION_CORPORA[name]


def _read_parquet(path: os.PathLike, corpus: ParallelCorpus) -> pd.DataFrame:
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise DataError(
            f"data file {path!r} not found; check the data folder and the split name, or unset "
            f"{DATA_DIR_ENV} to use the Hugging Face Hub"
        )
    columns = pq.read_schema(path).names
    missing = [language for language in corpus.languages if language not in columns]
    if missing:
        raise DataError(
            f"data file {path!r} has no column {missing[0]!r} (columns: {columns}); a parallel "
            f"corpus needs one string column per language: {list(corpus.languages)}"
        )
    return pd.read_parquet(path, columns=list(corpus.languages))


def _read_hub(name: str, corpus: ParallelCorpus, split: str) -> pd.DataFrame:
    if corpus.hub_path is None:
        raise DataError(
            f"corpus {name!r} has no Hugging Face Hub copy with its splits; pass data_dir or set "
            f"{DATA_DIR_ENV} to the folder that contains {name}/{split}.parquet"
        )
    # NOTE: this path has not been run against the Hub. The mapping follows the dataset card
    # of bentrevett/multi30k: columns en and de, splits train, validation and test.
    # Imported here because the library is large and only the Hub path needs it.
    import datasets

    logger.info("loading %s split %r from the Hugging Face Hub (%s)", name, split, corpus.hub_path)
    try:
        dataset = datasets.load_dataset(corpus.hub_path, split=split)
    except (OSError, ValueError) as error:
        raise DataError(
            f"could not load split {split!r} of {corpus.hub_path!r} from the Hugging Face Hub "
            f"({error}); pass data_dir or set {DATA_DIR_ENV} to a folder of local Parquet files"
        ) from error
    frame = dataset.to_pandas()
    if "translation" in frame.columns:
        # Hub translation sets often nest the pair as {"en": ..., "de": ...}.
        frame = pd.DataFrame(frame["translation"].tolist())
    missing = [language for language in corpus.languages if language not in frame.columns]
    if missing:
        raise DataError(
            f"Hub data set {corpus.hub_path!r} split {split!r} has no column {missing[0]!r} "
            f"(columns: {list(frame.columns)}); its schema changed, so update TRANSLATION_CORPORA"
        )
    return frame
