"""Keys of the records that the ServerApp and the ClientApp exchange.

``arrays``, ``config``, ``num-examples`` and ``server-round`` are the keys that Flower's
``FedAvg`` uses. Metric names follow :mod:`otfuse.training` (``train_loss``); only the weight
key keeps Flower's hyphenated spelling.
"""

ARRAYS = "arrays"
CONFIG = "config"
METRICS = "metrics"
SERVER_ROUND = "server-round"
#: Weight of FedProx's proximal term, which Flower's FedProx adds to every train config.
PROXIMAL_MU = "proximal-mu"
NUM_EXAMPLES = "num-examples"

PARTITION_ID = "partition-id"
NUM_PARTITIONS = "num-partitions"

TRAIN_LOSS = "train_loss"
TRAIN_ACCURACY = "train_accuracy"
TRAIN_SECONDS = "train_seconds"
#: Mean transport cost of a client-aligned model to the global model (strategy otfusion-client).
ALIGNMENT_COST = "alignment_cost"

EVAL_LOSS = "eval_loss"
EVAL_ACCURACY = "eval_accuracy"
EVAL_F1_WEIGHTED = "eval_f1_weighted"
