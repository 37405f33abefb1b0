"""`robust-sft eval`: safety, PIQA, GSM8K, SST-2/AG News (+ robustness) and representation rank."""

from __future__ import annotations

import argparse
import json

from .core import UsageError, command


def _read_prompts(path: str, field: str | None, limit: int | None) -> list[str]:
    from ..data import load_examples

    rows = load_examples(path)
    column = field or next(
        (name for name in ("goal", "prompt", "instruction", "question") if name in rows.column_names), None
    )
    if column is None:
        raise ValueError(f"{path}: name the prompt column with --prompt-field (columns: {rows.column_names}).")
    prompts = [text for text in rows[column] if isinstance(text, str) and text.strip()]
    return prompts[:limit] if limit is not None else prompts


EVAL_TASKS = ("safety", "piqa", "gsm8k", "sst2", "agnews", "rank")


def _eval_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None, help="Hub id or folder (default: the embedded SmolLM2-135M).")
    parser.add_argument("--adapter", default=None, help="A LoRA adapter folder to attach.")
    parser.add_argument("--task", choices=EVAL_TASKS, default=None, help="What to measure (see the docs' CLI page).")
    parser.add_argument("--safety", action="store_true", help="Shorthand for --task safety.")
    parser.add_argument(
        "--harness",
        choices=("piqa",),
        default=None,
        help="Run lm-evaluation-harness itself on the task (needs `pip install robust_sft[eval]`), with a local task "
        "definition over --data (no hub); prints acc and acc_norm with their standard errors.",
    )
    parser.add_argument("--data", "--prompts", dest="data", default=None, help="The task's data file or folder.")
    parser.add_argument("--prompt-field", default=None, help="safety: the prompt column (AdvBench's `goal` is found).")
    parser.add_argument("--robustness", action="store_true", help="sst2/agnews: also under perturbed instructions.")
    parser.add_argument(
        "--operators", default="char_substitute,word_shuffle,word_delete,cut,irrelevant_append,distracting_context"
    )
    parser.add_argument("--rate", type=float, default=0.3, help="robustness: the operators' rate.")
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output-dir", default=None, help="Write <task>.json, .md and .png here.")
    parser.add_argument("--output", default=None, help="safety: write the answers and scores as JSON here.")


def _evaluate(task: str, args: argparse.Namespace, model, tokenizer) -> tuple[dict, dict]:
    """({row: {metric: value}}, extra record) for one task."""
    from .. import evaluation as ev

    name = args.model or "embedded"
    if task == "safety":
        prompts = _read_prompts(args.data, args.prompt_field, args.limit)
        result = ev.refusal_rate(model, tokenizer, prompts, args.max_new_tokens, args.batch_size)
        scores = {key: result[key] for key in ("refusal_rate", "attack_success_rate")}
        return {name: scores}, {**result, "prompts": prompts}
    if task == "piqa":  # lm-eval's prompt and metrics: comparable with published PIQA numbers
        questions = ev.load_piqa(args.data, args.limit)
        scores = ev.multiple_choice_metrics(
            ev.multiple_choice_scores(model, tokenizer, questions, batch_size=args.batch_size)
        )
        return {name: scores}, {}
    if task == "gsm8k":
        rows = ev.load_gsm8k(args.data, args.limit)
        answers = ev.generate_answers(model, tokenizer, rows["instruction"], args.max_new_tokens, args.batch_size)
        scores = {
            "answer_loss": ev.answer_loss(model, tokenizer, rows, args.batch_size),
            "exact_match": ev.exact_match(answers, rows["output"]),
        }
        return {name: scores}, {"answers": answers}
    if task in ("sst2", "agnews"):
        load, labels = (ev.load_sst2, ev.SST2_LABELS) if task == "sst2" else (ev.load_agnews, ev.AGNEWS_LABELS)
        rows = load(args.data, args.limit, seed=args.seed)
        if not args.robustness:
            return {
                name: {"accuracy": ev.label_accuracy(model, tokenizer, rows, labels, batch_size=args.batch_size)}
            }, {}
        operators = [op for op in args.operators.split(",") if op]
        return ev.perturbation_robustness(
            model, tokenizer, rows, labels, operators, args.rate, args.seed, args.batch_size
        ), {}
    from ..data import load_examples

    rows = load_examples(args.data)
    rows = rows.select(range(min(args.limit or len(rows), len(rows))))
    column = next(
        (c for c in ("instruction", "prompt", "question", "text", "sentence", "goal") if c in rows.column_names), None
    )
    if column is None:
        raise ValueError(f"{args.data}: no text column to embed among {rows.column_names}.")
    texts = [str(text) for text in rows[column]]
    ranks = ev.representation_rank(model, tokenizer, texts, args.batch_size)
    return {f"layer {layer}": {"effective_rank": rank} for layer, rank in enumerate(ranks)}, {}


@command(
    "eval",
    "Evaluate a model: safety, PIQA, GSM8K, SST-2/AG News (+ robustness), representation rank.",
    _eval_arguments,
)
def run_eval(args: argparse.Namespace) -> int:
    if args.harness:
        return _run_harness(args)
    task = "safety" if args.safety else args.task
    if task is None:
        raise UsageError(f"Choose what to evaluate: --task {{{','.join(EVAL_TASKS)}}} (or --safety).")
    if not args.data:
        raise UsageError(f"--task {task} needs --data (the task's file or folder, e.g. ../shared/data/...).")
    from ..evaluation import write_results
    from ..modeling import load_model_and_tokenizer

    model, tokenizer = load_model_and_tokenizer(args.model)
    if args.adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, args.adapter)
    results, record = _evaluate(task, args, model, tokenizer)
    for row, scores in results.items():
        print(f"{row:>28}: " + ", ".join(f"{key} {value:.4g}" for key, value in scores.items()))
    if args.output_dir:
        paths = write_results(results, args.output_dir, task, title=f"{task}: {args.model or 'embedded'}")
        print(f"Results: {paths['json']}, {paths['markdown']}, {paths['plot']}")
    if args.output:
        from pathlib import Path

        full = {**record, "results": results, "model": args.model or "embedded", "adapter": args.adapter}
        if task == "safety":
            full.update(results[args.model or "embedded"])
        Path(args.output).write_text(json.dumps(full, indent=2, ensure_ascii=False))
    return 0


def _run_harness(args: argparse.Namespace) -> int:
    if not args.data:
        raise UsageError(f"--harness {args.harness} needs --data (e.g. ../shared/data/piqa).")
    from ..evaluation import load_piqa, run_harness
    from ..model_cache import embedded_model_dir

    model = args.model
    if model is None:
        from ..modeling import ensure_embedded_model

        model = str(ensure_embedded_model())
    result = run_harness(
        model, args.harness, load_piqa(args.data, args.limit), adapter=args.adapter, batch_size=args.batch_size
    )
    shown = args.model or f"embedded ({embedded_model_dir()})"
    print(f"lm-eval {args.harness} on {shown}" + (f" + {args.adapter}" if args.adapter else "") + ":")
    for metric in ("acc", "acc_norm"):
        print(f"{metric:>10}: {result[metric]:.4f} +- {result[metric + '_stderr']:.4f}")
    if args.output:
        from pathlib import Path

        Path(args.output).write_text(json.dumps({"task": args.harness, "model": model, **result}, indent=2))
    return 0
