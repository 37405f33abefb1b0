"""DELIA: a small task mixed with the model's own answers to diverse queries, and a new `<sep>` token (2408.10841).

    python examples/delia_sft.py --output_dir outputs/delia --max_steps 20 --gradient_checkpointing false \\
        --learning_rate 1e-3 --use_peft --lora_r 16 --lora_alpha 16 --lora_target_modules all-linear
    python examples/delia_sft.py --config examples/recipes/delia.yaml
    python examples/delia_sft.py ... --queries_path ../shared/data/self_instruct/seed_tasks.jsonl

1. build_cache: the model answers the queries (resumable: the cache in output_dir is reused and completed);
   without --queries_path the task's own prompts are the queries.
2. DELIATrainer trains on the task rows (condense a sentence into `subject <sep> colour`) mixed with
   int(len(task) * diverse_ratio) cached rows; `<sep>` is a new special token with a trainable embedding.
3. The answers to instructions phrased differently from training are checked against the format.
"""

import os
from dataclasses import dataclass, field

from trl import ModelConfig, TrlParser, get_peft_config

from robust_sft import load_examples, load_model_and_tokenizer
from robust_sft.delia import DELIAConfig, DELIATrainer, build_cache
from robust_sft.demo import SEP_FORMAT, make_sep_task_data
from robust_sft.evaluation import format_compliance, generate_answers


@dataclass
class ScriptArguments:
    train_size: int = field(default=16, metadata={"help": "Task rows."})
    queries_path: str | None = field(default=None, metadata={"help": "Queries for the cache (any data file)."})
    query_field: str | None = field(default=None, metadata={"help": "Column of the query in queries_path."})
    answer_field: str | None = field(default=None, metadata={"help": "Column of its reference answer."})
    num_queries: int = field(default=64, metadata={"help": "Queries sampled into the cache."})
    cache_max_new_tokens: int = field(default=128, metadata={"help": "Longest sampled answer."})
    cache_batch_size: int = field(default=16, metadata={"help": "Queries generated together."})


def main(script_args: ScriptArguments, training_args: DELIAConfig, model_args: ModelConfig) -> None:
    quantization = "4bit" if model_args.load_in_4bit else "8bit" if model_args.load_in_8bit else None
    model, tokenizer = load_model_and_tokenizer(
        model_args.model_name_or_path, quantization=quantization, trust_remote_code=training_args.trust_remote_code
    )
    task, unseen = make_sep_task_data(script_args.train_size, seed=training_args.seed)
    if script_args.queries_path:
        queries = load_examples(script_args.queries_path)
        queries = queries.select(range(min(script_args.num_queries, len(queries))))
    else:
        queries = task.select(range(min(script_args.num_queries, len(task))))
    cache = build_cache(
        model,
        tokenizer,
        queries,
        os.path.join(training_args.output_dir, "diverse_cache.jsonl"),
        query_field=script_args.query_field,
        answer_field=script_args.answer_field,
        batch_size=script_args.cache_batch_size,
        max_new_tokens=script_args.cache_max_new_tokens,
        seed=training_args.seed,
    )
    trainer = DELIATrainer(
        model=model,
        args=training_args,
        train_dataset=task,
        diverse_dataset=cache,
        processing_class=tokenizer,
        peft_config=get_peft_config(model_args),
    )
    print(f"Training rows: {trainer.mix_counts}")
    trainer.train()
    trainer.save_model(training_args.output_dir)
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
    parser = TrlParser((ScriptArguments, DELIAConfig, ModelConfig))
    main(*parser.parse_args_and_config())
