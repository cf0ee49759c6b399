"""Translation: byte BPE, parallel corpora, the encoder-decoder model, its spec, training and BLEU."""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd
import pytest
import torch

import otfuse.training.translation as translation_training
from otfuse.bench.translation import fuse_decoder_only, run_translation_experiment
from otfuse.data_partitions.byte_bpe import BYTE_VOCAB_SIZE, ByteBPETokenizer
from otfuse.data_partitions.errors import DataError
from otfuse.data_partitions.translation import load_translation_split, partition_pairs
from otfuse.fusion import FusionOptions, fuse
from otfuse.models.seq2seq import Seq2SeqTransformer, build_seq2seq
from otfuse.models.seq2seq_config import Seq2SeqConfig
from otfuse.models.seq2seq_decoding import beam_search, greedy_decode
from otfuse.models.seq2seq_spec import alignment_spec, encoder_tensor_names
from otfuse.training.translation import (
    encode_pairs,
    evaluate_translation,
    score_translations,
    train_translation,
    translate,
)

from fusion_helpers import permute_state, random_symmetry, randomised_state

VOCAB = 61


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Run on one thread, because tiny models are slower with two threads on a busy 2-core machine.

    Module scope, so that it is set up before the module-scoped fixtures that train.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tatoeba_validation(data_dir: Path) -> pd.DataFrame:
    return load_translation_split("tatoeba_en_fi", "validation", data_dir)


@pytest.fixture(scope="module")
def tokenizer(tatoeba_validation: pd.DataFrame) -> ByteBPETokenizer:
    return ByteBPETokenizer.train(list(tatoeba_validation["en"]) + list(tatoeba_validation["fi"]), 1000)


# --- tokenizer -------------------------------------------------------------------------------


def test_bpe_round_trips_test_sentences(data_dir, tokenizer):
    test = load_translation_split("tatoeba_en_fi", "test", data_dir)
    german = load_translation_split("multi30k_en_de", "test", data_dir)
    sentences = list(test["en"]) + list(test["fi"]) + list(german["de"])
    assert all(tokenizer.decode(tokenizer.encode(s)) == s for s in sentences)


def test_bpe_round_trips_unseen_characters(tokenizer):
    text = "Ωmega 東京  tabs\tand\nnewlines ✓"
    assert tokenizer.decode(tokenizer.encode(text)) == text


def test_bpe_shortens_sentences(tokenizer, tatoeba_validation):
    bytes_only = ByteBPETokenizer()
    sentences = list(tatoeba_validation["fi"][:200])
    merged = sum(len(tokenizer.encode(s)) for s in sentences)
    raw = sum(len(bytes_only.encode(s)) for s in sentences)
    assert merged < 0.5 * raw


def test_bpe_training_ignores_text_order(tatoeba_validation):
    texts = list(tatoeba_validation["en"][:500])
    forward = ByteBPETokenizer.train(texts, 400)
    backward = ByteBPETokenizer.train(texts[::-1], 400)
    assert forward.merges == backward.merges


def test_bpe_save_load_round_trip(tokenizer, tmp_path):
    loaded = ByteBPETokenizer.load(tokenizer.save(tmp_path / "bpe.json"))
    assert loaded.fingerprint() == tokenizer.fingerprint()
    assert loaded.encode("Hyvää huomenta!") == tokenizer.encode("Hyvää huomenta!")


def test_bpe_vocabulary_size(tokenizer):
    assert tokenizer.vocab_size == 1000
    assert ByteBPETokenizer().vocab_size == BYTE_VOCAB_SIZE


@pytest.mark.parametrize("vocab_size", [0, 258, 1.5], ids=["zero", "below-bytes", "float"])
def test_bpe_rejects_invalid_vocab_size(vocab_size):
    with pytest.raises(ValueError, match="vocab_size"):
        ByteBPETokenizer.train(["a b"], vocab_size)


def test_bpe_rejects_corrupt_merges():
    with pytest.raises(ValueError, match="corrupt"):
        ByteBPETokenizer([(3, BYTE_VOCAB_SIZE)])


# --- corpora and partitions ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "split", "rows", "columns"),
    [
        ("tatoeba_en_fi", "train", 53_643, ["en", "fi"]),
        ("tatoeba_en_fi", "test", 2_873, ["en", "fi"]),
        ("multi30k_en_de", "validation", 1_014, ["en", "de"]),
    ],
)
def test_corpus_loads_from_parquet(data_dir, name, split, rows, columns):
    frame = load_translation_split(name, split, data_dir)
    assert list(frame.columns) == columns
    assert len(frame) == rows


