"""`robust-sft realign`: safety realignment of a fine-tune (it needs a task vector first: not a `train` method)."""

from __future__ import annotations

import argparse

from .core import UsageError, command


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
    if bool(args.finetuned) == bool(args.finetuned_adapter):
        raise UsageError("Give exactly one of --finetuned (full mode) or --finetuned-adapter (LoRA mode).")
    from peft import PeftModel

    from ..modeling import load_model_and_tokenizer
    from ..realign import (
        SafetyRealignConfig,
        SafetyRealignTrainer,
        load_preference_pairs,
        task_vector_from_adapters,
        task_vector_from_models,
        zero_adapter,
    )

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
