"""Entry point of the ``otfuse`` command: one subcommand per module.

Each module in :data:`SUBCOMMAND_MODULES` has a ``register(subparsers)`` function that adds
its parser and sets ``handler`` to a function taking the parsed arguments and returning an
exit status. Add a subcommand by adding its module here.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from rich.console import Console

from otfuse.cli.errors import CommandError

SUBCOMMAND_MODULES: tuple[str, ...] = (
    "otfuse.cli.run_command",
    "otfuse.cli.fuse_command",
    "otfuse.cli.bench_command",
    "otfuse.cli.data_command",
)

EXIT_INTERRUPTED = 130


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="otfuse",
        description=(
            "Federated learning of small transformers with optimal-transport model fusion, "
            "on Flower."
        ),
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module_name in SUBCOMMAND_MODULES:
        importlib.import_module(module_name).register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one subcommand and return its exit status; errors become one line on stderr."""
    parser = build_parser()
    args = parser.parse_args(argv)
    errors = Console(stderr=True, highlight=False, soft_wrap=True)
    try:
        return int(args.handler(args))
    except CommandError as error:
        errors.print(f"otfuse {args.command}: error: {error}", markup=False)
        return error.exit_code
    except KeyboardInterrupt:
        errors.print(f"otfuse {args.command}: interrupted", markup=False)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
