"""TAIA vs vanilla LoRA: fine-tune on GSM8K (out of domain for the model), compare base / vanilla / TAIA / TAIF / TOA.

    python benchmarks/taia.py --seeds 0 1 2            # embedded SmolLM2-135M-Instruct, full PIQA (1838), with TOA
    python benchmarks/taia.py --seeds 0 1 2 --no-toa   # the recorded run (BENCHMARKS.md): base / vanilla / TAIA / TAIF
    python benchmarks/taia.py --seeds 0 1 2 --add-toa  # then its TOA row, added to results/taia.json
    python benchmarks/taia.py --seeds 0 --lr 5e-3 --warmup 0.03 --no-toa   # a strength probe (too weak: -0.8 points)
    python benchmarks/taia.py --quick                          # tiny in-process model (the CI smoke run)

Per seed, one LoRA run (rank `--rank` on every linear layer) scored four ways: not at all (base), fully merged
(vanilla), attention updates only (TAIA), MLP updates only (TAIF); and one run that trains the attention layers
only (TOA, `train_modules="attention"`), the paper's other ablation. Scores: held-out GSM8K answer loss (the
fine-tuned domain) and PIQA `acc` / `acc_norm` as lm-evaluation-harness defines them (`Question: ...\\nAnswer:`,
summed log-likelihood of the continuation; `acc_norm` divided by its length in characters), with lm-eval's standard
error per run. PIQA is what the base model knew: TAIA's claim is that it survives the out-of-domain fine-tune.
`--lr`, `--steps`, `--rank` and `--train-rows` set the fine-tune's strength (the knowledge loss has to be measurable
before TAIA can be seen to prevent it; the defaults, rank 32, 16 steps at lr 8e-3 with 25% warm-up, are the
setting the recorded probes chose: vanilla -3.6 points of PIQA on seed 0 while learning GSM8K).
Writes `results/taia[-quick].json`, `.md` and `.png`.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from common import (
    SHARED_DATA,
    apply_profile,
    benchmark_parser,
    finish,
    forget_resumed_seeds,
    load_benchmark_model,
    machine,
    report_suffix,
    resumable_seeds,
    training_args,
)

ROWS = ["base", "vanilla (all updates)", "TAIA (attention only)", "TAIF (MLP only)", "TOA (attention trained)"]
BASE_SEED = 0  # the tiny --quick model's initialisation: one base model for every seed, as the embedded one is
METRICS = ("piqa_acc_norm", "piqa_acc", "piqa_acc_norm_stderr", "gsm8k_answer_loss", "train_seconds")


def train(seed: int, args, train_modules: str):
    import torch
    from peft import LoraConfig

    from robust_sft.taia import TAIAConfig, TAIATrainer

    model, tokenizer = load_benchmark_model(args.quick, BASE_SEED)  # one base model for every seed
    torch.manual_seed(seed)  # `seed` draws the LoRA initialisation (PEFT wraps the model before Trainer seeds)
    rows = args.gsm8k_train.shuffle(seed=seed).select(range(args.train_rows))
    trainer = TAIATrainer(
        model=model,
        args=TAIAConfig(
            **training_args(
                "taia",
                seed,
                max_steps=args.steps,
                learning_rate=args.lr,
                lr_scheduler_type="cosine",
                warmup_steps=args.warmup,
            ),  # fmt: skip
            max_length=512,
            train_modules=train_modules,
        ),
        train_dataset=rows,
        processing_class=tokenizer,
        peft_config=LoraConfig(r=args.rank, lora_alpha=2 * args.rank, lora_dropout=0.05),
    )
    started = time.perf_counter()
    trainer.train()
    return trainer, tokenizer, time.perf_counter() - started


def scoring(piqa, held_out, seed: int):
    """The scores of one model of seed `seed`: `score(model, tokenizer, train_seconds, name) -> row` (printed)."""
    from robust_sft.evaluation import answer_loss
    from robust_sft.evaluation.harness import multiple_choice_metrics, multiple_choice_scores

    def score(model, tokenizer, seconds: float, name: str) -> dict[str, float]:
        piqa_metrics = multiple_choice_metrics(multiple_choice_scores(model, tokenizer, piqa, desc="PIQA"))
        row = {
            "piqa_acc_norm": piqa_metrics["acc_norm"],
            "piqa_acc": piqa_metrics["acc"],
            "piqa_acc_norm_stderr": piqa_metrics["acc_norm_stderr"],
            "gsm8k_answer_loss": answer_loss(model, tokenizer, held_out, batch_size=8, max_length=512),
            "train_seconds": seconds,
        }
        print(f"seed {seed} {name}: " + ", ".join(f"{k} {v:.4f}" for k, v in row.items()), flush=True)
        return row

    return score


def run_seed(seed: int, args, piqa, held_out) -> dict[str, dict]:
    score = scoring(piqa, held_out, seed)
    if args.base_scores is None:  # the base model is the same for every seed: scored once, copied into each
        args.base_scores = score(*load_benchmark_model(args.quick, BASE_SEED), 0.0, "base")
    results = {"base": dict(args.base_scores)}
    trainer, tokenizer, seconds = train(seed, args, "all")
    results["vanilla (all updates)"] = score(trainer.model, tokenizer, seconds, "vanilla")
    for keep, name in (("attention", "TAIA (attention only)"), ("mlp", "TAIF (MLP only)")):
        with trainer.taia_view(keep):
            results[name] = score(trainer.model, tokenizer, seconds, name)
    if args.toa:
        results["TOA (attention trained)"] = toa_row(seed, args, score)
    return results


def toa_row(seed: int, args, score) -> dict[str, float]:
    """TOA: a run of its own that trains the attention layers only (its own base model and seed, so its scores do
    not depend on the runs before it in the process: `--add-toa` gives the row a full run would)."""
    trainer, tokenizer, seconds = train(seed, args, "attention")
    return score(trainer.model, tokenizer, seconds, "TOA")


def add_toa(args, argv, piqa, held_out, facts: dict, name: str) -> int:
    """`--add-toa`: the TOA row added to a recorded `--no-toa` report of the same settings and seeds; the other rows
    are kept as recorded (TOA is a run of its own, see `toa_row`)."""
    path = Path(args.output_dir) / f"{name}.json"
    if not path.is_file():
        raise SystemExit(f"--add-toa adds the TOA row to {path}, which does not exist: run without --add-toa.")
    recorded = json.loads(path.read_text())
    differences = {key: (recorded.get(key), value) for key, value in facts.items() if recorded.get(key) != value}
    differences.pop("toa", None)
    if recorded["seeds"] != args.seeds:
        differences["seeds"] = (recorded["seeds"], args.seeds)
    if recorded["machine"]["torch"] != machine()["torch"]:
        differences["torch"] = (recorded["machine"]["torch"], machine()["torch"])
    if differences or recorded["toa"]:
        problem = f"its settings differ (recorded, now): {differences}" if differences else "it has a TOA row"
        raise SystemExit(f"--add-toa cannot extend {path}: {problem}. Give the recorded run's settings.")
    run_toa = lambda seed: toa_row(seed, args, scoring(piqa, held_out, seed))  # noqa: E731
    toa, toa_seconds = resumable_seeds(f"{name}-toa", args, facts, run_toa)
    per_seed = {seed: {**recorded["per_seed"][str(seed)], ROWS[-1]: toa[seed]} for seed in args.seeds}
    other_seconds = recorded.get("seed_seconds") or {}
    seed_seconds = {seed: (other_seconds.get(str(seed)) or 0.0) + toa_seconds[seed] for seed in args.seeds}
    facts = dict(facts, toa=True, other_rows_recorded_by=recorded["command"], other_rows_machine=recorded["machine"])
    facts["other_rows_wall_seconds"] = recorded["wall_seconds"]  # this report's wall_seconds: the TOA runs only
    finish("taia", args, argv, per_seed, ROWS, METRICS, "piqa_acc_norm", base_scored=recorded["base_scored"],
           seed_seconds=seed_seconds, **facts)  # fmt: skip
    forget_resumed_seeds(f"{name}-toa", args)
    return 0


def main(argv: list[str] | None = None) -> int:
    from robust_sft.evaluation import load_gsm8k, load_piqa

    parser = benchmark_parser(__doc__)
    parser.add_argument("--train-rows", type=int, default=None, help="GSM8K training rows (shuffled per seed).")
    parser.add_argument("--steps", type=int, default=None, help="Optimiser steps (batch 8).")
    parser.add_argument("--lr", type=float, default=8e-3, help="Peak learning rate (cosine schedule).")
    parser.add_argument("--rank", type=int, default=32, help="LoRA rank (alpha = 2 x rank).")
    parser.add_argument("--warmup", type=float, default=0.25, help="Warm-up, as a fraction of the steps.")
    parser.add_argument("--eval-rows", type=int, default=None, help="Held-out GSM8K test rows.")
    parser.add_argument("--piqa-questions", type=int, default=None, help="PIQA validation questions (all: 1838).")
    parser.add_argument("--no-toa", dest="toa", action="store_false", help="Skip the TOA run (a strength probe).")
    parser.add_argument(
        "--add-toa", action="store_true",
        help="Add only the TOA row to the recorded --no-toa report of the same settings (its other rows are kept).",
    )  # fmt: skip
    args = parser.parse_args(argv)
    apply_profile(args)
    args.train_rows = args.train_rows or (8 if args.quick else 240)
    args.steps = args.steps or (2 if args.quick else 16)
    args.eval_rows = args.eval_rows or (4 if args.quick else 24)
    args.piqa_questions = args.piqa_questions or (4 if args.quick else None)  # None: the whole validation set

    import torch

    torch.set_num_threads(2)
    args.gsm8k_train = load_gsm8k(SHARED_DATA / "gsm8k" / "train.jsonl")
    piqa = load_piqa(SHARED_DATA / "piqa", args.piqa_questions)
    held_out = load_gsm8k(SHARED_DATA / "gsm8k" / "test.jsonl", args.eval_rows)
    facts = dict(train_rows=args.train_rows, steps=args.steps, lr=args.lr, rank=args.rank, warmup=args.warmup)
    facts["eval_rows"] = args.eval_rows
    facts.update(piqa_questions=len(piqa), toa=args.toa)
    name = "taia" + report_suffix(args.quick)
    if args.add_toa:
        return add_toa(args, argv, piqa, held_out, facts, name)
    args.base_scores = None
    per_seed, seed_seconds = resumable_seeds(name, args, facts, lambda seed: run_seed(seed, args, piqa, held_out))
    rows = ROWS if args.toa else ROWS[:-1]
    finish(
        "taia",
        args,
        argv,
        per_seed,
        rows,
        METRICS,
        "piqa_acc_norm",
        base_scored="once, the same for every seed",
        seed_seconds=seed_seconds,  # with wall_seconds (this process): the seeds of a resumed run count too
        **facts,
    )
    forget_resumed_seeds(name, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
