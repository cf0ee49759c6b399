"""Flower's own strategies as baselines, configured from the run config.

Each name maps to the class that Flower 1.42 ships in ``flwr.serverapp.strategy``; its
aggregation is Flower's, unchanged. The settings come from the ``fedprox.*``,
``fedavgm.*``, ``fedopt.*`` and ``fedtrimmedavg.*`` run-config keys.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from flwr.serverapp.strategy import FedAdam, FedAvgM, FedMedian, FedProx, FedTrimmedAvg, FedYogi, Strategy

from otfuse.runconfig import (
    FEDAVGM_SERVER_LR,
    FEDAVGM_SERVER_MOMENTUM,
    FEDOPT_BETA_1,
    FEDOPT_BETA_2,
    FEDOPT_ETA,
    FEDOPT_TAU,
    FEDPROX_MU,
    FEDTRIMMEDAVG_BETA,
    RunConfig,
    RunConfigError,
)

#: Run-config strategy names of Flower's baselines, besides "fedavg".
FLOWER_BASELINES: tuple[str, ...] = (
    "fedprox", "fedavgm", "fedadam", "fedyogi", "fedmedian", "fedtrimmedavg",
)


def _fedprox(config: RunConfig) -> tuple[type[Strategy], dict[str, Any]]:
    return FedProx, {"proximal_mu": config.get(FEDPROX_MU)}


def _fedavgm(config: RunConfig) -> tuple[type[Strategy], dict[str, Any]]:
    return FedAvgM, {
        "server_learning_rate": config.get(FEDAVGM_SERVER_LR),
        "server_momentum": config.get(FEDAVGM_SERVER_MOMENTUM),
    }


def _fedopt_options(config: RunConfig) -> dict[str, Any]:
    # Adam's bias correction divides by 1 - beta_1 ** t, so a beta of 1 is invalid.
    for setting in (FEDOPT_BETA_1, FEDOPT_BETA_2):
        if config.get(setting) >= 1.0:
            raise RunConfigError(
                f"run-config key {setting.key!r} is {config.get(setting)!r}; it must be below 1, "
                f"for example --run-config '{setting.key}={setting.default}'"
            )
    return {
        "eta": config.get(FEDOPT_ETA),
        "beta_1": config.get(FEDOPT_BETA_1),
        "beta_2": config.get(FEDOPT_BETA_2),
        "tau": config.get(FEDOPT_TAU),
    }


def _fedtrimmedavg(config: RunConfig) -> tuple[type[Strategy], dict[str, Any]]:
    beta = config.get(FEDTRIMMEDAVG_BETA)
    if beta >= 0.5:
        raise RunConfigError(
            f"run-config key {FEDTRIMMEDAVG_BETA.key!r} is {beta!r}; it must be below 0.5, "
            "because it cuts that fraction of the client values from each end"
        )
    return FedTrimmedAvg, {"beta": beta}


_BUILDERS: dict[str, Callable[[RunConfig], tuple[type[Strategy], dict[str, Any]]]] = {
    "fedprox": _fedprox,
    "fedavgm": _fedavgm,
    "fedadam": lambda config: (FedAdam, _fedopt_options(config)),
    "fedyogi": lambda config: (FedYogi, _fedopt_options(config)),
    "fedmedian": lambda config: (FedMedian, {}),
    "fedtrimmedavg": _fedtrimmedavg,
}


def flower_baseline(name: str, config: RunConfig) -> tuple[type[Strategy], dict[str, Any]]:
    """Return Flower's strategy class for ``name`` and its settings from ``config``.

    The caller adds the sampling settings that every strategy shares.

    Raises
    ------
    RunConfigError
        For a name outside :data:`FLOWER_BASELINES` or a setting Flower would reject.
    """
    if name not in _BUILDERS:
        raise RunConfigError(
            f"unknown Flower baseline {name!r}; choose one of {', '.join(FLOWER_BASELINES)}"
        )
    return _BUILDERS[name](config)
