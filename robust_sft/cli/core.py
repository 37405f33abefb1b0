"""What every `robust-sft` sub-command shares: the command registry, one-line usage errors and the exit codes.

Exit codes: 0 success; 1 a data or model error (the input cannot be used: a missing file, a bad row, a model that does
not load), one line on stderr; 2 a usage error (an unknown flag, a missing or contradictory option), one line on
stderr. `--debug` shows the full traceback instead of the line.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from dataclasses import dataclass

USAGE_ERROR = 2
DATA_ERROR = 1

# Errors of the input (files, rows, models, options of a config) rather than bugs: reported as one line, exit 1.
# `DataFormatError` is a `ValueError`; `FileNotFoundError` an `OSError`; ImportError names a missing optional package.
DATA_ERRORS: tuple[type[BaseException], ...] = (ValueError, OSError, ImportError)


class UsageError(Exception):
    """A command-line usage error found after parsing (exit code 2), e.g. two options that exclude each other."""


class OneLineErrors:
    """An `argparse.ArgumentParser` mix-in: a usage error is one line on stderr (no usage block), exit code 2."""

    def error(self, message: str):  # noqa: D102 (argparse's signature)
        self.exit(USAGE_ERROR, f"{self.prog}: error: {one_line(message)} (see `{self.prog} --help`)\n")


class ArgumentParser(OneLineErrors, argparse.ArgumentParser):
    """`argparse.ArgumentParser` with one-line usage errors and no abbreviated flags."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)


def one_line(message: object) -> str:
    """A message on one line (a multi-line exception text joined with spaces)."""
    text = str(message.args[0]) if isinstance(message, KeyError) and message.args else str(message)
    return " ".join(part.strip() for part in text.splitlines() if part.strip())


@dataclass(frozen=True)
class Command:
    """A sub-command: its help line, the function declaring its options and the function running it."""

    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


COMMANDS: dict[str, Command] = {}


def command(name: str, help_text: str, add_arguments: Callable[[argparse.ArgumentParser], None]):
    """Register a sub-command: `add_arguments(parser)` declares its options, the decorated function runs it."""

    def register(run: Callable[[argparse.Namespace], int]):
        COMMANDS[name] = Command(help_text, add_arguments, run)
        return run

    return register


def report_error(error: BaseException, code: int) -> int:
    """Print `error` as one line on stderr and return the exit code."""
    print(f"robust-sft: error: {one_line(error)}", file=sys.stderr)
    return code
