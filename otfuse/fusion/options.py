"""Options of the fusion engine, validated once at construction."""

from __future__ import annotations

from dataclasses import dataclass

from otfuse.fusion.errors import FusionInputError

ALIGNMENTS = ("hard", "soft", "none")
MASSES = ("uniform", "importance")
COSTS = ("weight", "activation")
PLAN_FAILURE_POLICIES = ("raise", "average")

# Entropic regularisation for soft alignment, relative to a ground cost scaled to [0, 1].
# The transformer-fusion reference configuration (Imfeld et al., 2024) found 0.06 best for
# weight-based costs. At 0.05 a unit keeps all but about exp(-distance / 0.05) of its mass on
# its match, so near ties share mass while distinct units stay apart; at 0.01 plans are
# permutations to within float64 rounding on the tests' models.
DEFAULT_REG = 0.05


@dataclass(frozen=True)
class FusionOptions:
    """How the engine aligns and fuses models.

    Parameters
    ----------
    alignment : {"hard", "soft", "none"}
        ``"hard"`` solves exact optimal transport (``ot.emd``), which gives a permutation for
        equal widths and uniform masses; ``"soft"`` solves entropic optimal transport in the
        log domain (``ot.sinkhorn`` with ``method="sinkhorn_log"``); ``"none"`` uses identity
        maps, which is plain weighted averaging (what FedAvg does).
    reg : float
        Entropic regularisation for soft alignment, relative to the max-normalised cost.
    masses : {"uniform", "importance"}
        Support masses of the units: uniform, or proportional to the norm of each unit's
        descriptor (its incoming weights, or its activations).
    anchor : int
        Index of the model the others are aligned to when no reference model is given.
    barycenter_iters : int
        Extra rounds of aligning every model to the current fused model and averaging again,
        so that no model wins by its position in the list.
    cost : {"weight", "activation"}
        Ground cost from incoming weights (data-free) or from activations on a probe batch.
    match_heads : bool
        Also permute whole attention heads; otherwise head ``h`` is only matched to head ``h``.
    sweeps : int
        Passes over all groups. The first pass describes each group only by tensors whose
        other axes are already solved (the residual stream by the embeddings, LayerNorms and
        biases); later passes use every tensor that produces the group.
    max_sinkhorn_iters : int
        Iteration limit of the Sinkhorn solver.
    on_plan_failure : {"raise", "average"}
        What a plan that fails its checks does: raise :class:`FusionError`, or fall back to
        identity maps (plain averaging) for that group, with a warning and a ``fallback``
        entry in the group's diagnostics. The fallback needs equal widths and raises otherwise.
    """

    alignment: str = "hard"
    reg: float = DEFAULT_REG
    masses: str = "uniform"
    anchor: int = 0
    barycenter_iters: int = 0
    cost: str = "weight"
    match_heads: bool = True
    sweeps: int = 1
    max_sinkhorn_iters: int = 10_000
    on_plan_failure: str = "raise"

    def __post_init__(self) -> None:
        _check_choice("alignment", self.alignment, ALIGNMENTS)
        _check_choice("masses", self.masses, MASSES)
        _check_choice("cost", self.cost, COSTS)
        _check_choice("on_plan_failure", self.on_plan_failure, PLAN_FAILURE_POLICIES)
        if not isinstance(self.reg, (int, float)) or isinstance(self.reg, bool) or not self.reg > 0:
            raise FusionInputError(
                f"reg must be a positive number, got {self.reg!r}; 0.01 to 0.1 suits a max-normalised cost"
            )
        for name, minimum in (("anchor", 0), ("barycenter_iters", 0), ("sweeps", 1), ("max_sinkhorn_iters", 1)):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
                raise FusionInputError(f"{name} must be an integer >= {minimum}, got {value!r}")
        if not isinstance(self.match_heads, bool):
            raise FusionInputError(f"match_heads must be True or False, got {self.match_heads!r}")


def _check_choice(name: str, value: object, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise FusionInputError(f"unknown {name} {value!r}; choose one of {', '.join(choices)}")
