"""Cost of each trainer against plain `trl.SFTTrainer` on identical batches: seconds per optimiser step, peak memory.

    python benchmarks/cost.py                 # the embedded SmolLM2-135M-Instruct, SST-2 instruction rows
    python benchmarks/cost.py --quick         # a tiny in-process model, a few steps (the CI smoke run)

Every configuration trains in its own child process (so peak memory is its own; `--quick` runs them in-process)
on the same rows, in the same order, with the same LoRA and batch; the parent writes `results/cost[-quick].json`
and a markdown table, each figure also as a ratio to plain SFTTrainer. Step time: the median after `--warmup`.
Memory: the peak resident size of the training loop alone (VmHWM reset before `train()`), with glibc returning freed
large buffers at once (`MALLOC_MMAP_THRESHOLD_=65536` in the children), so it follows live tensors; on a GPU the
report also holds `torch.cuda.max_memory_allocated`.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

from common import (
    PROFILE,
    RESULTS,
    SHARED_DATA,
    add_profile_arguments,
    apply_profile,
    load_profile_model,
    machine,
    model_description,
    report_suffix,
    scratch_dir,
    write_report,
)

# name -> (trainer, config overrides)
CONFIGURATIONS = {
    "SFTTrainer (trl)": ("trl", {}),
    "RobustSFTTrainer": ("sft", {}),
    "TAIATrainer": ("taia", {}),
    # ANIT at its defaults but for the named option: the two-pass step on every step (<= 2x SFT expected), the default
    # schedule (the term every 2nd step: compare the mean step time, ~1.5x), the single-backward fallback
    # (DeepSpeed's path) on every step, and noisy instructions alone.
    "ANIT two-pass, every step": ("anit", {"distortion_metric": "levenshtein", "adversarial_every": 1}),
    "ANIT default schedule": ("anit", {"distortion_metric": "levenshtein"}),
    "ANIT single backward, every step": (
        "anit",
        {"distortion_metric": "levenshtein", "adversarial_every": 1, "adversarial_passes": "one"},
    ),
    "ANIT noise only": ("anit", {"use_adversarial": False, "distortion_metric": "levenshtein"}),
    "DELIATrainer (task rows only)": ("delia", {"diverse_ratio": 0.0}),
}


def sst2_rows(count: int) -> list[dict]:
    """SST-2 sentences as conversational prompt/completion rows (a format both TRL and robust_sft read)."""
    path = SHARED_DATA / "sst2" / "train.tsv"
    rows = []
    with open(path, encoding="utf-8") as handle:
        next(handle)
        for line in handle:
            sentence, label = line.rstrip("\n").rsplit("\t", 1)
            if len(sentence.split()) < 8:
                continue
            prompt = f"Classify the sentiment of the review as positive or negative.\n\n{sentence.strip()}"
            answer = "positive" if label == "1" else "negative"
            rows.append(
                {
                    "prompt": [{"role": "user", "content": prompt}],
                    "completion": [{"role": "assistant", "content": answer}],
                }
            )
            if len(rows) == count:
                break
    return rows


def reset_peak_rss() -> None:
    """Start the process's peak resident size (VmHWM) afresh (Linux >= 4.0; elsewhere the process peak stays)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def peak_rss_mb() -> float:
    """The peak resident size since `reset_peak_rss` (VmHWM), else since the process started."""
    try:
        status = Path("/proc/self/status").read_text()
        return int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM:"))) / 1024
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_one(name: str, quick: bool, steps: int, batch_size: int, output: str) -> None:
    """Child process: train one configuration, write its timings and peak memory to `output`."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import TrainerCallback

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    kind, overrides = CONFIGURATIONS[name]
    if quick:
        from robust_sft.testing import make_tiny_model, make_tiny_tokenizer

        tokenizer = make_tiny_tokenizer()
        model = make_tiny_model("llama", tokenizer)
    else:
        model, tokenizer = load_profile_model()
    rows = Dataset.from_list(sst2_rows(steps * batch_size))
    common = dict(
        output_dir=scratch_dir("cost"),  # nothing is saved there (save_strategy="no")
        max_steps=steps,
        per_device_train_batch_size=batch_size,
        learning_rate=2e-4,  # everything else at SFTConfig's defaults, gradient checkpointing (on) included
        report_to=[],
        save_strategy="no",
        logging_steps=1,
        seed=0,
        max_length=256,
        bf16=PROFILE["dtype"] == "bfloat16",  # the profile's precision (float32 on the CPU)
        use_cpu=PROFILE["device"] == "cpu",
    )
    lora = LoraConfig(r=16, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear")
    if kind == "trl":
        from trl import SFTConfig, SFTTrainer

        trainer_class, config = SFTTrainer, SFTConfig(**common)
    else:  # every robust_sft trainer from the method registry, with the one LoRA default (all linear layers)
        from robust_sft import get_method

        method = get_method(kind)
        trainer_class, config = method.trainer_class(), method.config_class()(**common, **overrides)
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.started, self.durations = 0.0, []

        def on_step_begin(self, args, state, control, **kwargs):
            self.started = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            self.durations.append(time.perf_counter() - self.started)

    timer = StepTimer()
    trainer = trainer_class(
        model=model, args=config, train_dataset=rows, processing_class=tokenizer, peft_config=lora, callbacks=[timer]
    )
    tokens = sum(len(ids) for ids in trainer.train_dataset["input_ids"])
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    reset_peak_rss()  # the training loop's own peak, not the model load's or the dataset preparation's
    trainer.train()
    result = {
        "name": name,
        "step_seconds": timer.durations,
        "train_tokens": tokens,
        "peak_rss_mb": peak_rss_mb(),
        "process_peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "peak_cuda_mb": torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None,
        "final_loss": trainer.state.log_history[-2].get("loss"),
        "gradient_checkpointing": trainer.args.gradient_checkpointing,
    }
    Path(output).write_text(json.dumps(result))


def cache_throughput(quick: bool, output_dir: Path, queries: int = 16, new_tokens: int = 32) -> dict:
    """build_cache queries per second, batched (16 at a time) vs one by one, greedy, same queries and lengths."""
    import torch

    from robust_sft.delia import Query, build_cache

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    if quick:
        from robust_sft.testing import make_tiny_model, make_tiny_tokenizer

        tokenizer = make_tiny_tokenizer()
        model = make_tiny_model("llama", tokenizer)
        queries, new_tokens = 4, 4
    else:
        model, tokenizer = load_profile_model()
    rows = sst2_rows(queries)
    items = [Query(row["prompt"][0]["content"], row["completion"][0]["content"]) for row in rows]
    timings = {}
    for name, batch_size in (("batched", 16), ("one_by_one", 1)):
        path = Path(scratch_dir("cache")) / "cache.jsonl"
        started = time.perf_counter()
        build_cache(model, tokenizer, items, path, batch_size=batch_size, max_new_tokens=new_tokens, do_sample=False)
        timings[name] = len(items) / (time.perf_counter() - started)
    return {
        "queries": len(items),
        "max_new_tokens": new_tokens,
        "batched_queries_per_s": timings["batched"],
        "one_by_one_queries_per_s": timings["one_by_one"],
        "speedup": timings["batched"] / timings["one_by_one"],
    }


def summarise(results: list[dict], warmup: int) -> list[dict]:
    base = None
    rows = []
    for result in results:
        timed = result["step_seconds"][warmup:] or result["step_seconds"]
        row = {
            "name": result["name"],
            "median_step_s": statistics.median(timed),
            "mean_step_s": statistics.mean(timed),  # the cost of a schedule that alternates step kinds (ANIT)
            "min_step_s": min(timed),
            "max_step_s": max(timed),
            "peak_rss_mb": result["peak_rss_mb"],
            "peak_cuda_mb": result["peak_cuda_mb"],
        }
        base = base or row
        row["time_ratio"] = row["median_step_s"] / base["median_step_s"]
        row["mean_time_ratio"] = row["mean_step_s"] / base["mean_step_s"]
        row["memory_ratio"] = row["peak_rss_mb"] / base["peak_rss_mb"]
        if row["peak_cuda_mb"] and base["peak_cuda_mb"]:  # on a GPU the device memory is the figure that matters
            row["cuda_memory_ratio"] = row["peak_cuda_mb"] / base["peak_cuda_mb"]
        rows.append(row)
    return rows


def markdown(rows: list[dict]) -> str:
    lines = [
        "| trainer | s / step (median) | range | vs SFT | mean vs SFT | train peak RSS (MB) | vs SFT |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['name']} | {row['median_step_s']:.2f} | {row['min_step_s']:.2f}-{row['max_step_s']:.2f} | "
            f"{row['time_ratio']:.2f}x | {row['mean_time_ratio']:.2f}x | {row['peak_rss_mb']:.0f} | "
            f"{row['memory_ratio']:.2f}x |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="Tiny model, 3 steps: a smoke run.")
    parser.add_argument("--steps", type=int, default=None, help="Optimiser steps per configuration.")
    parser.add_argument("--warmup", type=int, default=None, help="Steps left out of the timing.")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument(
        "--only", nargs="+", default=None, choices=list(CONFIGURATIONS), help="Configurations to run (default: all)."
    )
    parser.add_argument("--output-dir", default=str(RESULTS))
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--child-output", default=None, help=argparse.SUPPRESS)
    add_profile_arguments(parser)
    args = parser.parse_args(argv)
    apply_profile(args)
    steps = args.steps or (3 if args.quick else 8)
    warmup = args.warmup if args.warmup is not None else (1 if args.quick else 2)
    if args.child:
        run_one(args.child, args.quick, steps, args.batch_size, args.child_output)
        return 0
    names = list(args.only or CONFIGURATIONS)
    if names[0] != "SFTTrainer (trl)":
        names.insert(0, "SFTTrainer (trl)")  # the ratios' reference always runs
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    results = []
    for name in names:
        child_output = output_dir / f".cost-{len(results)}.json"
        print(f"== {name}", flush=True)
        if args.quick:  # a smoke run: in-process (its memory column is then cumulative, not per trainer)
            run_one(name, True, steps, args.batch_size, str(child_output))
        else:
            command = [
                sys.executable,
                __file__,
                "--child",
                name,
                "--child-output",
                str(child_output),
                "--steps",
                str(steps),
                "--batch-size",
                str(args.batch_size),
                "--profile",
                args.profile,
            ]
            command += ["--model", args.model] if args.model else []  # fmt: skip
            # glibc returns freed large buffers to the OS at once, so the resident size follows live tensors
            # (by default it keeps freed heap memory, and the peak then says more about the allocator than the step).
            subprocess.run(command, check=True, env=dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536"))
        results.append(json.loads(child_output.read_text()))
        child_output.unlink()
    rows = summarise(results, warmup)
    suffix = report_suffix(args.quick)
    print("== build_cache throughput", flush=True)
    throughput = cache_throughput(args.quick, output_dir)
    report = {
        "benchmark": "cost",
        "command": ("python benchmarks/cost.py " + shlex.join(sys.argv[1:] if argv is None else argv)).strip(),
        "machine": machine(),
        "steps": steps,
        "warmup": warmup,
        "batch_size": args.batch_size,
        "model": model_description(args.quick),
        "rows": rows,
        "build_cache": throughput,
        "raw": results,
    }
    write_report(output_dir, f"cost{suffix}", report)
    (output_dir / f"cost{suffix}.md").write_text(markdown(rows) + "\n")
    print(markdown(rows))
    print(json.dumps(throughput, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
