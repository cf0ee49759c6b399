"""Optimal transport solves in float64 with POT, and checks of every plan.

Notation: ``a`` (n_source,) and ``b`` (n_target,) are the support masses, ``M`` the ground
cost (n_source, n_target), and the plan ``T`` solves

.. math::
    \\min_{T \\ge 0,\\; T 1 = a,\\; T^\\top 1 = b} \\langle T, M \\rangle - \\mathrm{reg} \\cdot H(T)

with ``reg = 0`` for hard alignment (``ot.emd``) and ``reg > 0`` for soft alignment
(``ot.sinkhorn``, log-domain method, which stays finite at small ``reg`` where the plain
method's kernel ``exp(-M / reg)`` underflows).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np

from otfuse.fusion.errors import FusionError

# L1 error allowed on both marginals together. Exact OT meets it to rounding error. Sinkhorn
# stops at 1e-9 on one marginal but converges slowly on small near-degenerate problems at
# small reg (a 6 x 6 problem at reg 0.01 stalls near 5e-5 after 10,000 iterations), so soft
# plans may miss by 1e-4. The maps are renormalised by their row and column sums before use,
# so such an error does not change the scale of the fused weights.
MARGINAL_TOLERANCE = {"hard": 1e-8, "soft": 1e-4}
SINKHORN_STOP_THRESHOLD = 1e-9


@dataclass(frozen=True)
class SolveInfo:
    """What one solve reports: its transport cost, iterations and marginal error."""

    cost: float
    iterations: int
    marginal_error: float


def solve(
    cost: np.ndarray,
    a: np.ndarray,
    b: np.ndarray,
    alignment: str,
    reg: float,
    group: str,
    max_iters: int = 10_000,
) -> tuple[np.ndarray, SolveInfo]:
    """Solve one transport problem and check the plan.

    Parameters
    ----------
    cost : ndarray, shape (n_source, n_target)
        Ground cost ``M``, already scaled to [0, 1].
    a, b : ndarray, shape (n_source,) and (n_target,)
        Support masses, each positive and summing to 1.
    alignment : {"hard", "soft"}
    reg : float
        Entropic regularisation (soft alignment only).
    group : str
        Name of the group, used in error messages.

    Returns
    -------
    plan : ndarray, shape (n_source, n_target), float64
    info : SolveInfo

    Raises
    ------
    FusionError
        If the plan is not finite, has negative entries, or its marginals miss ``a`` or ``b``
        by more than the tolerance.
    """
    import ot  # POT imports in about 5 s, so only the code that solves pays for it.

    cost = np.ascontiguousarray(cost, dtype=np.float64)
    a = np.ascontiguousarray(a, dtype=np.float64)
    b = np.ascontiguousarray(b, dtype=np.float64)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if alignment == "hard":
            plan, log = ot.emd(a, b, cost, numItermax=max(100_000, 10 * cost.size), log=True)
            iterations = 0
            solver_warning = log.get("warning")
        else:
            plan, log = ot.sinkhorn(
                a, b, cost, reg, method="sinkhorn_log", numItermax=max_iters,
                stopThr=SINKHORN_STOP_THRESHOLD, log=True, warn=True,
            )
            iterations = int(log.get("niter", 0)) + 1
            solver_warning = None
    messages = [str(w.message) for w in caught]
    if solver_warning:
        messages.append(str(solver_warning))
    plan = np.asarray(plan, dtype=np.float64)
    marginal_error = check_plan(plan, a, b, alignment, group, messages)
    info = SolveInfo(cost=float(np.sum(plan * cost)), iterations=iterations, marginal_error=marginal_error)
    return plan, info


def check_plan(
    plan: np.ndarray, a: np.ndarray, b: np.ndarray, alignment: str, group: str,
    solver_messages: list[str] | None = None,
) -> float:
    """Return the L1 marginal error of ``plan``; raise :class:`FusionError` if it is unusable."""
    note = f" (solver said: {'; '.join(solver_messages)})" if solver_messages else ""
    fix = (
        "raise the regularisation `reg` or the Sinkhorn iteration limit, or use hard alignment"
        if alignment == "soft"
        else "check the models for duplicated or degenerate units, or use soft alignment"
    )
    if plan.shape != (a.size, b.size):
        raise FusionError(group, f"plan has shape {plan.shape}, expected {(a.size, b.size)}", fix)
    if not np.all(np.isfinite(plan)):
        raise FusionError(group, "plan contains NaN or infinite values" + note, fix)
    if plan.min() < -1e-12:
        raise FusionError(group, f"plan has a negative entry {plan.min():.3g}" + note, fix)
    total = plan.sum()
    if abs(total - 1.0) > MARGINAL_TOLERANCE[alignment]:
        raise FusionError(group, f"plan carries total mass {total:.6g} instead of 1" + note, fix)
    error = float(np.abs(plan.sum(1) - a).sum() + np.abs(plan.sum(0) - b).sum())
    if error > MARGINAL_TOLERANCE[alignment]:
        raise FusionError(
            group,
            f"plan marginals miss the support masses by {error:.3g} (tolerance "
            f"{MARGINAL_TOLERANCE[alignment]:g})" + note,
            fix,
        )
    return error
