"""What the benchmark scripts share: the machine record, the shared data folder and an atomic report writer."""

from __future__ import annotations

import json
import math
import os
import platform
import shlex
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

HERE = Path(__file__).resolve().parent
SHARED_DATA = HERE.parent.parent / "shared" / "data"
RESULTS = HERE / "results"
STARTED = time.perf_counter()  # a benchmark's wall time counts from its import of this module


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


# `--profile`: the model a benchmark trains. "cpu" is the recorded design: the embedded SmolLM2-135M-Instruct in
# float32. "gpu" runs the same design (rows, steps, scores) on a larger instruct model in bfloat16 on a CUDA device,
# where one is present; `--model` names another hub id or folder. CI never runs it.
PROFILES = {
    "cpu": {"model": None, "dtype": "float32", "device": "cpu"},
    "gpu": {"model": "Qwen/Qwen2.5-1.5B-Instruct", "dtype": "bfloat16", "device": "cuda"},
}
PROFILE = dict(PROFILES["cpu"], name="cpu")  # set by `apply_profile` from the command line


def add_profile_arguments(parser) -> None:
    parser.add_argument(
        "--profile", choices=list(PROFILES), default="cpu",
        help="cpu: the embedded SmolLM2-135M-Instruct (the recorded runs); gpu: the same design on "
        f"{PROFILES['gpu']['model']} in bfloat16 on a CUDA device.",
    )  # fmt: skip
    parser.add_argument("--model", default=None, help="A hub id or model folder replacing the profile's model.")


def apply_profile(args) -> dict:
    """Check `--profile` / `--model` before any work and make them the model every loader below uses."""
    import torch

    if args.profile == "gpu" and getattr(args, "quick", False):
        raise SystemExit("--quick runs the tiny test model on the CPU: drop --profile gpu, or drop --quick.")
    if PROFILES[args.profile]["device"] == "cuda" and not torch.cuda.is_available():
        raise SystemExit(
            "--profile gpu needs a CUDA device, and torch.cuda.is_available() is False here. Run without --profile "
            "for the CPU design on the embedded model, or on a machine with a GPU and a CUDA build of torch."
        )
    PROFILE.update(PROFILES[args.profile], name=args.profile)
    if args.model:
        PROFILE["model"] = args.model
        # another model's results never overwrite the recorded ones: `-<profile>-<model folder or hub name>`
        PROFILE["name"] = f"{args.profile}-{Path(args.model.rstrip('/')).name}"
    return PROFILE


def profile_model_source() -> str:
    """The profile's base model as a local folder: the embedded model's, the `--model` folder, or a hub id's
    snapshot."""
    from robust_sft.modeling import ensure_embedded_model

    if PROFILE["model"] is None:
        return str(ensure_embedded_model())
    if Path(PROFILE["model"]).is_dir():
        return PROFILE["model"]
    # A hub id: downloaded once into the hub cache, so every step that reads weights from a folder (task vectors,
    # SafeLoRA's alignment matrices) finds one.
    from huggingface_hub import snapshot_download

    return snapshot_download(PROFILE["model"])


def report_suffix(quick: bool) -> str:
    """The results files' suffix: `-quick` for a smoke run, `-gpu` for `--profile gpu` (`-<profile>-<model>` with
    `--model`), none for the recorded runs."""
    return "-quick" if quick else "" if PROFILE["name"] == "cpu" else f"-{PROFILE['name']}"


def model_description(quick: bool) -> str:
    if quick:
        return "tiny llama (robust_sft.testing)"
    if PROFILE["model"] is None:
        return "SmolLM2-135M-Instruct (embedded)"
    return f"{PROFILE['model']} ({PROFILE['dtype']}, {PROFILE['device']})"


def load_profile_model(source: str | os.PathLike | None = None):
    """(model, tokenizer) of `source` (default: the profile's model) in the profile's dtype, on its device."""
    import torch

    from robust_sft import load_model_and_tokenizer

    model, tokenizer = load_model_and_tokenizer(
        str(source or profile_model_source()), dtype=getattr(torch, PROFILE["dtype"])
    )
    return model.to(PROFILE["device"]), tokenizer


def load_benchmark_model(quick: bool, seed: int):
    """(model, tokenizer): the tiny in-process llama for --quick, else the profile's model (the embedded
    SmolLM2-135M-Instruct by default); seeded."""
    import torch

    from robust_sft.testing import make_tiny_model, make_tiny_tokenizer

    torch.manual_seed(seed)
    if quick:
        tokenizer = make_tiny_tokenizer()
        return make_tiny_model("llama", tokenizer, seed=seed), tokenizer
    return load_profile_model()


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
        "profile": PROFILE["name"],
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


