"""`robust-sft demo`, `export-taia`, `perturb` and `build-cache`: thin wrappers of the package functions."""

from __future__ import annotations

import argparse
import json

from .core import command


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
    from ..demo import run_demo

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


def _export_taia_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--base", default=None, help="The base model (hub id or folder; default: the embedded one).")
    parser.add_argument("--adapter", required=True, help="The trained LoRA adapter folder.")
    parser.add_argument("--output", required=True, help="Where the merged plain model goes.")
    parser.add_argument("--keep", choices=["attention", "mlp", "all"], default="attention")
    parser.add_argument(
        "--dtype", choices=["auto", "float32", "bfloat16", "float16"], default="auto", help="auto: the base's own."
    )


@command("export-taia", "Merge a LoRA adapter keeping only the attention (or MLP) updates.", _export_taia_arguments)
def run_export_taia(args: argparse.Namespace) -> int:
    import torch

    from ..modeling import ensure_embedded_model
    from ..taia import export_taia

    base = args.base or str(ensure_embedded_model())
    dtype = args.dtype if args.dtype == "auto" else getattr(torch, args.dtype)
    output = export_taia(base, args.adapter, args.output, keep=args.keep, dtype=dtype)
    print(f"Wrote {output} (keep={args.keep}).")
    return 0


def _perturb_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("text", help="The instruction to perturb.")
    parser.add_argument("--operators", default=None, help="Comma-separated operators (default: all).")
    parser.add_argument("--rate", type=float, default=0.2, help="The operators' rate in [0, 1].")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--embedding", action="store_true", help="Also score the embedding distortion (all-MiniLM-L6-v2)."
    )
    parser.add_argument("--json", action="store_true", help="Print JSON instead of a table.")


@command("perturb", "Show each noise operator's version of a text with its semantic distortion.", _perturb_arguments)
def run_perturb(args: argparse.Namespace) -> int:
    from ..anit.distortion import SentenceEncoder, describe_perturbations

    encoder = SentenceEncoder.minilm() if args.embedding else None
    operators = args.operators.split(",") if args.operators else None
    rows = describe_perturbations(args.text, operators, rate=args.rate, seed=args.seed, encoder=encoder)
    if args.json:
        print(json.dumps(rows, indent=2, ensure_ascii=False))
        return 0
    for row in rows:
        scores = f"lev {row['levenshtein']:.3f}" + (f"  emb {row['embedding']:.3f}" if "embedding" in row else "")
        print(f"{row['operator']:>20} [{row['level']:>9}] {scores}  {row['noisy']!r}")
    return 0


def _build_cache_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--queries", required=True, help="Query rows (.jsonl/.json/.csv/.tsv/.parquet), any format.")
    parser.add_argument("--output", required=True, help="The cache (.jsonl); an existing one is resumed.")
    parser.add_argument("--model", default=None, help="Hub id or local folder (default: the embedded SmolLM2-135M).")
    parser.add_argument("--query-field", default=None, help="Column with the query (default: the data layer's).")
    parser.add_argument("--answer-field", default=None, help="Column with the reference answer.")
    parser.add_argument("--limit", type=int, default=None, help="Use the first N queries.")
    parser.add_argument("--system-prompt", default=None)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=512)
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--top-p", type=float, default=0.95)
    parser.add_argument("--greedy", action="store_true", help="Greedy decoding instead of sampling.")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--backend", choices=["transformers", "vllm"], default="transformers")
    parser.add_argument("--force", action="store_true", help="Continue a cache made with other settings (mix them).")


@command(
    "build-cache",
    "Self-sample DELIA's diverse data: the model's answers to queries (resumable).",
    _build_cache_arguments,
)
def run_build_cache(args: argparse.Namespace) -> int:
    from ..data import load_examples
    from ..delia import build_cache

    queries = load_examples(args.queries)
    if args.limit is not None:
        queries = queries.select(range(min(args.limit, len(queries))))
    path = build_cache(
        args.model,
        None,
        queries,
        args.output,
        query_field=args.query_field,
        answer_field=args.answer_field,
        system_prompt=args.system_prompt,
        batch_size=args.batch_size,
        temperature=args.temperature,
        top_p=args.top_p,
        max_new_tokens=args.max_new_tokens,
        do_sample=not args.greedy,
        seed=args.seed,
        backend=args.backend,
        force=args.force,
    )
    with open(path, encoding="utf-8") as cache:
        print(f"{path}: {sum(1 for _ in cache)} rows.")
    return 0
