"""Exceptions raised by the fusion engine."""


class FusionInputError(ValueError):
    """The models, weights or options handed to the engine are invalid."""


class FusionError(RuntimeError):
    """Optimal transport failed for one group of units; the message names the group and the fix."""

    def __init__(self, group: str, reason: str, fix: str) -> None:
        super().__init__(f"transport plan for group {group!r} failed: {reason}; {fix}")
        self.group = group
        self.reason = reason
