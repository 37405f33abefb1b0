"""Composition: the TAIA export of an ANIT run and of a DSFT run. Does the combination keep both effects?

    python benchmarks/composition.py --part anit --seeds 0 1 2    # embedded SmolLM2-135M-Instruct
    python benchmarks/composition.py --part dsft --seeds 0        # (needs a self-sampled cache per seed)
    python benchmarks/composition.py --part dsft --seeds 0 1 2 --eval-items 20 --piqa-questions 200 --extend
        # keeps the recorded seed 0 (its settings), runs seeds 1 and 2
    python benchmarks/composition.py --part anit --quick          # tiny in-process model (the CI smoke run)

No reference code trains with one method and exports with another; here each method's trainer runs with LoRA on
every linear layer (TAIA's training recipe) and its adapter is scored twice: as trained (every update merged) and
as its TAIA export (attention updates only, `robust_sft.taia.taia_view`: what `export_taia` writes). A plain SFT run
on the same rows, scored both ways, is the baseline of each part.

- `--part anit`: `benchmarks/anit.py`'s SST-2 setting (same rows, steps, optimiser; ANIT at its defaults with the
  paper's noise rate 0.5). Scores: clean accuracy, accuracy under keyboard typos (rate 0.3) and its PDR, accuracy
  with the hand-written paraphrased instructions of anit.py (ANIT's effect), PIQA `acc_norm` as lm-eval defines it
  and the right option's negative log-likelihood per character (the base model's knowledge: what TAIA claims to
  keep).
- `--part dsft`: `benchmarks/delia.py`'s formatted AG News task (100 task rows, a self-sampled cache, ratio
  `--ratio`), LoRA on every linear layer plus the input embedding (for the new `<sep>` token). Scores: format
  compliance and topic accuracy on unseen phrasings, the format's leak into unrelated queries (DELIA's effect),
  the two PIQA scores.
Writes `results/composition-<part>[-quick].json`, `.md` and `.png`.
"""

from __future__ import annotations

import random
import sys

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
)

ANIT_METRICS = ("clean_accuracy", "typo_accuracy", "typo_pdr", "paraphrase_accuracy", "piqa_acc_norm", "piqa_gold_nll")
DSFT_METRICS = ("unseen_format", "unseen_topic_accuracy", "format_leak", "piqa_acc_norm", "piqa_gold_nll")
EXPORTS = (("all", ""), ("attention", " + TAIA export"))


def piqa_scores(model, tokenizer, questions) -> dict[str, float]:
    """PIQA `acc_norm` with lm-eval's prompt and definition (`robust_sft.evaluation.harness`), and the right
    option's negative log-likelihood per character (a finer reading of the same knowledge: lower is better)."""
    from robust_sft.evaluation.harness import multiple_choice_metrics, multiple_choice_scores

    results = multiple_choice_scores(model, tokenizer, questions)
    nll = [-r.loglikelihoods[r.answer] / r.option_chars[r.answer] for r in results]
    return {"piqa_acc_norm": multiple_choice_metrics(results)["acc_norm"], "piqa_gold_nll": sum(nll) / len(nll)}


def both_exports(model, score) -> dict[str, dict]:
    """`score()` of the model as trained and inside its TAIA view (the attention-only export)."""
    from robust_sft.taia import split_modules, taia_view

    split = split_modules(model)
    results = {}
    for keep, suffix in EXPORTS:
        with taia_view(model, keep, split):
            results[suffix] = score()
    return results


