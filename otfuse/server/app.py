"""The ServerApp: runs the configured strategy and writes the model, metrics and checkpoints."""

from __future__ import annotations

from logging import INFO
from pathlib import Path

from flwr.app import ArrayRecord, Context, MetricRecord
from flwr.common import log
from flwr.serverapp import Grid, ServerApp

from otfuse.data_partitions import resolve_data_dir
from otfuse.runconfig import (
    CHECKPOINT_KEEP,
    DATA_DIR,
    NUM_SERVER_ROUNDS,
    OUTPUT_DIR,
    RESUME_FROM,
    ROUND_TIMEOUT,
    SECAGG_ENABLED,
    SEED,
    STRATEGY,
    load_run_config,
)
from otfuse.server.checkpoints import CHECKPOINT_DIR, CheckpointStore, load_resume_checkpoint
from otfuse.server.evaluation import GlobalEvaluator
from otfuse.server.outputs import (
    MODEL_FILE,
    RUN_CONFIG_FILE,
    MetricsWriter,
    resolve_output_dir,
    write_json,
)
from otfuse.server.loop import run_rounds
from otfuse.server.rounds import RoundReporter
from otfuse.server.secagg import run_secure_rounds
from otfuse.strategies import ClientMetricsLog, build_strategy
from otfuse.task import RunModel, run_model

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Train for ``num-server-rounds`` rounds from a seeded initial model or a checkpoint.

    With ``secagg.enabled`` the rounds run in Flower's legacy SecAgg+ workflow
    (:mod:`otfuse.server.secagg`); the outputs are the same.
    """
    config = load_run_config(context.run_config)
    strategy_name = config.get(STRATEGY)
    num_rounds = config.get(NUM_SERVER_ROUNDS)
    data_dir = resolve_data_dir(config.get(DATA_DIR) or None)
    output_dir = resolve_output_dir(config.get(OUTPUT_DIR), strategy_name)
    writer = MetricsWriter(output_dir)
    write_json(output_dir / RUN_CONFIG_FILE, config.to_flower())
    log(INFO, "Output folder: %s", output_dir)

    train_log, evaluate_log = ClientMetricsLog(), ClientMetricsLog()
    secure = config.get(SECAGG_ENABLED)
    strategy = None if secure else build_strategy(
        config, train_metrics_aggr_fn=train_log, evaluate_metrics_aggr_fn=evaluate_log
    )
    task = run_model(config)
    arrays = ArrayRecord(task.exchanged_state(task.build(seed=config.get(SEED))))
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
    store = CheckpointStore(output_dir / CHECKPOINT_DIR, keep=config.get(CHECKPOINT_KEEP), write=task.save)

    def finish_round(server_round: int, round_arrays: ArrayRecord) -> MetricRecord:
        summary = reporter(server_round, round_arrays)
        store.save(
            server_round,
            round_arrays.to_torch_state_dict(),
            run_config=config.to_flower(),
            strategy_state=strategy.state_dict() if strategy is not None else {},
            metrics=reporter.records,
        )
        return summary

    if strategy is None:
        arrays = run_secure_rounds(
            grid, context, config, arrays, on_round_end=finish_round, train_log=train_log
        )
        _save_final(task, output_dir, arrays, strategy_name, num_rounds, writer)
        return

    log(INFO, "Starting %s strategy:", type(strategy).__name__)
    strategy.summary()
    if config.get(RESUME_FROM):
        checkpoint = load_resume_checkpoint(config.get(RESUME_FROM), config, arrays.to_torch_state_dict())
        arrays = ArrayRecord(checkpoint.state_dict)
        strategy.load_state_dict(checkpoint.strategy_state)
        reporter.records = list(checkpoint.metrics)
        writer.rewrite(reporter.records)
        first_round = checkpoint.server_round + 1
        log(INFO, "Resuming after round %d from %s", checkpoint.server_round, checkpoint.path)
    else:
        finish_round(0, arrays)
        first_round = 1

    arrays = run_rounds(
        strategy,
        grid,
        arrays,
        first_round=first_round,
        num_rounds=num_rounds,
        timeout=config.get(ROUND_TIMEOUT),
        on_round_end=finish_round,
    )
    _save_final(task, output_dir, arrays, strategy_name, num_rounds, writer)


def _save_final(
    task: RunModel, output_dir: Path, arrays: ArrayRecord, strategy_name: str, num_rounds: int,
    writer: MetricsWriter,
) -> None:
    model_path = task.save(
        output_dir / MODEL_FILE,
        arrays.to_torch_state_dict(),
        metadata={"otfuse.strategy": strategy_name, "otfuse.num_rounds": str(num_rounds)},
    )
    log(INFO, "Wrote the final model to %s and the metrics to %s", model_path, writer.path)
