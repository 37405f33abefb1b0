"""DELIA vs plain SFT: a small formatted task with a new `<sep>` token, and a sweep of the diverse-data ratio.

    python benchmarks/delia.py --seeds 0 1 2 --cache-dir outputs/delia-cache   # the design of the evidence issue
    python benchmarks/delia.py --seeds 0 1 2 --cache-dir outputs/delia-cache --extend  # + recorded seeds
    python benchmarks/delia.py --task-rows 100 --ratios 0.5 1 --samples-per-query 1 --package-queries 0   # ~ first run
    python benchmarks/delia.py --quick          # tiny in-process model, a few rows (the CI smoke run)

The task: read an AG News item and answer `topic | first-word` (topic one of world / sports / business / science,
first-word the item's first word in lower case). Every prompt is `instruction <sep> news item`, where `<sep>` is a
token new to the model (added with `new_special_tokens`, its input row trained through LoRA on the embedding). The
training rows (30 by default: DELIA's setting is a small task set) use two phrasings of the instruction; the scores
use four phrasings never seen in training, on held-out items. (`<sep>` is on the input side, as in the first
recorded run, made when LoRA could train a new token's input row only; `new_token_training="trainable_tokens"` now
trains its output row too, see the DELIA docs.)

The diverse data is self-sampled once, for every seed (`--cache-seed`): the base model answers self-instruct seed
tasks (150; 25 others are held out for the leak measure) and the package's own 80 broad queries with `build_cache`
(the paper's one-shot prompt, temperature 0.7; answers cut off by `--cache-tokens` are flagged and not trained on),
`--samples-per-query` times each (4: up to 920 rows before the answers cut off at `--cache-tokens` 160 are dropped),
so the sweep reaches `diverse_ratio` 20 (600 rows for 30 task rows); a sweep the cache cannot hold is refused before
any training (before sampling when its queries alone cannot hold it: the cut-off answers are only known after).
`--cache-dir` keeps the caches for a re-run (their sampling seconds too); a stopped run resumes at its next seed.
Every row trains LoRA (r=16, alpha 16 on attention + the input embedding: the reference's targets,
`new_token_training="lora_embedding"`; lr 1e-3 constant after a short warm-up) from the same base model for the same
number of epochs over its training set, so the task rows are seen equally often; DSFT rows take more steps (their
train_seconds say what that costs). The seeds vary the task and held-out items and the training order.

Scores: format compliance, topic accuracy and exact match on the unseen phrasings; format compliance on the training
phrasings (held-out items); `format_leak`, the share of answers to unrelated held-out self-instruct queries that
come out in the task format (the over-fitting DELIA buffers; lower is better); PIQA accuracy (general knowledge).
Writes `results/delia[-quick].json`, `.md` and `.png`.
"""

from __future__ import annotations

import json
import math
import random
import string
import sys
import time
from fractions import Fraction
from pathlib import Path

from common import (
    SHARED_DATA,
    benchmark_parser,
    finish,
    forget_resumed_seeds,
    load_benchmark_model,
    parse_arguments,
    recorded_seeds,
    report_suffix,
    resumable_seeds,
    scratch_dir,
    training_args,
)

SAMPLE_ANSWERS: dict[int, dict[str, list[str]]] = {}  # a few generated answers per seed and row, for the report
QUERY_SPLIT_SEED = 1234  # the cache / leak split of the self-instruct tasks, the same for every seed
TOPICS = {"World": "world", "Sports": "sports", "Business": "business", "Sci/Tech": "science"}
TASK_FORMAT = r"(world|sports|business|science) \| [a-z]+"
TRAIN_PHRASINGS = [
    "Give the topic of this news item and its first word as 'topic | word'.",
    "Answer with the topic | first word of the news.",
]
UNSEEN_PHRASINGS = [
    "Which section does this story belong to, and how does it start? Reply 'section | opening word'.",
    "Classify the article (world, sports, business or science), then write | and its first word.",
    "Output format: category | first word, lower case.",
    "Tell me the category of the text followed by | and the text's initial word.",
]


def first_word(text: str) -> str:
    """The first whitespace-separated word of `text` made of ASCII letters once punctuation is stripped, lower case."""
    for token in text.split():
        word = token.strip(string.punctuation)
        if word.isascii() and word.isalpha():
            return word.lower()
    return "none"


