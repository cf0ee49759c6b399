"""Alignment specs: a model's structure described as data.

An :class:`AlignmentSpec` says, for every parameter tensor of a model, which transport map
(a *permutation group*) acts on each of its axes. The solver in this package reads only the
spec, so it contains no per-architecture branches: a new architecture needs a new spec, not
new solver code.

Glossary used throughout ``otfuse.fusion``:

* *group*: a set of axes, across parameters, that one transport map acts on, for example the
  residual stream or the hidden units of one MLP.
* *out axis*: an axis along which a tensor produces the group's units (the rows of a linear
  layer's weight, a bias, the feature axis of an embedding table, a LayerNorm scale). Out axes
  describe the units when the ground cost is built, and they are transformed with the
  column-normalised plan, so that every unit of the target is a convex combination of source
  units.
* *in axis*: an axis along which a tensor consumes the group's units (the columns of a linear
  layer's weight). In axes are transformed with the row-normalised plan, so that the
  contributions of merged source units add up.
* *exempt axis* (``None``): an axis whose entries are matched by identity across models, such
  as vocabulary rows, position rows or class rows. Its size must agree between models.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

AxisRole = Literal["out", "in"]


class SpecError(ValueError):
    """An alignment spec is inconsistent, or does not match the tensors it is applied to."""


@dataclass(frozen=True)
class Axis:
    """One tensor axis that a transport map acts on: the group's name and the axis role."""

    group: str
    role: AxisRole

    def __post_init__(self) -> None:
        if self.role not in ("out", "in"):
            raise SpecError(f"axis role must be 'out' or 'in', got {self.role!r}")


def out_axis(group: str) -> Axis:
    """Return an axis along which a tensor produces the units of ``group``."""
    return Axis(group, "out")


def in_axis(group: str) -> Axis:
    """Return an axis along which a tensor consumes the units of ``group``."""
    return Axis(group, "in")


@dataclass(frozen=True)
class GroupSpec:
    """A permutation group: the units that one transport map matches.

    Parameters
    ----------
    name : str
        Unique name, for example ``"resid"`` or ``"blocks.0.mlp"``.
    size : int
        Number of units in this model.
    num_heads : int
        Number of attention heads the units are split into (contiguous, equal blocks of
        ``size // num_heads`` units). With more than one head, units are only matched within a
        pair of heads, because attention weights are computed per head.
    head_tie : str or None
        Groups that carry the same ``head_tie`` share one head-level plan, so that a head moves
        as a whole: the query/key units and the value/output units of one attention layer.
    """

    name: str
    size: int
    num_heads: int = 1
    head_tie: str | None = None

    @property
    def head_size(self) -> int:
        return self.size // self.num_heads


@dataclass(frozen=True)
class TensorSpec:
    """A parameter tensor: its name, shape and the group (or ``None``) on each axis."""

    name: str
    shape: tuple[int, ...]
    axes: tuple[Axis | None, ...]

    def groups_on_axes(self) -> Iterable[tuple[int, Axis]]:
        for index, axis in enumerate(self.axes):
            if axis is not None:
                yield index, axis