def test_corpus_reads_data_dir_from_environment(data_dir, monkeypatch):
    monkeypatch.setenv("OTFUSE_DATA_DIR", str(data_dir))
    assert len(load_translation_split("multi30k_en_de", "test")) == 1_000


def test_tatoeba_without_data_dir_raises(monkeypatch):
    monkeypatch.delenv("OTFUSE_DATA_DIR", raising=False)
    with pytest.raises(DataError, match="no Hugging Face Hub copy"):
        load_translation_split("tatoeba_en_fi", "train")


@pytest.mark.parametrize(("name", "split"), [("wmt14", "train"), ("tatoeba_en_fi", "dev")])
def test_corpus_rejects_unknown_names(data_dir, name, split):
    with pytest.raises(DataError, match="unknown"):
        load_translation_split(name, split, data_dir)


@pytest.mark.parametrize("scheme", ["iid", "length"])
def test_partitions_are_disjoint_and_complete(tatoeba_validation, scheme):
    parts = partition_pairs(tatoeba_validation, 3, scheme, seed=4)
    combined = pd.concat(parts)
    assert len(combined) == len(tatoeba_validation)
    assert sorted(combined.itertuples(index=False)) == sorted(tatoeba_validation.itertuples(index=False))
    assert max(len(p) for p in parts) - min(len(p) for p in parts) <= 1


@pytest.mark.parametrize("scheme", ["iid", "length"])
def test_partitions_repeat_with_seed(tatoeba_validation, scheme):
    first = partition_pairs(tatoeba_validation, 2, scheme, seed=9)
    second = partition_pairs(tatoeba_validation, 2, scheme, seed=9)
    assert all(a.equals(b) for a, b in zip(first, second))


def test_length_partition_orders_by_words(tatoeba_validation):
    short, long = partition_pairs(tatoeba_validation, 2, "length", seed=0)
    assert short["en"].str.split().str.len().max() <= long["en"].str.split().str.len().min()


def test_partition_rejects_unknown_scheme(tatoeba_validation):
    with pytest.raises(DataError, match="partition scheme"):
        partition_pairs(tatoeba_validation, 2, "topic", seed=0)


# --- model and alignment spec ----------------------------------------------------------------


SPEC_CASES = [
    pytest.param(Seq2SeqConfig(vocab_size=VOCAB, max_source_len=9, max_target_len=10, d_model=24, n_heads=4,
                               n_encoder_layers=2, n_decoder_layers=2, d_ff=40), id="separate-tied"),
    pytest.param(Seq2SeqConfig(vocab_size=VOCAB, max_source_len=9, max_target_len=10, d_model=24, n_heads=4,
                               n_encoder_layers=1, n_decoder_layers=2, d_ff=40, tie_output=False),
                 id="separate-untied"),
    pytest.param(Seq2SeqConfig(vocab_size=VOCAB, max_source_len=9, max_target_len=10, d_model=24, n_heads=2,
                               n_encoder_layers=2, n_decoder_layers=1, d_ff=40, share_embeddings=True),
                 id="shared-tied"),
    pytest.param(Seq2SeqConfig(vocab_size=VOCAB, max_source_len=9, max_target_len=10, d_model=24, n_heads=1,
                               n_encoder_layers=1, n_decoder_layers=1, d_ff=40, share_embeddings=True,
                               tie_output=False), id="shared-untied"),
]


def random_model(config: Seq2SeqConfig, seed: int) -> dict[str, torch.Tensor]:
    return randomised_state(Seq2SeqTransformer(config), seed)


def probe_batch(config: Seq2SeqConfig) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(7)
    source = torch.randint(3, config.vocab_size, (6, config.max_source_len), generator=generator)
    source[:2, 4:] = config.pad_id  # padded rows exercise the source key mask
    target = torch.randint(3, config.vocab_size, (6, config.max_target_len), generator=generator)
    target[:, 0] = config.bos_id
    return source, target


def outputs(config: Seq2SeqConfig, state: dict[str, torch.Tensor]) -> torch.Tensor:
    model = Seq2SeqTransformer(config).double().eval()
    model.load_state_dict({name: tensor.double() for name, tensor in state.items()})
    with torch.no_grad():
        return model(*probe_batch(config))


