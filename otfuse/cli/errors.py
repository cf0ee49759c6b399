"""The error type that CLI commands raise for a clear, one-line failure message."""


class CommandError(Exception):
    """A command failed in an expected way; ``otfuse`` prints the message and exits non-zero.

    ``exit_code`` is the process exit status (1 unless set).
    """

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code