def resumable_seeds(name: str, args, settings: dict, run_seed, recorded: dict | None = None) -> tuple[dict, dict]:
    """(`{seed: run_seed(seed)}` for every seed of `args.seeds`, `{seed: its wall seconds}`). Each finished seed is
    kept in a hidden file of the output folder, so a stopped run resumes at the next seed (the seconds of the seeds
    run before the stop are kept too: their sum is the run's total). Refused when that file holds another design's
    seeds. `recorded` (from `recorded_seeds`) counts a recorded report's seeds as finished. The caller removes the
    file with `forget_resumed_seeds` once its report is written."""
    settings = json.loads(json.dumps(settings))  # compared with the file's copy: the same types on both sides
    partial = Path(args.output_dir) / f".{name}-seeds.json"
    fresh = json.loads(json.dumps({"settings": settings, "seeds": {}, **(recorded or {})}))  # not the caller's dicts
    saved = json.loads(partial.read_text()) if partial.exists() else fresh
    if saved.get("extended") != fresh.get("extended"):  # a stopped --extend run resumes only as one, and vice versa
        held = f"extends {saved['extended']}" if "extended" in saved else "does not extend a recorded report"
        again = "with" if "extended" in saved else "without"
        raise SystemExit(f"{partial} holds a stopped run that {held}: run it again {again} --extend, or delete it.")
    if saved["settings"] != settings:
        raise SystemExit(f"{partial} holds seeds of other settings ({saved['settings']}); delete it to start over.")
    done, seconds = saved["seeds"], saved.setdefault("seconds", {})
    for seed in args.seeds:
        if str(seed) not in done:
            started = time.perf_counter()
            done[str(seed)] = json.loads(json.dumps(run_seed(seed)))  # a resumed seed reads the same as a fresh one
            seconds[str(seed)] = time.perf_counter() - started
            write_report(partial.parent, partial.stem, saved)
    return {seed: done[str(seed)] for seed in args.seeds}, {seed: seconds.get(str(seed)) for seed in args.seeds}


def recorded_seeds(name: str, args, settings: dict, unrecorded: dict | None = None) -> dict:
    """`--extend`: the seeds of the recorded report `<name>.json` as `resumable_seeds` keeps them, so only the seeds
    it lacks run. Its `per_seed` must be what `run_seed` returns; refused unless it was made with `settings` (a key
    the report predates counts with its value in `unrecorded`, the default it ran with). A one-seed report without
    `seed_seconds` gives that seed its whole wall time. Settings are compared, not code: extend only a report made
    by the same code (its `machine` is kept as `extends_machine`)."""
    path = Path(args.output_dir) / f"{name}.json"
    if not path.is_file():
        raise SystemExit(f"--extend adds seeds to {path}, which does not exist: run without --extend.")
    report = {**json.loads(json.dumps(unrecorded or {})), **json.loads(path.read_text())}
    settings = json.loads(json.dumps(settings))
    differences = {key: (report.get(key), value) for key, value in settings.items() if report.get(key) != value}
    if report["machine"]["torch"] != machine()["torch"]:
        differences["torch"] = (report["machine"]["torch"], machine()["torch"])
    if differences:
        raise SystemExit(f"--extend: {path} was made with other settings (recorded, now): {differences}.")
    dropped = sorted(set(report["per_seed"]) - {str(seed) for seed in args.seeds}, key=int)
    if dropped:  # the report is rewritten with --seeds only: a recorded seed left out would be lost
        every = " ".join(sorted({*report["per_seed"], *map(str, args.seeds)}, key=int))
        raise SystemExit(f"--extend keeps every seed of {path}: --seeds leaves out {dropped}; give --seeds {every}.")
    seconds = report.get("seed_seconds")
    if seconds is None and len(report["seeds"]) == 1:
        seconds = {str(report["seeds"][0]): report["wall_seconds"]}
    return {
        "seeds": report["per_seed"],
        "seconds": seconds or {},
        "extended": report["command"],
        "extended_machine": report["machine"],
    }


def forget_resumed_seeds(name: str, args) -> None:
    """Remove the per-seed file of `resumable_seeds` once the run's report is written."""
    (Path(args.output_dir) / f".{name}-seeds.json").unlink(missing_ok=True)


# Two-sided 95% quantiles of Student's t by degrees of freedom (1..30); 1.96 beyond.
T_975 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
         2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045,
         2.042]  # fmt: skip


