"""Run-config settings: defaults, pyproject.toml agreement and validation errors."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest
from flwr.common.config import flatten_dict

from otfuse.fusion import FusionOptions
from otfuse.models import ModelConfig
from otfuse.runconfig import (
    SETTINGS,
    STRATEGY,
    RunConfigError,
    check_resume_compatible,
    defaults,
    load_run_config,
)
from otfuse.strategies import STRATEGY_NAMES

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"


def pyproject_config() -> dict:
    with open(PYPROJECT, "rb") as handle:
        return dict(flatten_dict(tomllib.load(handle)["tool"]["flwr"]["app"]["config"]))


def test_pyproject_lists_every_setting():
    assert sorted(pyproject_config()) == sorted(SETTINGS)


def test_pyproject_defaults_equal_settings():
    config = pyproject_config()
    for key, default in defaults().items():
        assert config[key] == default, key
        assert type(config[key]) is type(default), key


def test_every_setting_is_documented():
    for key, setting in SETTINGS.items():
        assert setting.doc.endswith("."), key
        assert setting.describe(), key


def test_empty_config_gives_defaults():
    config = load_run_config({})

    assert config.to_flower() == defaults()
    assert config.model_config() == ModelConfig(n_classes=2)
    # A federated run falls back to plain averaging where the engine alone would raise.
    assert config.fusion_options() == FusionOptions(on_plan_failure="average")
    assert config.datasets == ("sst2", "imdb", "sentiment140")


def test_pyproject_config_is_valid():
    assert load_run_config(pyproject_config()).to_flower() == defaults()


def test_integer_accepted_for_float():
    config = load_run_config({"learning-rate": 1})

    assert config.values["learning-rate"] == 1.0
    assert isinstance(config.values["learning-rate"], float)


def test_dataset_list_is_normalised():
    config = load_run_config({"datasets": " imdb , sst2 "})

    assert config.datasets == ("imdb", "sst2")


def test_model_settings_reach_model_config():
    config = load_run_config({"model.d-model": 32, "model.n-heads": 2, "model.pooling": "first"})

    model = config.model_config()
    assert (model.d_model, model.n_heads, model.pooling) == (32, 2, "first")


def test_zero_cap_means_no_cap():
    from otfuse.runconfig import MAX_TEST_EXAMPLES, MAX_TRAIN_EXAMPLES

    config = load_run_config({"max-train-examples": 0, "max-test-examples": 500})

    assert config.optional_cap(MAX_TRAIN_EXAMPLES) is None
    assert config.optional_cap(MAX_TEST_EXAMPLES) == 500


def test_strategy_choices_match_factory():
    assert STRATEGY.choices == STRATEGY_NAMES


INVALID = [
    # (settings, words the message must contain)
    pytest.param({"batch-size": "64"}, ["'batch-size'", "'64'", "an integer >= 1"], id="string-for-int"),
    pytest.param({"batch-size": True}, ["'batch-size'", "True"], id="bool-for-int"),
    pytest.param({"learning-rate": "fast"}, ["'learning-rate'", "a number > 0"], id="string-for-float"),
    pytest.param({"num-server-rounds": 0}, ["'num-server-rounds'", ">= 1"], id="zero-rounds"),
    pytest.param({"fraction-train": 0.0}, ["'fraction-train'", "> 0 and <= 1"], id="fraction-zero"),
    pytest.param({"fraction-evaluate": 1.5}, ["'fraction-evaluate'", "<= 1"], id="fraction-above-one"),
    pytest.param({"learning-rate": float("nan")}, ["'learning-rate'", "nan"], id="nan-learning-rate"),
    pytest.param({"strategy": "scaffold"}, ["'strategy'", "'scaffold'", "'otfusion', 'fedavg'"], id="unknown-strategy"),
    pytest.param({"datasets": "sst2,yelp"}, ["'datasets'", "'sst2,yelp'", "'imdb'"], id="unknown-dataset"),
    pytest.param({"datasets": "sst2,sst2"}, ["'datasets'", "distinct"], id="repeated-dataset"),
    pytest.param({"datasets": ""}, ["'datasets'"], id="no-dataset"),
    pytest.param({"partitioning": "shuffled"}, ["'partitioning'", "'iid'"], id="unknown-partitioning"),
    pytest.param({"fusion.alignment": "sinkhorn"}, ["'fusion.alignment'", "'hard'"], id="unknown-alignment"),
    pytest.param({"fusion.anchor": "server"}, ["'fusion.anchor'", "'global', 'client'"], id="unknown-anchor"),
    pytest.param({"fusion.reg": 0}, ["'fusion.reg'", "> 0"], id="zero-reg"),
    pytest.param({"model.n-heads": 3}, ["model", "not divisible"], id="heads-do-not-divide"),
    pytest.param({"bach-size": 32}, ["'bach-size'", "did you mean 'batch-size'"], id="misspelled-key"),
    pytest.param({"colour": "red"}, ["'colour'", "known keys"], id="unknown-key"),
    pytest.param({"round-timeout": 0}, ["'round-timeout'", "0.0", "> 0"], id="zero-timeout"),
    pytest.param({"round-timeout": float("inf")}, ["'round-timeout'", "inf"], id="infinite-timeout"),
    pytest.param({"min-train-replies": 0}, ["'min-train-replies'", ">= 1"], id="zero-min-replies"),
    pytest.param({"max-num-examples": 0}, ["'max-num-examples'", ">= 1"], id="zero-max-examples"),
    pytest.param({"max-update-norm-ratio": 1.0}, ["'max-update-norm-ratio'", "> 1"], id="norm-ratio-one"),
    pytest.param({"checkpoint-keep": 0}, ["'checkpoint-keep'", ">= 1"], id="keep-no-checkpoint"),
    pytest.param({"resume-from": 3}, ["'resume-from'", "a string"], id="number-for-path"),
]


@pytest.mark.parametrize(("settings", "words"), INVALID)
def test_invalid_setting_names_key_and_value(settings, words):
    with pytest.raises(RunConfigError) as raised:
        load_run_config(settings)

    message = str(raised.value)
    for word in words:
        assert word in message
    assert "\n" not in message


def test_resume_allows_more_rounds():
    saved = load_run_config({"num-server-rounds": 2}).to_flower()

    check_resume_compatible(saved, load_run_config({"num-server-rounds": 4, "resume-from": "/runs/a"}))


def test_resume_rejects_changed_training_setting():
    saved = load_run_config({"learning-rate": 0.002}).to_flower()

    with pytest.raises(RunConfigError) as raised:
        check_resume_compatible(saved, load_run_config({"learning-rate": 0.01}))

    message = str(raised.value)
    assert "'learning-rate' is 0.01" in message
    assert "written with 0.002" in message
    assert "num-server-rounds" in message

