"""DELIA: a small task mixed with the model's own answers to diverse queries, and a new `<sep>` token (2408.10841).

    python examples/delia_sft.py --output_dir outputs/delia --max_steps 20 --gradient_checkpointing false \\
        --learning_rate 1e-3 --use_peft --lora_r 16 --lora_alpha 16 --lora_target_modules all-linear
    python examples/delia_sft.py --config examples/recipes/delia.yaml
    python examples/delia_sft.py ... --queries_path ../shared/data/self_instruct/seed_tasks.jsonl

The flags are those of `robust-sft train delia` (the same parser, robust_sft.cli.train), plus the example's own.

1. build_cache: the model answers the queries (resumable: the cache in output_dir is reused and completed);
   without --queries_path the task's own prompts are the queries. --diverse_dataset CACHE.jsonl uses a cache instead.
2. DELIATrainer trains on the task rows (condense a sentence into `subject <sep> colour`) mixed with
   int(len(task) * diverse_ratio) cached rows; `<sep>` is a new special token with a trainable embedding.
3. The answers to instructions phrased differently from training are checked against the format.
"""

import os
from dataclasses import dataclass, field

from robust_sft import load_examples
from robust_sft.cli.train import finish, load_model, parse_args, peft_config
from robust_sft.delia import DELIATrainer, build_cache
from robust_sft.demo import SEP_FORMAT, make_sep_task_data
from robust_sft.evaluation import format_compliance, generate_answers


@dataclass
class ExampleArguments:
    train_size: int = field(default=16, metadata={"help": "Task rows."})
    queries_path: str | None = field(default=None, metadata={"help": "Queries for the cache (any data file)."})
    query_field: str | None = field(default=None, metadata={"help": "Column of the query in queries_path."})
    answer_field: str | None = field(default=None, metadata={"help": "Column of its reference answer."})
    num_queries: int = field(default=64, metadata={"help": "Queries sampled into the cache."})
    cache_max_new_tokens: int = field(default=128, metadata={"help": "Longest sampled answer."})
    cache_batch_size: int = field(default=16, metadata={"help": "Queries generated together."})


def diverse_cache(model, tokenizer, task, training_args, args: ExampleArguments) -> str:
    """Self-sample the model's answers to the queries into output_dir/diverse_cache.jsonl (resumable)."""
    if args.queries_path:
        queries = load_examples(args.queries_path)
        queries = queries.select(range(min(args.num_queries, len(queries))))
    else:
        queries = task.select(range(min(args.num_queries, len(task))))
    return build_cache(
        model,
        tokenizer,
        queries,
        os.path.join(training_args.output_dir, "diverse_cache.jsonl"),
        query_field=args.query_field,
        answer_field=args.answer_field,
        batch_size=args.cache_batch_size,
        max_new_tokens=args.cache_max_new_tokens,
        seed=training_args.seed,
    )


def main(script_args, training_args, model_args, dataset_args, example_args: ExampleArguments) -> None:
    model, tokenizer = load_model(model_args, training_args)
    task, unseen = make_sep_task_data(example_args.train_size, seed=training_args.seed)
    cache = script_args.diverse_dataset or diverse_cache(model, tokenizer, task, training_args, example_args)
    trainer = DELIATrainer(
        model=model,
        args=training_args,
        train_dataset=task,
        diverse_dataset=cache,
        processing_class=tokenizer,
        peft_config=peft_config(model_args, training_args),
    )
    print(f"Training rows: {trainer.mix_counts}")
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    finish(trainer, "delia", training_args, script_args)
    answers = generate_answers(
        trainer.model,
        tokenizer,
        unseen["instruction"],
        max_new_tokens=16,
        keep_special_tokens=training_args.new_special_tokens,
    )
    for prompt, answer in list(zip(unseen["instruction"], answers))[:3]:
        print(f"{prompt!r} -> {answer!r}")
    print(f"Format compliance on unseen phrasings: {format_compliance(answers, SEP_FORMAT):.3f}")


if __name__ == "__main__":
    main(*parse_args("delia", extra=(ExampleArguments,), prog="examples/delia_sft.py"))