def mean_and_interval(values: list[float]) -> dict[str, float | None]:
    """Mean over seeds, the 95% t-interval of the mean (`low`/`high`, None for one value), min and max."""
    n = len(values)
    mean = sum(values) / n
    spread = {"min": min(values), "max": max(values), "n": n}
    if n < 2:
        return {"mean": mean, "low": None, "high": None, **spread}
    deviation = math.sqrt(sum((value - mean) ** 2 for value in values) / (n - 1))
    half = (T_975[n - 2] if n - 1 <= len(T_975) else 1.96) * deviation / math.sqrt(n)
    return {"mean": mean, "low": mean - half, "high": mean + half, **spread}


def summary_table(summary: dict[str, dict[str, dict]], metrics: Sequence[str]) -> str:
    """Markdown: one row per configuration, each metric's mean over seeds with its 95% interval."""
    lines = ["| configuration | " + " | ".join(metrics) + " |", "|---" * (len(metrics) + 1) + "|"]
    for name, values in summary.items():
        cells = []
        for metric in metrics:
            value = values[metric]
            interval = f" [{value['low']:.3f}, {value['high']:.3f}]" if value["low"] is not None else ""
            cells.append(f"{value['mean']:.3f}{interval}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def summary_plot(summary: dict[str, dict[str, dict]], metrics: Sequence[str], path, title: str) -> None:
    """One panel per metric: each configuration's mean with its 95% interval as an error bar."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(summary)
    figure, axes = plt.subplots(1, len(metrics), figsize=(4.2 * len(metrics), 3.6), squeeze=False)
    for axis, metric in zip(axes[0], metrics):
        values = [summary[name][metric] for name in names]
        means = [value["mean"] for value in values]
        below = [value["mean"] - value["low"] if value["low"] is not None else 0.0 for value in values]
        above = [value["high"] - value["mean"] if value["high"] is not None else 0.0 for value in values]
        axis.bar(range(len(names)), means, yerr=[below, above], capsize=3)
        axis.set_xticks(range(len(names)), names, rotation=35, ha="right", fontsize=8)
        axis.set_title(metric, fontsize=10)
    figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def benchmark_parser(doc: str):
    """The arguments every side-by-side benchmark takes: --quick, --seeds, --output-dir."""
    import argparse

    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="A tiny in-process model and a few rows: a smoke run.")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--output-dir", default=str(RESULTS))
    add_profile_arguments(parser)
    return parser


def parse_arguments(parser, argv, sizes: dict[str, tuple]):
    """Parse `argv`; every option of `sizes` left unset takes its (quick, full) default; check and apply
    `--profile`. Sets 2 torch threads."""
    import torch

    args = parser.parse_args(argv)
    apply_profile(args)
    for name, (quick, full) in sizes.items():
        if getattr(args, name) is None:
            setattr(args, name, quick if args.quick else full)
    torch.set_num_threads(2)
    return args


def finish(
    benchmark: str,
    args,
    argv,
    per_seed: dict,
    rows: list[str],
    metrics: tuple,
    plot: str,
    name: str | None = None,
    **facts,
) -> dict:
    """Summarise the seeds (mean, 95% interval, min and max per row and metric), write `<name>[-quick].json`,
    the summary table `<name>[-quick]-summary.md` and its figure `...-summary.png` (`plot` first, then the other
    metrics); return the summary. `name` defaults to `benchmark`, the script's name."""
    import sys

    summary = {
        row: {metric: mean_and_interval([per_seed[seed][row][metric] for seed in args.seeds]) for metric in metrics}
        for row in rows
    }
    name = name or benchmark
    suffix = report_suffix(args.quick)
    command = f"python benchmarks/{benchmark}.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    report = {
        "benchmark": benchmark,
        "command": command.strip(),
        "machine": machine(),
        "model": model_description(args.quick),
        **facts,
        "seeds": args.seeds,
        "interval": "95% t-interval of the mean over seeds (none for one seed)",
        "wall_seconds": time.perf_counter() - STARTED,
        "summary": summary,
        "per_seed": per_seed,
    }
    write_report(args.output_dir, f"{name}{suffix}", report)
    output_dir = Path(args.output_dir)
    (output_dir / f"{name}{suffix}-summary.md").write_text(summary_table(summary, metrics))
    plotted = [plot, *(metric for metric in metrics if metric != plot and not metric.endswith("seconds"))]
    summary_plot(summary, plotted, output_dir / f"{name}{suffix}-summary.png", f"{name}, seeds {args.seeds}")
    print(summary_table(summary, metrics))
    return summary