def task_rows(articles, phrasings: list[str], seed: int):
    """One row per article: `phrasing <sep> article` (phrasings round robin, shuffled by seed), the answer
    `topic | first-word`."""
    from datasets import Dataset

    order = [phrasings[i % len(phrasings)] for i in range(len(articles))]
    random.Random(seed).shuffle(order)
    return Dataset.from_list(
        [
            {
                "instruction": f"{phrasing} <sep> {row['input']}",
                "input": "",
                "output": f"{TOPICS[row['output']]} | {first_word(row['input'])}",
            }
            for phrasing, row in zip(order, articles)
        ]
    )


def score_answers(answers: list[str], expected: list[str]) -> dict[str, float]:
    """Format compliance, topic accuracy (first field) and exact match of generated answers."""
    from robust_sft.evaluation import format_compliance

    topics = [answer.strip().split(" ")[0] if answer.strip() else "" for answer in answers]
    return {
        "format": format_compliance(answers, TASK_FORMAT),
        "topic_accuracy": sum(t == e.split(" ")[0] for t, e in zip(topics, expected)) / len(expected),
        "exact": sum(a.strip() == e for a, e in zip(answers, expected)) / len(expected),
    }


ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]  # the reference's LoRA targets (plus the input embedding)


def train(model, tokenizer, task, cache, ratio: float, seed: int, args, target_modules=ATTENTION):
    from peft import LoraConfig

    from robust_sft.delia import DELIAConfig, DELIATrainer

    config = DELIAConfig(
        **training_args(
            "delia",
            seed,
            num_train_epochs=args.epochs,
            learning_rate=1e-3,
            lr_scheduler_type="constant_with_warmup",
            warmup_steps=0.05,
            max_length=384,
        ),
        diverse_ratio=ratio,
        new_special_tokens=["<sep>"],
        new_token_training="lora_embedding",  # the reference's choice; <sep> is only read here, never written
    )
    trainer = DELIATrainer(
        model=model,
        args=config,
        train_dataset=task,
        diverse_dataset=cache if ratio > 0 else None,
        processing_class=tokenizer,
        peft_config=LoraConfig(r=16, lora_alpha=16, lora_dropout=0.05, target_modules=target_modules),
    )
    started = time.perf_counter()
    trainer.train()
    return trainer, time.perf_counter() - started


def query_split(args) -> tuple[list, list]:
    """(cache queries, leak queries), the same for every seed: the self-instruct seed tasks shuffled once, the last
    `--leak-queries` held out for the leak measure, the rest (first `--cache-queries`) plus the package's own broad
    query set (`robust_sft/delia/queries.jsonl`, 80 queries) answered by the model for the cache."""
    from robust_sft.data.queries import read_queries
    from robust_sft.delia.cache import QUERIES_FILE

    queries = read_queries(SHARED_DATA / "self_instruct" / "seed_tasks.jsonl")
    if not 1 <= args.leak_queries < len(queries) or args.cache_queries + args.leak_queries > len(queries):
        raise SystemExit(
            f"--cache-queries {args.cache_queries} + --leak-queries {args.leak_queries} must split the "
            f"{len(queries)} self-instruct tasks (at least one leak query, the two parts disjoint)."
        )
    random.Random(QUERY_SPLIT_SEED).shuffle(queries)
    leak = queries[-args.leak_queries :]
    return queries[: args.cache_queries] + read_queries(QUERIES_FILE)[: args.package_queries], leak


def self_sampled_cache(args, queries: list):
    """(the diverse data, its sampling seconds): sampled once from the base model for every seed, each query answered
    `--samples-per-query` times (each draw its own `build_cache` file and sampling seed), truncated answers dropped
    (kept for --quick, whose tiny model never ends one)."""
    from datasets import Dataset, concatenate_datasets

    from robust_sft.delia import build_cache, load_diverse_dataset
    from robust_sft.delia.store import read_rows

    model, tokenizer = load_benchmark_model(args.quick, args.cache_seed)
    folder = args.cache_dir or scratch_dir("delia-cache")
    keys = {query.key for query in queries}
    draws, seconds = [], 0.0
    for draw in range(args.samples_per_query):
        sampling_seed = 1000 * args.cache_seed + draw
        path = f"{folder}/cache-seed{sampling_seed}-{args.cache_tokens}tokens.jsonl"
        had, started = len(read_rows(path)[0]), time.perf_counter()
        build_cache(
            model, tokenizer, queries, path, batch_size=16, max_new_tokens=args.cache_tokens, seed=sampling_seed
        )
        seconds = add_sampling_seconds(Path(f"{path}.seconds"), had, len(read_rows(path)[0]), started, seconds)
        # a reused --cache-dir may hold answers to other queries (an earlier split): only this split's are trained
        rows = [row for row in read_rows(path)[0] if row["query_key"] in keys]
        draws.append(
            load_diverse_dataset(Dataset.from_list(rows), keep_truncated=args.quick).select_columns("messages")
        )
    return concatenate_datasets(draws), seconds


