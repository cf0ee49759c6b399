"""The run's model from the run config: scratch transformer or pretrained encoder, end to end.

The federated tests call the ClientApp and the strategies directly on a tiny BERT
checkpoint folder, so they exercise every switch of ``encoder`` in seconds.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord

from bert_helpers import TINY_ENCODER, write_checkpoint
from fusion_helpers import permute_state, random_symmetry
from flower_helpers import FixedNodesGrid, node_context, run_clients, set_task_identity, tiny_run_config, train_message
from otfuse.cli.main import main
from otfuse.client.app import app as client_app
from otfuse.models import ModelConfig, load_checkpoint, parameter_shapes
from otfuse.models.bert import MINILM, BertClassifierConfig
from otfuse.models.bert_tokenizer import WordPieceTokenizer
from otfuse.runconfig import RunConfigError, load_run_config
from otfuse.server.evaluation import GlobalEvaluator
from otfuse.strategies import build_strategy
from otfuse.task import PretrainedBert, ScratchTransformer, run_model

MAX_LEN = 16
NODE_IDS = (201, 202)


@pytest.fixture(autouse=True)
def task_identity() -> None:
    set_task_identity()


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp("tiny-bert"), TINY_ENCODER)


def bert_run_config(data_dir, tiny_dir, **overrides):
    return tiny_run_config(
        data_dir, encoder=str(tiny_dir), **{"model.max-len": MAX_LEN, "learning-rate": 1e-4, **overrides}
    )


def test_default_encoder_is_scratch_transformer():
    model = run_model(load_run_config({}))

    assert isinstance(model, ScratchTransformer)
    assert model.config == ModelConfig(n_classes=2)
    assert model.exchanged_bytes() == 4 * sum(int(np.prod(s)) for s in parameter_shapes(model.config).values())


def test_minilm_encoder_uses_wordpiece():
    model = run_model(load_run_config({"encoder": MINILM, "model.max-len": 32, "model.pooling": "first"}))

    assert isinstance(model, PretrainedBert)
    assert model.config == BertClassifierConfig(MINILM, max_len=32, pooling="first")
    assert model.tokenizer() == WordPieceTokenizer(MINILM, max_len=32)
    assert model.alignment_spec().model_type == "bert-classifier"


def test_frozen_embeddings_halve_minilm_bytes():
    full = run_model(load_run_config({"encoder": MINILM})).exchanged_bytes()
    frozen = run_model(load_run_config({"encoder": MINILM, "freeze-embeddings": True})).exchanged_bytes()

    # 22.57 M float32 parameters without the pooler; the embedding tables and their
    # LayerNorm hold 11.92 M of them.
    assert full == 4 * 22_566_146
    assert full - frozen == 4 * 11_918_592


@pytest.mark.parametrize(
    ("values", "message"),
    [
        pytest.param({"encoder": "checkpoints/bert"}, "is a relative path", id="relative-path"),
        pytest.param({"encoder": "/nonexistent/bert"}, "does not exist", id="missing-folder"),
        pytest.param({"encoder": MINILM, "model.max-len": 600}, "exceeds the encoder's 512", id="too-long"),
        pytest.param({"freeze-embeddings": True}, "applies to pretrained encoders only", id="freeze-scratch"),
        pytest.param({"pretrained-pooler": True}, "'pretrained-pooler' applies to pretrained", id="pooler-scratch"),
    ],
)
def test_run_config_rejects_bad_encoder_settings(values, message):
    with pytest.raises(RunConfigError) as raised:
        load_run_config(values)
    assert message in str(raised.value)


@pytest.mark.parametrize("freeze", [False, True], ids=["all-tensors", "frozen-embeddings"])
def test_clients_fine_tune_and_strategies_fuse(data_dir, tiny_dir, freeze):
    run_config = bert_run_config(data_dir, tiny_dir, **{"freeze-embeddings": freeze, "pretrained-pooler": True})
    model = run_model(load_run_config(run_config))
    global_arrays = ArrayRecord(model.exchanged_state(model.build(seed=0)))
    strategy = build_strategy(run_config)
    messages = list(strategy.configure_train(1, global_arrays, ConfigRecord(), FixedNodesGrid(NODE_IDS)))

    replies = run_clients(messages, run_config)
    fused, _ = strategy.aggregate_train(1, replies)

    assert all(not reply.has_error() for reply in replies), [r.error.reason for r in replies if r.has_error()]
    sent = replies[0].content["arrays"].to_torch_state_dict()
    assert set(sent) == set(global_arrays.to_torch_state_dict())
    assert any(name.startswith("bert.embeddings.") for name in sent) != freeze
    assert fused is not None
    assert set(fused.to_torch_state_dict()) == set(sent)
    changed = (sent["classifier.weight"] - global_arrays.to_torch_state_dict()["classifier.weight"]).abs().max()
    assert changed > 0


def test_client_rejects_arrays_of_other_settings(data_dir, tiny_dir):
    frozen = run_model(load_run_config(bert_run_config(data_dir, tiny_dir, **{"freeze-embeddings": True})))
    arrays = ArrayRecord(frozen.exchanged_state(frozen.build(seed=0)))
    run_config = bert_run_config(data_dir, tiny_dir)

    # Outside a Flower runtime the handler's exception reaches the caller; Flower would
    # turn it into an error reply.
    with pytest.raises(ValueError) as raised:
        client_app(train_message(arrays, node_id=7), node_context(7, 0, 2, run_config))
    assert "run server and clients with the same encoder" in str(raised.value)


def test_saved_checkpoint_holds_frozen_tensors(data_dir, tiny_dir, tmp_path):
    model = run_model(load_run_config(bert_run_config(data_dir, tiny_dir, **{"freeze-embeddings": True})))
    network = model.build(seed=0)

    path = model.save(tmp_path / "model.safetensors", model.exchanged_state(network))
    state_dict, config = load_checkpoint(path)

    assert config == model.config
    assert torch.equal(state_dict["bert.embeddings.word_embeddings.weight"],
                       network.state_dict()["bert.embeddings.word_embeddings.weight"])
    assert torch.equal(state_dict["classifier.weight"], network.state_dict()["classifier.weight"])


def test_server_evaluator_scores_pretrained_model(data_dir, tiny_dir):
    config = load_run_config(bert_run_config(data_dir, tiny_dir, **{"max-test-examples": 20}))
    model = run_model(config)
    evaluator = GlobalEvaluator(config, data_dir)

    scores = evaluator.evaluate(ArrayRecord(model.exchanged_state(model.build(seed=0))))

    assert evaluator.inputs["sst2"][0].shape == (20, MAX_LEN)
    assert scores["sst2"]["num_examples"] == 20
    assert 0.0 <= scores["overall"]["accuracy"] <= 1.0


def test_fuse_command_fuses_pretrained_checkpoints(tiny_dir, tmp_path):
    model = PretrainedBert(BertClassifierConfig(str(tiny_dir), max_len=MAX_LEN, use_pooler=True))
    state = model.exchanged_state(model.build(seed=0))
    spec = model.alignment_spec()
    permuted = permute_state(state, spec, random_symmetry(spec, seed=4))
    first = model.save(tmp_path / "first.safetensors", state)
    second = model.save(tmp_path / "second.safetensors", permuted)

    status = main(["fuse", str(first), str(second), "-o", str(tmp_path / "fused.safetensors")])
    fused, config = load_checkpoint(tmp_path / "fused.safetensors")

    assert status == 0
    assert config == model.config
    assert max(float((fused[name] - state[name]).abs().max()) for name in state) < 1e-5
