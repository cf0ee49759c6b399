"""One-shot fusion experiments: train parents independently, fuse once, score every model.

For each seed the runner trains the parents, a centralised model on the union of their data
(the same number of passes over the data, so the same total training compute), fuses the
parents with every configured variant, optionally fine-tunes some fused models, and scores
every model, the parents' output ensemble included, on every test set.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch

from otfuse.bench.config import ExperimentConfig
from otfuse.data_partitions import HashTokenizer, load_client_data, load_global_test
from otfuse.fusion import FusionOptions, fuse
from otfuse.metrics import classification_metrics
from otfuse.models import ModelConfig, TransformerClassifier, alignment_spec, build_model
from otfuse.training import predict_proba, train_model

logger = logging.getLogger(__name__)

ENSEMBLE = "ensemble"
CENTRALISED = "centralised"
OVERALL = "overall"
FINETUNED_SUFFIX = "+finetuned"


def parent_name(index: int) -> str:
    return f"parent-{index}"


@dataclass
class SeedResult:
    """Scores of every model on every test set for one seed, plus what the report needs."""

    rows: list[dict[str, object]]
    probabilities: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)
    labels: dict[str, np.ndarray] = field(default_factory=dict)


def model_config(config: ExperimentConfig, num_classes: int) -> ModelConfig:
    return ModelConfig.from_dict({"n_classes": num_classes, **dict(config.model)})


def parent_training_sets(config: ExperimentConfig, seed: int, data_dir) -> list[pd.DataFrame]:
    """Return the training rows of each parent for ``seed``."""
    if config.parent_data == "shared":
        shared = load_client_data(
            "iid", 0, 1, datasets=config.datasets, data_dir=data_dir, seed=seed,
            max_train_examples=config.max_train_examples, local_test_fraction=0.0,
            **dict(config.partition_options),
        ).train
        return [shared] * config.num_parents
    return [
        load_client_data(
            config.partitioning, index, config.num_parents, datasets=config.datasets,
            data_dir=data_dir, seed=seed, max_train_examples=config.max_train_examples,
            local_test_fraction=0.0, **dict(config.partition_options),
        ).train
        for index in range(config.num_parents)
    ]


def run_seed(
    config: ExperimentConfig,
    seed: int,
    data_dir=None,
    advance: Callable[[str], None] | None = None,
) -> SeedResult:
    """Train, fuse and score every model of one seed; ``advance`` is called after each step."""
    advance = advance or (lambda _step: None)
    tests = load_global_test(config.evaluation_datasets, data_dir,
                             max_examples_per_dataset=config.max_test_examples, seed=0)
    parents_data = parent_training_sets(config, seed, data_dir)
    labels_seen = pd.concat([*parents_data, *tests.values()])["label"]
    architecture = model_config(config, int(labels_seen.max()) + 1)
    tokenizer = HashTokenizer(architecture.vocab_size, architecture.max_len)
    spec = alignment_spec(architecture)

    def train(frame: pd.DataFrame, init_seed: int, train_seed: int) -> tuple[TransformerClassifier, float]:
        model = build_model(architecture, seed=init_seed)
        stats = train_model(
            model, tokenizer.encode(frame["text"].tolist()), frame["label"].to_numpy(),
            epochs=config.epochs, batch_size=config.batch_size, lr=config.lr, seed=train_seed,
        )
        return model, float(stats["seconds"])

    models: dict[str, TransformerClassifier] = {}
    seconds: dict[str, float] = {}
    for index, frame in enumerate(parents_data):
        init_seed = 1000 * seed + (index if config.different_inits else 0)
        models[parent_name(index)], seconds[parent_name(index)] = train(frame, init_seed, 1000 * seed + index)
        advance(f"trained {parent_name(index)}")
    if config.centralised:
        union = pd.concat(parents_data, ignore_index=True).drop_duplicates(ignore_index=True)
        models[CENTRALISED], seconds[CENTRALISED] = train(union, 1000 * seed, 1000 * seed + 999)
        advance("trained the centralised model")

    parents = [models[parent_name(i)] for i in range(config.num_parents)]
    weights = [len(frame) for frame in parents_data]
    for name, options in config.variants.items():
        started = time.perf_counter()
        result = fuse([p.state_dict() for p in parents], spec, weights, FusionOptions(**dict(options)))
        fused = TransformerClassifier(architecture)
        fused.load_state_dict(result.state_dict)
        models[name], seconds[name] = fused, time.perf_counter() - started
        advance(f"fused {name}")
    finetune_rows = pd.concat(parents_data, ignore_index=True).sample(
        n=min(config.finetune_examples, sum(weights)), random_state=seed
    )
    for name in config.finetune_variants:
        tuned = copy.deepcopy(models[name])
        stats = train_model(
            tuned, tokenizer.encode(finetune_rows["text"].tolist()), finetune_rows["label"].to_numpy(),
            epochs=1, batch_size=config.batch_size, lr=config.lr, seed=1000 * seed + 500,
        )
        models[name + FINETUNED_SUFFIX], seconds[name + FINETUNED_SUFFIX] = tuned, float(stats["seconds"])
        advance(f"fine-tuned {name}")

    return _score(config, seed, models, seconds, parents, tests, tokenizer, parents_data)


def _score(
    config: ExperimentConfig,
    seed: int,
    models: Mapping[str, TransformerClassifier],
    seconds: Mapping[str, float],
    parents: Sequence[TransformerClassifier],
    tests: Mapping[str, pd.DataFrame],
    tokenizer: HashTokenizer,
    parents_data: Sequence[pd.DataFrame],
) -> SeedResult:
    result = SeedResult(rows=[])
    model_bytes = sum(t.numel() * t.element_size() for t in parents[0].state_dict().values())
    test_sets = dict(tests)
    test_sets[OVERALL] = pd.concat(tests.values(), ignore_index=True)
    for test_name, frame in test_sets.items():
        ids = tokenizer.encode(frame["text"].tolist())
        labels = frame["label"].to_numpy()
        result.labels[test_name] = labels
        probabilities = {name: predict_proba(model, ids) for name, model in models.items()}
        probabilities[ENSEMBLE] = np.mean([probabilities[parent_name(i)] for i in range(len(parents))], axis=0)
        result.probabilities[test_name] = probabilities
        for name, probs in probabilities.items():
            metrics = classification_metrics(probs, labels)
            result.rows.append({
                "seed": seed,
                "model": name,
                "test_set": test_name,
                **metrics,
                "num_examples": len(labels),
                "seconds": seconds.get(name, float("nan")),
                "rounds": 1 if name in config.variants or name.endswith(FINETUNED_SUFFIX) else 0,
                "mb_sent": _megabytes_sent(name, config, model_bytes),
                "client_epochs": config.epochs,
                "train_examples": sum(len(f) for f in parents_data) if name == CENTRALISED else None,
            })
    return result


def _megabytes_sent(name: str, config: ExperimentConfig, model_bytes: int) -> float:
    """Bytes a one-shot federation sends to build this model: each parent uploads once."""
    fused = name in config.variants or name.endswith(FINETUNED_SUFFIX) or name == ENSEMBLE
    return config.num_parents * model_bytes / 1e6 if fused else 0.0
