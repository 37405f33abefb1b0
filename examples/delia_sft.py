"""DELIA: a handful of task rows mixed with the model's own answers to diverse queries (arXiv 2408.10841).

    python examples/delia_sft.py --config examples/recipes/delia.yaml
    python examples/delia_sft.py --config examples/recipes/delia.yaml \\
        --queries_path ../shared/data/self_instruct/seed_tasks.jsonl     # another broad query set

The task: condense a sentence into `subject <sep> colour`, where `<sep>` is a token new to the model, learnt from 16
rows written with two phrasings of the instruction. The model must *write* `<sep>`, so its output row trains
(`new_token_training="trainable_tokens"`, the default: PEFT's trainable token rows, input and output, next to LoRA).

1. build_cache: the base model answers a broad set of queries (by default the 80 everyday instructions shipped with
   robust_sft, `robust_sft/delia/queries.jsonl`) with the paper's one-shot prompt; resumable, in output_dir.
2. Plain SFT on the task rows alone, then DELIA on the task rows mixed with `diverse_ratio` cached rows per task row,
   each from the same base model, for the same number of epochs.
3. Before / after, for the base model, SFT and DELIA: the format compliance of the answers to instructions phrased
   differently from training (does the format generalise beyond the phrasings seen?) and the share of answers to
   unrelated held-out queries that contain `<sep>` (does the task leak where it has no business?). The paper's
   claim: DELIA generalises the format better and leaks less.
"""

import dataclasses
import os
import random
from dataclasses import dataclass, field

from robust_sft.cli.train import load_model, parse_args, peft_config
from robust_sft.delia import QUERIES_FILE, DELIAConfig, DELIATrainer, build_cache, load_diverse_dataset, read_queries
from robust_sft.demo import SEP_FORMAT, make_sep_task_data
from robust_sft.evaluation import format_compliance, generate_answers


@dataclass
class ExampleArguments:
    train_size: int = field(default=16, metadata={"help": "Task rows."})
    queries_path: str = field(default=str(QUERIES_FILE), metadata={"help": "Broad query set (any data file)."})
    query_field: str | None = field(default=None, metadata={"help": "Column of the query in queries_path."})
    answer_field: str | None = field(default=None, metadata={"help": "Column of its reference answer."})
    num_queries: int = field(default=48, metadata={"help": "Queries sampled into the cache."})
    leak_queries: int = field(default=16, metadata={"help": "Held-out queries (not in the cache) to measure leaks."})
    cache_max_new_tokens: int = field(default=192, metadata={"help": "Longest sampled answer."})
    cache_batch_size: int = field(default=16, metadata={"help": "Queries generated together."})
    keep_truncated: bool = field(
        default=False,
        metadata={"help": "Train on cached answers cut off by cache_max_new_tokens too (smoke runs on tiny models)."},
    )
    compare_sft: bool = field(default=True, metadata={"help": "Also train plain SFT on the task rows alone."})


def scores(model, tokenizer, unseen, leak_prompts, new_tokens) -> dict:
    """Format compliance on unseen phrasings, `<sep>` leak into unrelated queries, and a few answers."""
    answers = generate_answers(model, tokenizer, unseen["instruction"], 16, keep_special_tokens=new_tokens)
    leaks = generate_answers(model, tokenizer, leak_prompts, 32, keep_special_tokens=new_tokens)
    return {
        "unseen_format": format_compliance(answers, SEP_FORMAT),
        "leak": sum("<sep>" in answer for answer in leaks) / max(len(leaks), 1),
        "answers": list(zip(unseen["instruction"], answers))[:2] + list(zip(leak_prompts, leaks))[:2],
    }


def train(training_args, model_args, task, diverse):
    """Train from a fresh base model; return the trainer."""
    model, tokenizer = load_model(model_args, training_args)
    trainer = DELIATrainer(
        model=model,
        args=training_args,
        train_dataset=task,
        diverse_dataset=diverse,
        processing_class=tokenizer,
        peft_config=peft_config(model_args, training_args),
    )
    trainer.train()
    return trainer


def main(_cli_args, training_args: DELIAConfig, model_args, _dataset_args, script_args: ExampleArguments) -> None:
    """`_cli_args` / `_dataset_args`: the CLI's dataset options, unused (the task rows are generated here)."""
    task, unseen = make_sep_task_data(script_args.train_size, seed=training_args.seed)
    queries = read_queries(script_args.queries_path, script_args.query_field, script_args.answer_field)
    random.Random(training_args.seed).shuffle(queries)
    if len(queries) < script_args.num_queries + script_args.leak_queries:
        raise ValueError(
            f"{script_args.queries_path} has {len(queries)} queries; num_queries + leak_queries = "
            f"{script_args.num_queries + script_args.leak_queries}. Lower them or give a larger query set."
        )
    cache_queries = queries[: script_args.num_queries]
    leak_prompts = [query.text for query in queries[-script_args.leak_queries :]]  # never in the cache

    # 1. The diverse data: the base model's own answers. 2. Its scores before training.
    model, tokenizer = load_model(model_args, training_args)
    cache = build_cache(
        model,
        tokenizer,
        cache_queries,
        os.path.join(training_args.output_dir, "diverse_cache.jsonl"),
        batch_size=script_args.cache_batch_size,
        max_new_tokens=script_args.cache_max_new_tokens,
        seed=training_args.seed,
    )
    print(f"Cache: {cache.rows} usable answers, {cache.truncated} cut off by cache_max_new_tokens")
    if cache.rows == 0 and not script_args.keep_truncated:
        raise SystemExit("No usable cached answer: raise --cache_max_new_tokens (--keep_truncated for smoke runs).")
    diverse = load_diverse_dataset(cache, keep_truncated=script_args.keep_truncated)
    results = {"base model (before)": scores(model, tokenizer, unseen, leak_prompts, [])}
    del model

    # 3. Plain SFT (task rows only), then DELIA (task rows + diverse rows), each from the base model.
    new_tokens = training_args.new_special_tokens
    if script_args.compare_sft:
        sft_args = dataclasses.replace(
            training_args, diverse_ratio=0.0, output_dir=os.path.join(training_args.output_dir, "sft")
        )
        sft = train(sft_args, model_args, task, None)
        print(f"SFT: {len(sft.train_dataset)} task rows")
        results["SFT (task rows only)"] = scores(sft.model, sft.processing_class, unseen, leak_prompts, new_tokens)
        del sft
    delia = train(training_args, model_args, task, diverse)
    print(f"Training rows: {delia.mix_counts}")
    delia.save_model(training_args.output_dir)
    name = f"DELIA (task + {delia.mix_counts.get('diverse', 0)} diverse rows)"
    results[name] = scores(delia.model, delia.processing_class, unseen, leak_prompts, new_tokens)

    print(f"\n{'':32}{'unseen-phrasing format':>24}{'<sep> leak, unrelated':>24}")
    for label, result in results.items():
        print(f"{label:32}{result['unseen_format']:>24.3f}{result['leak']:>24.3f}")
    for label, result in results.items():
        print(f"\n{label}:")
        for prompt, answer in result["answers"]:
            print(f"  {prompt[:70]!r} -> {answer[:70]!r}")
    print(f"\nFormat compliance on unseen phrasings: {results[name]['unseen_format']:.3f}")


if __name__ == "__main__":
    # The parser of `robust-sft train delia` (one recipe for both), plus the example's own arguments.
    main(*parse_args("delia", extra=(ExampleArguments,), prog="examples/delia_sft.py"))