def anit_seed(seed: int, args, piqa) -> dict[str, dict]:
    from anit import PARAPHRASES, build_trainer

    from robust_sft.evaluation import SST2_LABELS, load_sst2, perturbation_robustness

    train_rows = load_sst2(SHARED_DATA / "sst2" / "train.tsv", args.train_rows, seed=seed, min_words=6)
    eval_rows = load_sst2(SHARED_DATA / "sst2" / "dev.tsv", args.eval_rows, seed=1000 + seed)
    paraphrases = PARAPHRASES[:2] if args.quick else PARAPHRASES
    paraphrase_rows = eval_rows.select(range(min(args.paraphrase_rows, len(eval_rows))))
    results = {}
    for name in ("SFT", "ANIT"):
        model, tokenizer = load_benchmark_model(args.quick, seed)
        trainer = build_trainer(name, model, tokenizer, train_rows, args.steps, seed, args.quick)
        trainer.train()

        def score(model=trainer.model, tokenizer=tokenizer) -> dict[str, float]:
            scores = perturbation_robustness(
                model, tokenizer, eval_rows, SST2_LABELS, ["keyboard_typo"], rate=0.3, seed=seed, batch_size=32
            )
            reworded = perturbation_robustness(
                model, tokenizer, paraphrase_rows, SST2_LABELS, [], seed=seed, batch_size=32,
                instruction_variants=paraphrases,
            )  # fmt: skip
            accuracies = [reworded[f"paraphrase:{number}"]["accuracy"] for number in range(len(paraphrases))]
            return {
                "clean_accuracy": scores["clean"]["accuracy"],
                "typo_accuracy": scores["keyboard_typo"]["accuracy"],
                "typo_pdr": scores["keyboard_typo"]["pdr"],
                "paraphrase_accuracy": sum(accuracies) / len(accuracies),
                **piqa_scores(model, tokenizer, piqa),
            }

        for suffix, row in both_exports(trainer.model, score).items():
            results[name + suffix] = row
            print(f"seed {seed} {name + suffix}: " + ", ".join(f"{k} {v:.3f}" for k, v in row.items()), flush=True)
    return results


def dsft_seed(seed: int, args, piqa) -> dict[str, dict]:
    from delia import TASK_FORMAT, TRAIN_PHRASINGS, UNSEEN_PHRASINGS, score_answers, task_rows, train

    from robust_sft.delia import build_cache, load_diverse_dataset, read_queries
    from robust_sft.evaluation import format_compliance, generate_answers, load_agnews

    articles = load_agnews(SHARED_DATA / "agnews" / "dev.tsv", args.task_rows + args.eval_items, seed=seed)
    task = task_rows(articles.select(range(args.task_rows)), TRAIN_PHRASINGS, seed)
    held_out = articles.select(range(args.task_rows, len(articles)))
    unseen = [task_rows(held_out, [phrasing], seed) for phrasing in UNSEEN_PHRASINGS]
    queries = read_queries(SHARED_DATA / "self_instruct" / "seed_tasks.jsonl")
    random.Random(seed).shuffle(queries)  # per-seed split, as in delia.py's first recorded run
    cache_queries, leak_queries = queries[: args.cache_queries], queries[-args.leak_queries :]

    model, tokenizer = load_benchmark_model(args.quick, seed)
    cache_file = f"{args.cache_dir or scratch_dir('composition-cache')}/cache-seed{seed}.jsonl"
    cache = build_cache(
        model, tokenizer, cache_queries, cache_file, batch_size=16, max_new_tokens=args.cache_tokens, seed=seed
    )
    cache = load_diverse_dataset(cache, keep_truncated=args.quick)  # the tiny model never ends an answer
    results = {}
    for name, ratio in (("SFT (task only)", 0.0), (f"DSFT ratio {args.ratio:g}", args.ratio)):
        model, tokenizer = load_benchmark_model(args.quick, seed)
        trainer, _ = train(model, tokenizer, task, cache, ratio, seed, args, target_modules="all-linear")

        def score(model=trainer.model, tokenizer=tokenizer) -> dict[str, float]:
            answers = [a for rows in unseen for a in generate_answers(model, tokenizer, rows["instruction"], 12)]
            unseen_scores = score_answers(answers, [out for rows in unseen for out in rows["output"]])
            leak = generate_answers(model, tokenizer, [q.text for q in leak_queries], 12)
            return {
                "unseen_format": unseen_scores["format"],
                "unseen_topic_accuracy": unseen_scores["topic_accuracy"],
                "format_leak": format_compliance(leak, TASK_FORMAT),
                **piqa_scores(model, tokenizer, piqa),
            }

        for suffix, row in both_exports(trainer.model, score).items():
            results[name + suffix] = row
            print(f"seed {seed} {name + suffix}: " + ", ".join(f"{k} {v:.3f}" for k, v in row.items()), flush=True)
    return results


