"""What the benchmark scripts share: the machine record, the shared data folder and an atomic report writer."""

from __future__ import annotations

import json
import os
import platform
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
SHARED_DATA = HERE.parent.parent / "shared" / "data"
RESULTS = HERE / "results"


_SCRATCH: list[tempfile.TemporaryDirectory] = []


def scratch_dir(name: str) -> str:
    """A temporary folder for a trainer's output_dir, removed when the benchmark exits."""
    directory = tempfile.TemporaryDirectory(prefix=f"robust-sft-{name}-")
    _SCRATCH.append(directory)  # kept alive until exit, where its finaliser removes it
    return directory.name


def training_args(name: str, seed: int, **settings) -> dict:
    """The trainer arguments every benchmark shares (batch 8, no checkpointing, nothing saved or reported) plus
    `settings` (the method's own: steps, learning rate, ...)."""
    common = dict(
        output_dir=scratch_dir(name),
        per_device_train_batch_size=8,
        gradient_checkpointing=False,
        report_to=[],
        save_strategy="no",
        logging_steps=5,
        seed=seed,
    )
    return common | settings


def load_benchmark_model(quick: bool, seed: int):
    """(model, tokenizer): the tiny in-process llama for --quick, else the embedded SmolLM2-135M-Instruct; seeded."""
    import torch

    from robust_sft import load_model_and_tokenizer
    from robust_sft.testing import make_tiny_model, make_tiny_tokenizer

    torch.manual_seed(seed)
    if quick:
        tokenizer = make_tiny_tokenizer()
        return make_tiny_model("llama", tokenizer, seed=seed), tokenizer
    return load_model_and_tokenizer()


def machine() -> dict:
    """The facts a reader needs to compare a run with their own."""
    import torch

    return {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
    }


def write_report(output_dir: str | os.PathLike, name: str, report: dict) -> Path:
    """`<name>.json` written atomically (a reader never sees half a file)."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    temporary = output_dir / f".{name}.json.tmp"
    temporary.write_text(json.dumps(report, indent=2))
    path = output_dir / f"{name}.json"
    os.replace(temporary, path)
    return path


def mean_and_spread(values: list[float]) -> dict[str, float]:
    """Mean, min and max over seeds (the spread a reader should weigh the mean against)."""
    return {"mean": sum(values) / len(values), "min": min(values), "max": max(values), "n": len(values)}


def benchmark_parser(doc: str):
    """The arguments every side-by-side benchmark takes: --quick, --seeds, --output-dir."""
    import argparse

    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="A tiny in-process model and a few rows: a smoke run.")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--output-dir", default=str(RESULTS))
    return parser


def parse_arguments(parser, argv, sizes: dict[str, tuple]):
    """Parse `argv`; every option of `sizes` left unset takes its (quick, full) default. Sets 2 torch threads."""
    import torch

    args = parser.parse_args(argv)
    for name, (quick, full) in sizes.items():
        if getattr(args, name) is None:
            setattr(args, name, quick if args.quick else full)
    torch.set_num_threads(2)
    return args


def finish(benchmark: str, args, argv, per_seed: dict, rows: list[str], metrics: tuple, plot: str, **facts) -> dict:
    """Summarise the seeds (mean and spread per row and metric), write `<benchmark>[-quick].json` and the summary
    table and plot; return the summary."""
    import sys

    from robust_sft.evaluation import write_results

    summary = {
        name: {metric: mean_and_spread([per_seed[seed][name][metric] for seed in args.seeds]) for metric in metrics}
        for name in rows
    }
    suffix = "-quick" if args.quick else ""
    command = f"python benchmarks/{benchmark}.py " + " ".join(sys.argv[1:] if argv is None else argv)
    report = {
        "benchmark": benchmark,
        "command": command.strip(),
        "machine": machine(),
        "model": "tiny llama (robust_sft.testing)" if args.quick else "SmolLM2-135M-Instruct (embedded)",
        **facts,
        "seeds": args.seeds,
        "summary": summary,
        "per_seed": per_seed,
    }
    write_report(args.output_dir, f"{benchmark}{suffix}", report)
    table = {name: {metric: values["mean"] for metric, values in summary[name].items()} for name in rows}
    write_results(table, args.output_dir, f"{benchmark}{suffix}-summary", metric=plot, title=f"{benchmark}: {plot}")
    for name, row in table.items():
        print(f"{name:>24}: " + ", ".join(f"{key} {value:.3f}" for key, value in row.items()))
    return summary