def max_difference(left: dict[str, torch.Tensor], right: dict[str, torch.Tensor]) -> float:
    return max(float((left[name].double() - right[name].double()).abs().max()) for name in left)


def test_cross_attention_reads_encoder_stream():
    spec = alignment_spec(SPEC_CASES[0].values[0])
    key = spec.tensors["decoder_blocks.1.cross_attn.key.weight"]
    query = spec.tensors["decoder_blocks.1.cross_attn.query.weight"]
    assert key.axes[1].group == "encoder.resid"
    assert spec.tensors["decoder_blocks.1.cross_attn.value.weight"].axes[1].group == "encoder.resid"
    assert query.axes[1].group == "decoder.resid"
    assert key.axes[0].group == query.axes[0].group


def test_shared_embeddings_merge_streams():
    spec = alignment_spec(SPEC_CASES[2].values[0])
    assert "resid" in spec.groups
    assert "encoder.resid" not in spec.groups


def test_tied_output_has_no_head():
    tied = Seq2SeqTransformer(SPEC_CASES[0].values[0]).state_dict()
    untied = Seq2SeqTransformer(SPEC_CASES[1].values[0]).state_dict()
    assert "lm_head.weight" not in tied
    assert "lm_head.weight" in untied


@pytest.mark.parametrize("config", SPEC_CASES)
def test_permuted_seq2seq_has_same_outputs(config):
    state = random_model(config, seed=1)
    spec = alignment_spec(config)
    permuted = permute_state(state, spec, random_symmetry(spec, seed=2))
    assert max_difference(state, permuted) > 0.1
    assert torch.allclose(outputs(config, permuted), outputs(config, state), atol=1e-6)


@pytest.mark.parametrize("config", SPEC_CASES)
def test_hard_fusion_recovers_seq2seq(config):
    state = random_model(config, seed=1)
    spec = alignment_spec(config)
    permuted = permute_state(state, spec, random_symmetry(spec, seed=3))

    fused = fuse([state, permuted], spec, options=FusionOptions(alignment="hard")).state_dict

    assert max_difference(fused, state) < 1e-6
    assert torch.allclose(outputs(config, fused), outputs(config, state), atol=1e-5)


def test_hard_fusion_aligns_to_permuted_anchor():
    config = SPEC_CASES[0].values[0]
    state = random_model(config, seed=4)
    spec = alignment_spec(config)
    permuted = permute_state(state, spec, random_symmetry(spec, seed=5))

    fused = fuse([permuted, state], spec, options=FusionOptions(alignment="hard")).state_dict

    assert max_difference(fused, permuted) < 1e-6


def test_decoder_only_fusion_keeps_anchor_encoder():
    config = SPEC_CASES[0].values[0]
    state = random_model(config, seed=6)
    spec = alignment_spec(config)
    permuted = permute_state(state, spec, random_symmetry(spec, seed=7))
    names = encoder_tensor_names(config)

    fused = fuse([state, permuted], spec, options=FusionOptions(alignment="hard")).state_dict
    combined = fuse_decoder_only(fused, state, names)

    assert all(torch.equal(combined[name], state[name]) for name in names)
    # Correct only if the encoder-stream map moved the cross-attention key and value inputs.
    assert torch.allclose(outputs(config, combined), outputs(config, state), atol=1e-5)


def test_seq2seq_rejects_long_source():
    config = SPEC_CASES[0].values[0]
    model = Seq2SeqTransformer(config)
    source = torch.ones(1, config.max_source_len + 1, dtype=torch.long)
    with pytest.raises(ValueError, match="max_source_len"):
        model.encode(source)


@pytest.mark.parametrize(
    "values",
    [{"d_model": 30, "n_heads": 4}, {"bos_id": 0}, {"eos_id": VOCAB}, {"dropout": 1.0}, {"max_target_len": 1}],
    ids=["heads-divide", "special-ids-differ", "eos-in-vocab", "dropout-below-1", "target-len-2"],
)
def test_seq2seq_config_rejects(values):
    with pytest.raises(ValueError, match="seq2seq config"):
        Seq2SeqConfig(**{"vocab_size": VOCAB, **values})


# --- training, decoding, scoring -------------------------------------------------------------


