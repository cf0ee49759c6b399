"""Tests of the hashing word tokenizer."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from otfuse.data_partitions import HashTokenizer
from otfuse.models import PAD_ID

REPO_ROOT = Path(__file__).resolve().parents[1]
SENTENCE = "The movie wasn't great.<br /><br />Hyvää päivää!"
# Computed once with blake2b. If they change, every trained model gets different input ids.
EXPECTED_WORDS = ["the", "movie", "wasn", "t", "great", "hyvää", "päivää"]
EXPECTED_IDS = [5353, 8373, 7459, 12095, 8835, 8456, 3686]


def test_words_lowercase_and_unicode():
    assert HashTokenizer().words(SENTENCE) == EXPECTED_WORDS


def test_encode_fixed_ids():
    ids = HashTokenizer().encode([SENTENCE])
    assert ids[0, : len(EXPECTED_IDS)].tolist() == EXPECTED_IDS


def test_encode_same_in_subprocess():
    # A fresh interpreter gets a different hash() salt, so this catches use of hash().
    script = (
        "import json, sys; from otfuse.data_partitions import HashTokenizer; "
        "print(json.dumps(HashTokenizer().encode([sys.argv[1]])[0].tolist()))"
    )
    completed = subprocess.run(
        [sys.executable, "-c", script, SENTENCE], capture_output=True, text=True, check=True,
        env={**os.environ, "PYTHONHASHSEED": "12345"}, cwd=REPO_ROOT,
    )
    assert json.loads(completed.stdout)[: len(EXPECTED_IDS)] == EXPECTED_IDS


def test_encode_shape_and_dtype():
    ids = HashTokenizer(vocab_size=100, max_len=8).encode(["a b", "c", ""])
    assert ids.shape == (3, 8)
    assert ids.dtype == np.int64


def test_encode_pads_with_zero():
    ids = HashTokenizer(max_len=8).encode(["one two"])
    assert ids[0, 2:].tolist() == [PAD_ID] * 6
    assert (ids[0, :2] != PAD_ID).all()


def test_encode_empty_text_is_padding():
    ids = HashTokenizer(max_len=4).encode(["", "!!! ..."])
    assert ids.tolist() == [[PAD_ID] * 4, [PAD_ID] * 4]


def test_encode_truncates_to_max_len():
    tokenizer = HashTokenizer(max_len=4)
    long_ids = tokenizer.encode(["w1 w2 w3 w4 w5 w6"])
    short_ids = tokenizer.encode(["w1 w2 w3 w4"])
    assert long_ids.shape == (1, 4)
    assert long_ids.tolist() == short_ids.tolist()


def test_ids_within_vocabulary():
    vocab_size = 50
    texts = [" ".join(f"word{i}" for i in range(start, start + 40)) for start in range(0, 400, 40)]
    ids = HashTokenizer(vocab_size=vocab_size, max_len=40).encode(texts)
    assert ids.min() >= 1
    assert ids.max() < vocab_size


def test_same_word_same_id():
    ids = HashTokenizer().encode(["Good good GOOD"])
    assert len(set(ids[0, :3].tolist())) == 1


def test_empty_input_gives_empty_array():
    assert HashTokenizer(max_len=5).encode([]).shape == (0, 5)


def test_single_string_rejected():
    with pytest.raises(TypeError, match="wrap it in a list"):
        HashTokenizer().encode("a sentence")


def test_missing_text_rejected():
    with pytest.raises(TypeError, match="at position 1"):
        HashTokenizer().encode(["fine", None])


@pytest.mark.parametrize(
    "settings",
    [
        pytest.param({"vocab_size": 1}, id="vocab-too-small"),
        pytest.param({"max_len": 0}, id="max-len-zero"),
        pytest.param({"max_len": 2.5}, id="max-len-float"),
    ],
)
def test_invalid_settings_rejected(settings):
    with pytest.raises(ValueError, match="must be an integer of at least"):
        HashTokenizer(**settings)


def test_token_counts_ignore_max_len():
    counts = HashTokenizer(max_len=3).token_counts([SENTENCE, "", "Kiitos!"])
    assert counts.tolist() == [len(EXPECTED_WORDS), 0, 1]


def test_token_counts_reject_single_string():
    with pytest.raises(TypeError, match="wrap a single text in a list"):
        HashTokenizer().token_counts(SENTENCE)