def add_sampling_seconds(record: Path, had: int, has: int, started: float, seconds: float | None) -> float | None:
    """`seconds` plus a cache file's sampling time, kept in `record` across runs (a reused --cache-dir still reports
    the cache's cost). Only runs that added rows add their time; a sampling run stopped before `build_cache` returned
    is not counted; None when the file's rows predate the record (their cost is unknown)."""
    if has > had:
        earlier = json.loads(record.read_text()) if record.is_file() else 0.0 if had == 0 else None
        record.write_text(json.dumps(None if earlier is None else earlier + time.perf_counter() - started))
    spent = json.loads(record.read_text()) if record.is_file() else None
    return None if spent is None or seconds is None else seconds + spent


def diverse_rows_wanted(args) -> int:
    """The diverse rows the largest ratio mixes in: DELIATrainer's own count, floor(task rows x ratio as written)."""
    return math.floor(args.task_rows * Fraction(str(max(args.ratios))))


def run_seed(seed: int, args) -> dict[str, dict]:
    from robust_sft.evaluation import (
        format_compliance,
        generate_answers,
        load_agnews,
        load_piqa,
        multiple_choice_accuracy,
    )

    articles = load_agnews(SHARED_DATA / "agnews" / "dev.tsv", args.task_rows + args.eval_items, seed=seed)
    task = task_rows(articles.select(range(args.task_rows)), TRAIN_PHRASINGS, seed)
    held_out = articles.select(range(args.task_rows, len(articles)))
    unseen = [task_rows(held_out, [phrasing], seed) for phrasing in UNSEEN_PHRASINGS]
    seen = task_rows(held_out, TRAIN_PHRASINGS, seed)
    leak_queries, cache = args.leak_queries_list, args.cache
    piqa = load_piqa(SHARED_DATA / "piqa", args.piqa_questions)

    def score(model, tokenizer, name: str) -> dict[str, float]:
        def answers(rows, tokens=12):
            return generate_answers(model, tokenizer, rows["instruction"], tokens)

        unseen_answers = [answer for rows in unseen for answer in answers(rows)]
        SAMPLE_ANSWERS.setdefault(seed, {})[name] = unseen_answers[:: len(held_out)]  # one per unseen phrasing
        unseen_scores = score_answers(unseen_answers, [out for rows in unseen for out in rows["output"]])
        return {
            "unseen_format": unseen_scores["format"],
            "unseen_topic_accuracy": unseen_scores["topic_accuracy"],
            "unseen_exact": unseen_scores["exact"],
            "seen_format": score_answers(answers(seen), seen["output"])["format"],
            "format_leak": format_compliance(
                generate_answers(model, tokenizer, [q.text for q in leak_queries], 12),
                TASK_FORMAT,
            ),
            "piqa_accuracy": multiple_choice_accuracy(model, tokenizer, piqa, length_normalized=True),
        }

    model, tokenizer = load_benchmark_model(args.quick, seed)
    results = {"base": {**score(model, tokenizer, "base"), "train_seconds": 0.0, "train_rows": 0}}
    for ratio in (0.0, *args.ratios):
        model, tokenizer = load_benchmark_model(args.quick, seed)
        trainer, seconds = train(model, tokenizer, task, cache, ratio, seed, args)
        name = "SFT (task only)" if ratio == 0 else f"DSFT ratio {ratio:g}"
        rows = len(trainer.train_dataset)
        results[name] = {**score(trainer.model, tokenizer, name), "train_seconds": seconds, "train_rows": rows}
        print(f"seed {seed} {name}: " + ", ".join(f"{k} {v:.3f}" for k, v in results[name].items()), flush=True)
    return results


