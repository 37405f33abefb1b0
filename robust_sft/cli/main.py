"""The `robust-sft` entry point: the top-level parser and the exit codes (see [`robust_sft.cli.core`]).

Nothing here imports torch: `robust-sft --help`, `robust-sft train --help` and `robust-sft env` answer at once. A
sub-command imports what it needs when it runs; `train <method>` hands its flags to TRL's parser (like `trl sft`).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from ..methods import METHODS
from . import env, evaluate, tools  # noqa: F401 (each module registers its commands)
from .core import COMMANDS, DATA_ERROR, DATA_ERRORS, USAGE_ERROR, ArgumentParser, UsageError, report_error


def _add_train(subparsers: argparse._SubParsersAction) -> None:
    train = subparsers.add_parser(
        "train",
        help="Fine-tune with a registered method: `robust-sft train <method> --help` lists its flags.",
        description="Fine-tune with a robust_sft method. The flags are those of `trl sft` plus the method's config "
        "(`robust-sft train <method> --help`); `--config recipe.yaml` reads a recipe.",
    )
    methods = train.add_subparsers(dest="method", required=True, metavar="<method>")
    for method in METHODS.values():
        if not method.trainable_from_cli:
            continue
        # add_help=False: `--help` and every other flag go to the method's TrlParser (see train.parse_args).
        methods.add_parser(method.name, help=method.summary, add_help=False)
    # An alias kept from earlier releases: `robust-sft realign ...` is `robust-sft train realign ...`.
    subparsers.add_parser("realign", help="Alias of `robust-sft train realign`.", add_help=False)


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser: every registered sub-command, and `train <method>` per registry entry."""
    parser = ArgumentParser(prog="robust-sft", description="Robust instruction tuning on top of TRL.")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice).")
    parser.add_argument(
        "--debug",
        action="store_true",
        help="Show the full traceback of an error (before the sub-command: `robust-sft --debug train sft ...`).",
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="<command>")
    _add_train(subparsers)
    for name, spec in COMMANDS.items():
        spec.add_arguments(subparsers.add_parser(name, help=spec.help, description=spec.help))
    return parser


def _run(args: argparse.Namespace, rest: list[str]) -> int:
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.command in ("train", "realign"):
        from .train import train

        return train(getattr(args, "method", "realign"), rest)
    return COMMANDS[args.command].run(args)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `robust-sft` console script; returns the exit code (0, 1 data error, 2 usage error)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    # `--debug` is read before the sub-command only: after it, a flag (TrainingArguments' own `--debug`) is the
    # sub-command's, passed through untouched.
    args, rest = parser.parse_known_args(argv)
    debug = args.debug
    if rest and args.command not in ("train", "realign"):
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    try:
        return _run(args, rest)
    except UsageError as error:
        if debug:
            raise
        return report_error(error, USAGE_ERROR)
    except DATA_ERRORS as error:
        if debug:
            raise
        return report_error(error, DATA_ERROR)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
