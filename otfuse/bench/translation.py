"""Experiment ``translation``: fuse encoder-decoder translation models and score them with BLEU.

For every seed and partition scheme, two parents are trained from different random
initialisations on disjoint client partitions of one parallel corpus. They are then combined
in three ways: plain averaging, hard OT fusion and soft OT fusion, each applied to the whole
model or to the decoder only (the encoder is parent 0's, which is also the anchor of the
alignment). Parent 0, the averaged model and the hard-OT model are then fine-tuned for a few
steps on the union of the clients' data. Every model is scored with greedy decoding on one
fixed sample of the test split.

Run it as ``python -m otfuse.bench.translation --out DIR`` or call
:func:`run_translation_experiment`.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import platform
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd
import torch
from tqdm.auto import tqdm

from otfuse.data_partitions.byte_bpe import ByteBPETokenizer
from otfuse.data_partitions.translation import load_translation_split, partition_pairs
from otfuse.fusion import AlignmentSpec, FusionOptions, fuse
from otfuse.models.seq2seq import build_seq2seq
from otfuse.models.seq2seq_config import Seq2SeqConfig
from otfuse.models.seq2seq_spec import alignment_spec, encoder_tensor_names
from otfuse.training.translation import (
    BLEU,
    CHRF,
    LOSS,
    EncodedPairs,
    encode_pairs,
    evaluate_translation,
    pair_fits,
    train_translation,
)

logger = logging.getLogger(__name__)

StateDict = dict[str, torch.Tensor]
METRICS = (BLEU, CHRF, LOSS)
PARTITIONS = ("iid", "length")
# Ways of combining the parents: method name and the fusion engine's alignment.
COMBINATIONS = (("average", "none"), ("OT hard", "hard"), ("OT soft", "soft"))
DECODER_ONLY_SUFFIX = ", decoder only"
FINETUNED = ("parent 0", "average", "OT hard")
# Every test sample is drawn with this seed, so that all seeds score the same sentences.
TEST_SAMPLE_SEED = 0


@dataclass(frozen=True)
class ExperimentSize:
    """Data, model and training sizes of one run of the experiment."""

    corpus: str
    source_language: str
    target_language: str
    tokenizer_vocab_size: int
    max_tokens: int
    pairs_per_client: int
    num_clients: int
    test_sentences: int
    d_model: int
    n_heads: int
    n_layers: int
    d_ff: int
    dropout: float
    train_steps: int
    batch_size: int
    lr: float
    finetune_steps: int
    finetune_lr: float
    torch_threads: int

    def model_config(self, vocab_size: int) -> Seq2SeqConfig:
        return Seq2SeqConfig(
            vocab_size=vocab_size,
            max_source_len=self.max_tokens,
            max_target_len=self.max_tokens + 1,
            d_model=self.d_model,
            n_heads=self.n_heads,
            n_encoder_layers=self.n_layers,
            n_decoder_layers=self.n_layers,
            d_ff=self.d_ff,
            dropout=self.dropout,
        )


SIZES: dict[str, ExperimentSize] = {
    # Finnish to English, because in a probe of 800 training steps at this model size a model
    # trained into English reached 1.7 BLEU and one trained into Finnish 0.5. One torch
    # thread, because two threads competing with other processes on a 2-core machine were up
    # to 8 times slower per step (torch 2.13 CPU).
    "default": ExperimentSize(
        corpus="tatoeba_en_fi", source_language="fi", target_language="en",
        tokenizer_vocab_size=2000, max_tokens=16, pairs_per_client=8000, num_clients=2,
        test_sentences=500, d_model=64, n_heads=4, n_layers=2, d_ff=256, dropout=0.1,
        train_steps=1800, batch_size=32, lr=3e-3, finetune_steps=100, finetune_lr=1e-3, torch_threads=1,
    ),
    "tiny": ExperimentSize(
        corpus="tatoeba_en_fi", source_language="fi", target_language="en",
        tokenizer_vocab_size=400, max_tokens=12, pairs_per_client=120, num_clients=2,
        test_sentences=40, d_model=32, n_heads=2, n_layers=1, d_ff=64, dropout=0.1,
        train_steps=8, batch_size=32, lr=3e-3, finetune_steps=3, finetune_lr=1e-3, torch_threads=1,
    ),
}


@dataclass(frozen=True)
class EvaluationSet:
    """Encoded test pairs and their raw reference sentences."""

    data: EncodedPairs
    references: list[str]


@dataclass
class TranslationResults:
    """Per-run scores (one row per seed, partition scheme and model), their summary, and run time.

    ``cpu_seconds`` is the process's CPU time. With one torch thread it is close to the wall
    time the run takes on an otherwise idle machine.
    """

    rows: pd.DataFrame
    summary: pd.DataFrame
    files: dict[str, Path]
    wall_seconds: float
    cpu_seconds: float


def run_translation_experiment(
    out_dir: str | Path,
    seeds: Sequence[int] = (0, 1, 2),
    size: str = "default",
    data_dir: str | Path | None = None,
    *,
    progress: bool = True,
    command: str | None = None,
) -> TranslationResults:
    """Run the experiment and write ``results.md``, ``results.csv``, ``summary.csv`` and ``translation.png``.

    Parameters
    ----------
    out_dir : str or Path
        Output folder, created if missing.
    seeds : sequence of int
        One full run (data partitions, initialisations, training) per seed.
    size : str
        A key of :data:`SIZES`: ``"default"`` or ``"tiny"`` (a smoke test).
    data_dir : str, Path or None
        Folder of the local Parquet corpora, as in ``load_translation_split``.
    progress : bool
        Show a progress bar.
    command : str, optional
        The command line to record in ``results.md``.
    """
    if size not in SIZES:
        raise ValueError(f"unknown experiment size {size!r}; choose one of {list(SIZES)}")
    if len(seeds) == 0:
        raise ValueError("seeds is empty; pass at least one seed, three or more for a mean ± std")
    settings = SIZES[size]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(settings.torch_threads)
    wall_started, cpu_started = time.perf_counter(), time.process_time()
    try:
        rows = _run_all(settings, list(seeds), data_dir, progress)
    finally:
        torch.set_num_threads(threads)
    timing = {"wall_seconds": time.perf_counter() - wall_started, "cpu_seconds": time.process_time() - cpu_started}
    rows_frame = pd.DataFrame(rows)
    summary = summarise(rows_frame)
    files = _write_outputs(out_dir, rows_frame, summary, settings, size, seeds, command, timing)
    return TranslationResults(rows=rows_frame, summary=summary, files=files, **timing)


def _run_all(settings: ExperimentSize, seeds: list[int], data_dir: str | Path | None,
             progress: bool) -> list[dict[str, object]]:
    tokenizer, train_pairs, test_set = _prepare_data(settings, data_dir)
    config = settings.model_config(tokenizer.vocab_size)
    spec = alignment_spec(config)
    evaluations = settings.num_clients + 2 * len(COMBINATIONS) + len(FINETUNED)
    stages_per_run = settings.num_clients + 1 + len(FINETUNED) + evaluations
    bar = tqdm(total=len(seeds) * len(PARTITIONS) * stages_per_run, desc="translation",
               unit="stage", disable=not progress)
    rows = []
    try:
        for seed in seeds:
            for scheme in PARTITIONS:
                bar.set_postfix(seed=seed, partition=scheme)
                client_data = _client_data(settings, tokenizer, train_pairs, scheme, seed)
                scores = _run_one(settings, config, spec, tokenizer, client_data, test_set, seed, bar.update)
                for method, metrics in scores.items():
                    rows.append({"seed": seed, "partition": scheme, "method": method, **metrics})
    finally:
        bar.close()
    return rows


def _prepare_data(settings: ExperimentSize,
                  data_dir: str | Path | None) -> tuple[ByteBPETokenizer, pd.DataFrame, EvaluationSet]:
    """Train the tokenizer on the validation split, and filter the training and test pairs by length.

    No client trains on the validation split, so none of the clients' data shapes the shared tokenizer.
    """
    source, target = settings.source_language, settings.target_language
    validation = load_translation_split(settings.corpus, "validation", data_dir)
    tokenizer = ByteBPETokenizer.train(
        list(validation[source]) + list(validation[target]), settings.tokenizer_vocab_size
    )
    train = _fitting(load_translation_split(settings.corpus, "train", data_dir), tokenizer, settings)
    test = _fitting(load_translation_split(settings.corpus, "test", data_dir), tokenizer, settings)
    test = test.sample(n=min(settings.test_sentences, len(test)), random_state=TEST_SAMPLE_SEED)
    logger.info(
        "tokenizer: %d entries (fingerprint %s); %d training and %d test pairs of at most %d tokens",
        tokenizer.vocab_size, tokenizer.fingerprint(), len(train), len(test), settings.max_tokens,
    )
    test_data = encode_pairs(tokenizer, list(test[source]), list(test[target]), settings.max_tokens)
    return tokenizer, train, EvaluationSet(test_data, list(test[target]))


def _fitting(pairs: pd.DataFrame, tokenizer: ByteBPETokenizer, settings: ExperimentSize) -> pd.DataFrame:
    source, target = settings.source_language, settings.target_language
    keep = [pair_fits(tokenizer, s, t, settings.max_tokens) for s, t in zip(pairs[source], pairs[target])]
    return pairs[keep].reset_index(drop=True)


def _client_data(settings: ExperimentSize, tokenizer: ByteBPETokenizer, train: pd.DataFrame, scheme: str,
                 seed: int) -> list[EncodedPairs]:
    partitions = partition_pairs(train, settings.num_clients, scheme, seed=seed,
                                 source_column=settings.source_language)
    clients = []
    for index, partition in enumerate(partitions):
        chosen = partition.sample(n=min(settings.pairs_per_client, len(partition)), random_state=seed * 100 + index)
        clients.append(encode_pairs(tokenizer, list(chosen[settings.source_language]),
                                    list(chosen[settings.target_language]), settings.max_tokens))
    return clients


def _run_one(settings: ExperimentSize, config: Seq2SeqConfig, spec: AlignmentSpec, tokenizer: ByteBPETokenizer,
             clients: list[EncodedPairs], test_set: EvaluationSet, seed: int,
             advance: Callable[[], object]) -> dict[str, dict[str, float]]:
    """Train the parents, build every combined model, fine-tune three of them, and score all."""
    parents = []
    for index, data in enumerate(clients):
        model = build_seq2seq(config, seed=seed * 1000 + index)
        _train_for_steps(model, data, settings.train_steps, settings.batch_size, settings.lr, seed * 1000 + index)
        parents.append({name: tensor.detach().clone() for name, tensor in model.state_dict().items()})
        advance()

    states = {f"parent {index}": state for index, state in enumerate(parents)}
    states.update(_combined_models(parents, spec, encoder_tensor_names(config)))
    advance()

    union = EncodedPairs(torch.cat([c.source_ids for c in clients]), torch.cat([c.target_ids for c in clients]))
    for method in FINETUNED:
        states[f"{method} + FT"] = _finetune(config, states[method], union, settings, seed)
        advance()

    scores = {}
    for method, state in states.items():
        model = build_seq2seq(config)
        model.load_state_dict(state)
        result = evaluate_translation(model, tokenizer, test_set.data, test_set.references,
                                      max_len=config.max_target_len)
        scores[method] = {metric: result[metric] for metric in METRICS}
        logger.info("seed %d %s: BLEU %.2f, chrF %.2f", seed, method, result[BLEU], result[CHRF])
        advance()
    return scores


def _combined_models(parents: list[StateDict], spec: AlignmentSpec,
                     encoder_names: list[str]) -> dict[str, StateDict]:
    """Average and OT-fuse the parents, whole or decoder only, with parent 0 as the anchor."""
    combined = {}
    for label, alignment in COMBINATIONS:
        fused = fuse(parents, spec, options=FusionOptions(alignment=alignment, anchor=0)).state_dict
        combined[label] = fused
        combined[label + DECODER_ONLY_SUFFIX] = fuse_decoder_only(fused, parents[0], encoder_names)
    return combined


def fuse_decoder_only(fused: Mapping[str, torch.Tensor], anchor: Mapping[str, torch.Tensor],
                      encoder_names: Sequence[str]) -> StateDict:
    """Return ``fused`` with the encoder tensors replaced by the anchor's.

    The fusion aligned every model to the anchor, including the encoder-stream map that acts
    on the decoder's cross-attention key and value inputs, so the fused decoder reads the
    anchor's encoder output in the anchor's units.
    """
    missing = [name for name in encoder_names if name not in anchor]
    if missing:
        raise KeyError(f"anchor has no tensor {missing[0]!r}; pass the anchor's full state dict")
    state = dict(fused)
    for name in encoder_names:
        state[name] = anchor[name].clone()
    return state


def _finetune(config: Seq2SeqConfig, state: StateDict, data: EncodedPairs, settings: ExperimentSize,
              seed: int) -> StateDict:
    model = build_seq2seq(config)
    model.load_state_dict(state)
    # The same seed for every fine-tuned model, so all of them see the same batches.
    _train_for_steps(model, data, settings.finetune_steps, settings.batch_size, settings.finetune_lr, seed)
    return {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}


def _train_for_steps(model: torch.nn.Module, data: EncodedPairs, steps: int, batch_size: int, lr: float,
                     seed: int) -> None:
    epochs = math.ceil(steps * batch_size / len(data))
    train_translation(model, data, epochs=epochs, max_steps=steps, batch_size=batch_size, lr=lr, seed=seed)


def summarise(rows: pd.DataFrame) -> pd.DataFrame:
    """Return mean, std (ddof 1) and seed count of each metric per partition scheme and method."""
    grouped = rows.groupby(["partition", "method"], sort=False)[list(METRICS)]
    summary = grouped.agg(["mean", "std", "count"])
    summary.columns = [f"{metric}_{stat}" for metric, stat in summary.columns]
    return summary.reset_index()


def markdown_table(summary: pd.DataFrame, partition: str) -> str:
    """Render one partition scheme's methods as ``mean ± std`` cells of BLEU, chrF and test loss."""
    part = summary[summary["partition"] == partition]
    lines = ["| method | BLEU | chrF | test loss (nats/token) | seeds |", "|---|---|---|---|---|"]
    for _, row in part.iterrows():
        cells = [row["method"]]
        for metric, digits in ((BLEU, 2), (CHRF, 2), (LOSS, 3)):
            std = row[f"{metric}_std"]
            cells.append(f"{row[f'{metric}_mean']:.{digits}f} ± {0.0 if pd.isna(std) else std:.{digits}f}")
        cells.append(str(int(row[f"{BLEU}_count"])))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_scores(summary: pd.DataFrame, path: Path) -> Path:
    """Horizontal bars of BLEU and chrF per method, one colour per partition scheme, std error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = list(dict.fromkeys(summary["method"]))
    partitions = list(dict.fromkeys(summary["partition"]))
    height = 0.8 / len(partitions)
    figure, axes = plt.subplots(1, 2, figsize=(11, 0.45 * len(methods) + 1.5), sharey=True)
    for axis, metric, label in ((axes[0], BLEU, "BLEU"), (axes[1], CHRF, "chrF")):
        for index, partition in enumerate(partitions):
            part = summary[summary["partition"] == partition].set_index("method").reindex(methods)
            positions = [m + index * height for m in range(len(methods))]
            axis.barh(positions, part[f"{metric}_mean"], height, xerr=part[f"{metric}_std"].fillna(0.0),
                      label=f"{partition} partition")
        axis.set_xlabel(f"{label} on the test sample (mean ± std over seeds)")
        axis.grid(axis="x", alpha=0.3)
    axes[0].set_yticks([m + height * (len(partitions) - 1) / 2 for m in range(len(methods))], methods)
    axes[0].invert_yaxis()
    axes[1].legend(fontsize="small")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def _write_outputs(out_dir: Path, rows: pd.DataFrame, summary: pd.DataFrame, settings: ExperimentSize,
                   size: str, seeds: Sequence[int], command: str | None,
                   timing: Mapping[str, float]) -> dict[str, Path]:
    files = {
        "rows": out_dir / "results.csv",
        "summary": out_dir / "summary.csv",
        "plot": out_dir / "translation.png",
        "markdown": out_dir / "results.md",
    }
    rows.to_csv(files["rows"], index=False)
    summary.to_csv(files["summary"], index=False)
    plot_scores(summary, files["plot"])
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    machine = (f"{platform.machine()}, {platform.processor() or 'unknown CPU'}, "
               f"torch {torch.__version__}, {settings.torch_threads} torch thread(s), Python {platform.python_version()}")
    sections = [
        f"# Translation experiment ({size} size)",
        f"Command: `{command or f'run_translation_experiment(size={size!r}, seeds={tuple(seeds)})'}`  \n"
        f"Date: {stamp}  \nMachine: {machine}  \n"
        f"Run time: {timing['wall_seconds'] / 60:.1f} min wall clock, {timing['cpu_seconds'] / 60:.1f} min CPU",
        "Settings: " + ", ".join(f"{key}={value}" for key, value in dataclasses.asdict(settings).items()),
    ]
    for partition in dict.fromkeys(summary["partition"]):
        sections.append(f"## {partition} partition\n\n{markdown_table(summary, partition)}")
    sections.append("![BLEU and chrF per method](translation.png)")
    files["markdown"].write_text("\n\n".join(sections) + "\n", encoding="utf-8")
    return files


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry: parse the options, run the experiment, print where the results are."""
    parser = argparse.ArgumentParser(prog="python -m otfuse.bench.translation", description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("outputs/bench-translation"), help="output folder")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds, one full run each")
    parser.add_argument("--size", choices=sorted(SIZES), default="default", help="experiment size")
    parser.add_argument("--data-dir", type=Path, default=None,
                        help="folder of the local Parquet corpora (default: OTFUSE_DATA_DIR, else the Hub)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    command = "python -m otfuse.bench.translation " + " ".join(sys.argv[1:] if argv is None else argv)
    results = run_translation_experiment(args.out, seeds=args.seeds, size=args.size, data_dir=args.data_dir,
                                         command=command.strip())
    sys.stdout.write(f"wrote {', '.join(str(path) for path in results.files.values())}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