def recorded_with_samples(name: str, args, facts: dict) -> dict:
    """`--extend`'s kept seeds as `run_seed` returns them: the report keeps each seed's sample answers apart, in
    `sample_answers`, so they go back into the seed's row (the extended report keeps them too)."""
    recorded = recorded_seeds(name, args, facts)
    samples = json.loads((Path(args.output_dir) / f"{name}.json").read_text()).get("sample_answers")
    if samples is None or set(samples) != set(recorded["seeds"]):
        raise SystemExit(f"--extend: {args.output_dir}/{name}.json lacks its seeds' sample_answers: not delia.py's.")
    for seed, rows in recorded["seeds"].items():
        rows["_samples"] = samples[seed]
    return recorded


def main(argv: list[str] | None = None) -> int:
    parser = benchmark_parser(__doc__)
    parser.add_argument("--task-rows", type=int, default=None)
    parser.add_argument("--eval-items", type=int, default=None, help="Held-out AG News items (x4 unseen phrasings).")
    parser.add_argument("--ratios", type=float, nargs="+", default=None, help="DSFT diverse_ratio values.")
    parser.add_argument("--epochs", type=float, default=None)
    parser.add_argument("--cache-queries", type=int, default=None, help="Self-instruct queries in the cache.")
    parser.add_argument("--cache-tokens", type=int, default=None, help="Longest self-sampled answer.")
    parser.add_argument("--leak-queries", type=int, default=None, help="Held-out self-instruct queries.")
    parser.add_argument("--piqa-questions", type=int, default=None)
    parser.add_argument(
        "--cache-dir", default=None, help="Keep the self-sampled caches here (a re-run reuses and completes them)."
    )
    parser.add_argument("--cache-seed", type=int, default=0, help="Seed of the one cache every seed trains with.")
    parser.add_argument("--samples-per-query", type=int, default=None, help="Answers sampled per cache query.")
    parser.add_argument("--package-queries", type=int, default=None, help="Queries of the package's set added.")
    parser.add_argument(
        "--extend", action="store_true",
        help="Keep the seeds of the recorded report of the same settings and run only the --seeds it lacks.",
    )  # fmt: skip
    defaults = dict(task_rows=(8, 30), eval_items=(3, 40), ratios=([1.0], [1.0, 5.0, 20.0]), epochs=(1.0, 3.0))
    defaults.update(cache_queries=(8, 150), cache_tokens=(8, 160), leak_queries=(4, 25), piqa_questions=(4, 200))
    defaults.update(samples_per_query=(2, 4), package_queries=(4, 80))
    args = parse_arguments(parser, argv, defaults)
    cache_queries, args.leak_queries_list = query_split(args)
    fix = "raise --samples-per-query or --cache-tokens, lower --task-rows, or drop the ratio"
    if diverse_rows_wanted(args) > len(cache_queries) * args.samples_per_query:  # before any sampling
        raise SystemExit(
            f"ratio {max(args.ratios):g} x {args.task_rows} task rows asks for {diverse_rows_wanted(args)} diverse "
            f"rows, more than the {len(cache_queries)} queries x {args.samples_per_query} samples of the cache: {fix}."
        )
    args.cache, cache_seconds = self_sampled_cache(args, cache_queries)
    if diverse_rows_wanted(args) > len(args.cache):  # truncated answers dropped: before any training
        raise SystemExit(
            f"ratio {max(args.ratios):g} asks for {diverse_rows_wanted(args)} diverse rows; the cache has "
            f"{len(args.cache)} usable answers (the others were cut off by --cache-tokens {args.cache_tokens}): {fix}."
        )
    facts = {name: getattr(args, name) for name in defaults} | {"cache_seed": args.cache_seed}
    name = "delia" + report_suffix(args.quick)  # a stopped run resumes at its next seed (keep the --cache-dir)
    recorded = recorded_with_samples(name, args, facts) if args.extend else None
    per_seed, seed_seconds = resumable_seeds(
        name, args, facts, lambda seed: {**run_seed(seed, args), "_samples": SAMPLE_ANSWERS.get(seed, {})}, recorded
    )
    if recorded:  # the command of the report whose seeds were kept, and the machine they ran on
        facts.update(extends=recorded["extended"], extends_machine=recorded["extended_machine"])
    facts["sample_answers"] = {seed: per_seed[seed].pop("_samples") for seed in args.seeds}
    rows = list(per_seed[args.seeds[0]])
    metrics = tuple(per_seed[args.seeds[0]][rows[0]])
    facts.update(cache_rows=len(args.cache), cache_seconds=cache_seconds, seed_seconds=seed_seconds)
    finish("delia", args, argv, per_seed, rows, metrics, "unseen_format", **facts)
    forget_resumed_seeds(name, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