@dataclass(frozen=True)
class AlignmentSpec:
    """A validated description of which transport map acts on each axis of each tensor.

    Build one with :class:`SpecBuilder`. ``groups`` is ordered: it is the order in which the
    solver computes the maps, and a group's first solve may only use tensors whose other axes
    belong to earlier groups or are exempt.
    """

    groups: Mapping[str, GroupSpec]
    tensors: Mapping[str, TensorSpec]
    model_type: str = ""
    exempt_sizes: Mapping[str, tuple[int | None, ...]] = field(default_factory=dict)

    def tensors_of(self, group: str) -> list[tuple[TensorSpec, int, Axis]]:
        """List ``(tensor, axis index, axis)`` for every axis that ``group`` acts on."""
        found = []
        for tensor in self.tensors.values():
            for index, axis in tensor.groups_on_axes():
                if axis.group == group:
                    found.append((tensor, index, axis))
        return found

    def check_state_dict(self, state_dict: Mapping[str, object], label: str = "model") -> None:
        """Raise :class:`SpecError` unless ``state_dict`` has exactly the spec's tensors and shapes."""
        missing = [name for name in self.tensors if name not in state_dict]
        extra = [name for name in state_dict if name not in self.tensors]
        if missing:
            raise SpecError(
                f"{label} is missing tensor {missing[0]!r} (and {len(missing) - 1} more) that its "
                "alignment spec lists; check that the checkpoint matches the model config"
            )
        if extra:
            raise SpecError(
                f"{label} has tensor {extra[0]!r} (and {len(extra) - 1} more) that its alignment "
                "spec does not list; add it to the spec or remove it from the state dict"
            )
        for name, tensor in self.tensors.items():
            shape = tuple(state_dict[name].shape)  # type: ignore[attr-defined]
            if shape != tensor.shape:
                raise SpecError(
                    f"{label}: tensor {name!r} has shape {shape}, but its alignment spec expects "
                    f"{tensor.shape}; the config does not match the weights"
                )

    def check_compatible(self, other: AlignmentSpec, label: str = "model") -> None:
        """Raise :class:`SpecError` unless ``other`` has the same structure (sizes may differ).

        Two specs are compatible when they list the same tensors with the same groups on the
        same axes, the same groups with the same number of heads, and equal exempt axis sizes
        (vocabulary, positions, classes): only the group sizes, the widths, may differ.
        """
        if list(self.groups) != list(other.groups):
            raise SpecError(
                f"{label} has groups {list(other.groups)[:4]}... but the target has "
                f"{list(self.groups)[:4]}...; models of different depth or architecture cannot "
                "be fused"
            )
        if set(self.tensors) != set(other.tensors):
            differing = sorted(set(self.tensors) ^ set(other.tensors))
            raise SpecError(
                f"{label}: tensor {differing[0]!r} exists in only one of the models; models of "
                "different depth or architecture cannot be fused"
            )
        for name, group in self.groups.items():
            if group.num_heads != other.groups[name].num_heads:
                raise SpecError(
                    f"{label}: group {name!r} has {other.groups[name].num_heads} heads, the target "
                    f"has {group.num_heads}; fuse models with the same number of heads"
                )
        for name, tensor in self.tensors.items():
            theirs = other.tensors[name]
            if tensor.axes != theirs.axes:
                raise SpecError(f"{label}: tensor {name!r} has other axis groups than the target")
            for index, axis in enumerate(tensor.axes):
                if axis is None and tensor.shape[index] != theirs.shape[index]:
                    raise SpecError(
                        f"{label}: tensor {name!r} has size {theirs.shape[index]} on exempt axis "
                        f"{index}, the target has {tensor.shape[index]}; exempt axes such as the "
                        "vocabulary, positions and classes must agree between fused models"
                    )