def main(argv: list[str] | None = None) -> int:
    from robust_sft.evaluation import load_piqa

    parser = benchmark_parser(__doc__)
    parser.add_argument("--part", choices=("anit", "dsft"), required=True)
    parser.add_argument("--piqa-questions", type=int, default=None, help="PIQA validation questions scored.")
    parser.add_argument("--train-rows", type=int, default=None, help="anit: SST-2 training rows.")
    parser.add_argument("--steps", type=int, default=None, help="anit: optimiser steps.")
    parser.add_argument("--eval-rows", type=int, default=None, help="anit: held-out SST-2 rows (clean and typo).")
    parser.add_argument("--paraphrase-rows", type=int, default=None, help="anit: rows each paraphrase is scored on.")
    parser.add_argument("--task-rows", type=int, default=None, help="dsft: formatted task rows.")
    parser.add_argument("--eval-items", type=int, default=None, help="dsft: held-out items (x4 unseen phrasings).")
    parser.add_argument("--ratio", type=float, default=1.0, help="dsft: diverse_ratio of the DSFT run.")
    parser.add_argument("--epochs", type=float, default=None, help="dsft: epochs over each run's training set.")
    parser.add_argument("--cache-queries", type=int, default=None, help="dsft: self-instruct queries in the cache.")
    parser.add_argument("--cache-tokens", type=int, default=None, help="dsft: longest self-sampled answer.")
    parser.add_argument("--leak-queries", type=int, default=None, help="dsft: held-out unrelated queries.")
    parser.add_argument("--cache-dir", default=None, help="dsft: keep the caches here (a re-run reuses them).")
    parser.add_argument(
        "--extend", action="store_true",
        help="Keep the seeds of the recorded report of the same settings and run only the --seeds it lacks.",
    )  # fmt: skip
    sizes = dict(piqa_questions=(4, 300), train_rows=(16, 128), steps=(2, 16), eval_rows=(8, 300))
    sizes.update(paraphrase_rows=(8, 20), task_rows=(8, 100), eval_items=(3, 40), epochs=(2.0, 3.0))
    sizes.update(cache_queries=(8, 150), cache_tokens=(8, 128), leak_queries=(4, 25))
    args = parse_arguments(parser, argv, sizes)

    piqa = load_piqa(SHARED_DATA / "piqa", args.piqa_questions)
    run_seed, metrics = (anit_seed, ANIT_METRICS) if args.part == "anit" else (dsft_seed, DSFT_METRICS)
    used = ("piqa_questions", "train_rows", "steps", "eval_rows", "paraphrase_rows")
    if args.part == "dsft":
        used = ("piqa_questions", "task_rows", "eval_items", "ratio", "epochs", "cache_queries", "cache_tokens")
        used += ("leak_queries",)
    facts = {name: getattr(args, name) for name in used} | {"part": args.part}
    name = f"composition-{args.part}{report_suffix(args.quick)}"
    # the DSFT part's first record predates the leak_queries entry: it ran with the default, 25
    recorded = recorded_seeds(name, args, facts, unrecorded={"leak_queries": 25}) if args.extend else None
    run = lambda seed: run_seed(seed, args, piqa)  # noqa: E731
    per_seed, seed_seconds = resumable_seeds(name, args, facts, run, recorded)
    rows = list(per_seed[args.seeds[0]])
    if recorded:  # the command of the report whose seeds were kept, and the machine they ran on
        facts.update(extends=recorded["extended"], extends_machine=recorded["extended_machine"])
    facts["seed_seconds"] = seed_seconds  # with wall_seconds (this process): the seeds of a resumed run count too
    finish("composition", args, argv, per_seed, rows, metrics, metrics[0], name=f"composition-{args.part}", **facts)
    forget_resumed_seeds(name, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
