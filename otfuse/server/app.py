"""The ServerApp: runs the configured strategy and writes the model and per-round metrics."""

from __future__ import annotations

from logging import INFO

from flwr.app import ArrayRecord, ConfigRecord, Context
from flwr.common import log
from flwr.serverapp import Grid, ServerApp

from otfuse.data_partitions import resolve_data_dir
from otfuse.runconfig import (
    DATA_DIR,
    NUM_SERVER_ROUNDS,
    OUTPUT_DIR,
    ROUND_TIMEOUT,
    SEED,
    STRATEGY,
    load_run_config,
)
from otfuse.server.evaluation import GlobalEvaluator
from otfuse.server.outputs import (
    MODEL_FILE,
    RUN_CONFIG_FILE,
    MetricsWriter,
    resolve_output_dir,
    write_json,
)
from otfuse.server.rounds import RoundReporter
from otfuse.strategies import ClientMetricsLog, build_strategy
from otfuse.task import run_model

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Train for ``num-server-rounds`` rounds from a seeded initial model."""
    config = load_run_config(context.run_config)
    strategy_name = config.get(STRATEGY)
    num_rounds = config.get(NUM_SERVER_ROUNDS)
    data_dir = resolve_data_dir(config.get(DATA_DIR) or None)
    output_dir = resolve_output_dir(config.get(OUTPUT_DIR), strategy_name)
    writer = MetricsWriter(output_dir)
    write_json(output_dir / RUN_CONFIG_FILE, config.to_flower())
    log(INFO, "Output folder: %s", output_dir)

    train_log, evaluate_log = ClientMetricsLog(), ClientMetricsLog()
    strategy = build_strategy(
        config, train_metrics_aggr_fn=train_log, evaluate_metrics_aggr_fn=evaluate_log
    )
    task = run_model(config)
    initial_arrays = ArrayRecord(task.exchanged_state(task.build(seed=config.get(SEED))))
    reporter = RoundReporter(
        run_id=context.run_id,
        strategy_name=strategy_name,
        strategy=strategy,
        num_rounds=num_rounds,
        evaluator=GlobalEvaluator(config, data_dir),
        writer=writer,
        train_log=train_log,
        evaluate_log=evaluate_log,
    )

    result = strategy.start(
        grid,
        initial_arrays,
        num_rounds=num_rounds,
        timeout=config.get(ROUND_TIMEOUT),
        train_config=ConfigRecord(),
        evaluate_config=ConfigRecord(),
        evaluate_fn=reporter,
    )

    # Result.arrays stays empty when no round produced a model.
    final_arrays = result.arrays if len(result.arrays) else initial_arrays
    model_path = task.save(
        output_dir / MODEL_FILE,
        final_arrays.to_torch_state_dict(),
        metadata={"otfuse.strategy": strategy_name, "otfuse.num_rounds": str(num_rounds)},
    )
    log(INFO, "Wrote the final model to %s and the metrics to %s", model_path, writer.path)