class SpecBuilder:
    """Collect groups and tensor axes, then build a validated :class:`AlignmentSpec`.

    Example
    -------
    >>> builder = SpecBuilder()
    >>> builder.add_group("hidden")
    >>> builder.linear("fc1", out_group="hidden", in_group=None)
    >>> builder.linear("fc2", out_group=None, in_group="hidden")
    >>> spec = builder.build({"fc1.weight": (8, 3), "fc1.bias": (8,),
    ...                       "fc2.weight": (2, 8), "fc2.bias": (2,)})
    >>> spec.groups["hidden"].size
    8
    """

    def __init__(self, model_type: str = "") -> None:
        self.model_type = model_type
        self._groups: dict[str, tuple[int, str | None]] = {}
        self._axes: dict[str, tuple[Axis | None, ...]] = {}

    def add_group(self, name: str, num_heads: int = 1, head_tie: str | None = None) -> None:
        if name in self._groups:
            raise SpecError(f"group {name!r} is declared twice")
        if num_heads < 1:
            raise SpecError(f"group {name!r}: num_heads must be at least 1, got {num_heads}")
        self._groups[name] = (num_heads, head_tie)

    def add_tensor(self, name: str, axes: Sequence[Axis | None]) -> None:
        if name in self._axes:
            raise SpecError(f"tensor {name!r} is claimed twice; list each tensor once")
        self._axes[name] = tuple(axes)

    def linear(
        self, prefix: str, out_group: str | None, in_group: str | None, bias: bool = True
    ) -> None:
        """Add ``prefix.weight`` of shape (out, in) and, if ``bias``, ``prefix.bias`` of shape (out,)."""
        out_entry = out_axis(out_group) if out_group else None
        in_entry = in_axis(in_group) if in_group else None
        self.add_tensor(f"{prefix}.weight", (out_entry, in_entry))
        if bias:
            self.add_tensor(f"{prefix}.bias", (out_entry,))

    def norm(self, prefix: str, group: str, bias: bool = True) -> None:
        """Add a LayerNorm's scale (and shift) over ``group``."""
        self.add_tensor(f"{prefix}.weight", (out_axis(group),))
        if bias:
            self.add_tensor(f"{prefix}.bias", (out_axis(group),))

    def embedding(self, name: str, group: str) -> None:
        """Add an embedding table of shape (entries, features): entries exempt, features ``group``."""
        self.add_tensor(name, (None, out_axis(group)))

    def build(self, shapes: Mapping[str, Sequence[int]]) -> AlignmentSpec:
        """Validate the collected axes against ``shapes`` and return the spec.

        Raises
        ------
        SpecError
            If a tensor has no shape or no axes listed, an axis count differs from the tensor's
            rank, an axis names an undeclared group, two axes of one group disagree in size, a
            group's size is not divisible by its heads, or a group has no out axis that can be
            solved in order.
        """
        unlisted = [name for name in shapes if name not in self._axes]
        if unlisted:
            raise SpecError(
                f"tensor {unlisted[0]!r} has no axes in the alignment spec; claim each of its "
                "axes with a group or declare it exempt with None"
            )
        unknown = [name for name in self._axes if name not in shapes]
        if unknown:
            raise SpecError(f"tensor {unknown[0]!r} is in the alignment spec but not in the model")

        sizes: dict[str, tuple[int, str]] = {}
        tensors: dict[str, TensorSpec] = {}
        for name, axes in self._axes.items():
            shape = tuple(int(s) for s in shapes[name])
            if len(axes) != len(shape):
                raise SpecError(
                    f"tensor {name!r} has {len(shape)} axes {shape}, but the spec lists {len(axes)}"
                )
            for index, axis in enumerate(axes):
                if axis is None:
                    continue
                if axis.group not in self._groups:
                    raise SpecError(f"tensor {name!r} axis {index} uses undeclared group {axis.group!r}")
                if axis.group in sizes and sizes[axis.group][0] != shape[index]:
                    size, first = sizes[axis.group]
                    raise SpecError(
                        f"tensor {name!r} axis {index} has size {shape[index]}, but group "
                        f"{axis.group!r} has size {size} on {first!r}; one map cannot act on both"
                    )
                sizes.setdefault(axis.group, (shape[index], name))
            tensors[name] = TensorSpec(name, shape, tuple(axes))

        groups: dict[str, GroupSpec] = {}
        for name, (num_heads, head_tie) in self._groups.items():
            if name not in sizes:
                raise SpecError(f"group {name!r} is declared but no tensor axis uses it")
            size = sizes[name][0]
            if size % num_heads:
                raise SpecError(f"group {name!r} has {size} units, not divisible by {num_heads} heads")
            groups[name] = GroupSpec(name, size, num_heads, head_tie)

        _check_ties(groups)
        _check_solvable(groups, tensors)
        return AlignmentSpec(groups=groups, tensors=tensors, model_type=self.model_type)


def _check_ties(groups: Mapping[str, GroupSpec]) -> None:
    heads_by_tie: dict[str, int] = {}
    for group in groups.values():
        if group.head_tie is None:
            continue
        expected = heads_by_tie.setdefault(group.head_tie, group.num_heads)
        if expected != group.num_heads:
            raise SpecError(
                f"group {group.name!r} has {group.num_heads} heads but other groups of head tie "
                f"{group.head_tie!r} have {expected}"
            )


def _check_solvable(groups: Mapping[str, GroupSpec], tensors: Mapping[str, TensorSpec]) -> None:
    """Check that every group has an out axis whose other axes are exempt or solved earlier."""
    solved: set[str] = set()
    for name in groups:
        usable = False
        for tensor in tensors.values():
            for index, axis in tensor.groups_on_axes():
                if axis.group != name or axis.role != "out":
                    continue
                others = [a.group for i, a in tensor.groups_on_axes() if i != index]
                if all(other in solved for other in others):
                    usable = True
        if not usable:
            raise SpecError(
                f"group {name!r} has no out axis on a tensor whose other axes are exempt or "
                "belong to earlier groups; reorder the groups or add a tensor that produces it"
            )
        solved.add(name)