@pytest.fixture(scope="module")
def overfit(data_dir, tokenizer):
    """A tiny model trained on ten sentence pairs with distinct sources until it memorises them."""
    train = load_translation_split("tatoeba_en_fi", "train", data_dir)
    pairs = train.iloc[3000:3100].drop_duplicates("en").iloc[:10]
    data = encode_pairs(tokenizer, list(pairs["en"]), list(pairs["fi"]), 16)
    config = Seq2SeqConfig(vocab_size=tokenizer.vocab_size, max_source_len=16, max_target_len=17, d_model=32,
                           n_heads=2, n_encoder_layers=1, n_decoder_layers=1, d_ff=64, dropout=0.0)
    model = build_seq2seq(config, seed=0)
    train_translation(model, data, epochs=200, batch_size=10, lr=3e-3, label_smoothing=0.0, seed=0)
    return model, data, list(pairs["fi"])


def test_tiny_model_memorises_ten_pairs(overfit, tokenizer):
    model, data, references = overfit
    scores = evaluate_translation(model, tokenizer, data, references, max_len=17)
    assert scores["bleu"] > 90
    assert scores["chrf"] > 90


def test_beam_search_matches_references(overfit, tokenizer):
    model, data, references = overfit
    hypotheses = translate(model, tokenizer, data.source_ids, max_len=17, beam_size=4)
    assert score_translations(hypotheses, references)["bleu"] > 90


def test_beam_of_one_is_greedy():
    config = SPEC_CASES[1].values[0]
    model = Seq2SeqTransformer(config).eval()
    model.load_state_dict(random_model(config, seed=8))
    source, _ = probe_batch(config)
    assert beam_search(model, source, max_len=8, beam_size=1) == greedy_decode(model, source, max_len=8)


def test_decoding_stops_at_max_len():
    config = SPEC_CASES[0].values[0]
    model = Seq2SeqTransformer(config).eval()
    source, _ = probe_batch(config)
    assert all(len(ids) <= 3 for ids in greedy_decode(model, source, max_len=3))
    assert all(len(ids) <= 3 for ids in beam_search(model, source, max_len=3, beam_size=2))


def test_sacrebleu_gets_detokenised_strings(overfit, tokenizer, monkeypatch):
    model, data, references = overfit
    calls = []
    real_bleu = translation_training.sacrebleu.corpus_bleu

    def recording_bleu(hypotheses, reference_sets, **kwargs):
        calls.append((hypotheses, reference_sets))
        return real_bleu(hypotheses, reference_sets, **kwargs)

    monkeypatch.setattr(translation_training.sacrebleu, "corpus_bleu", recording_bleu)
    evaluate_translation(model, tokenizer, data, references, max_len=17)

    (hypotheses, reference_sets), = calls
    decoded = [tokenizer.decode(ids) for ids in greedy_decode(model.eval(), data.source_ids, max_len=17)]
    assert hypotheses == decoded
    assert reference_sets == [references]
    assert all(isinstance(text, str) and "<" not in text for text in hypotheses)


def test_score_rejects_token_ids():
    with pytest.raises(TypeError, match="decode"):
        score_translations([[5, 6]], ["a b"])


def test_perfect_hypotheses_score_100():
    references = ["Tom on täällä.", "Minä pidän kahvista."]
    scores = score_translations(references, references)
    assert math.isclose(scores["bleu"], 100.0)
    assert math.isclose(scores["chrf"], 100.0)


def test_training_repeats_with_seed(overfit, tokenizer):
    _, data, _ = overfit
    config = Seq2SeqConfig(vocab_size=tokenizer.vocab_size, max_source_len=16, max_target_len=17, d_model=16,
                           n_heads=2, n_encoder_layers=1, n_decoder_layers=1, d_ff=32)
    first, second = build_seq2seq(config, seed=1), build_seq2seq(config, seed=1)
    train_translation(first, data, epochs=2, batch_size=4, seed=3)
    train_translation(second, data, epochs=2, batch_size=4, seed=3)
    assert max_difference(first.state_dict(), second.state_dict()) == 0.0


# --- experiment ------------------------------------------------------------------------------


def test_tiny_experiment_runs(data_dir, tmp_path):
    results = run_translation_experiment(tmp_path, seeds=(0, 1), size="tiny", data_dir=data_dir, progress=False)
    assert len(results.rows) == 2 * 2 * 11
    assert results.rows[["bleu", "chrf", "loss"]].notna().all().all()
    assert all(path.is_file() for path in results.files.values())
    assert "OT hard, decoder only" in results.files["markdown"].read_text(encoding="utf-8")
