"""TAIA vs vanilla LoRA: fine-tune on GSM8K (out of domain for the model), compare base / vanilla / TAIA / TAIF.

    python benchmarks/taia.py                  # embedded SmolLM2-135M-Instruct, 240 GSM8K rows, 30 steps, seed 0
    python benchmarks/taia.py --seeds 0 1 2    # several seeds: mean and 95% CI
    python benchmarks/taia.py --quick          # tiny in-process model (the CI smoke run)

One LoRA run (r=16 on every linear layer) per seed; the four rows are the same adapter used four ways: not at all
(base), fully merged (vanilla), attention updates only (TAIA), MLP updates only (TAIF). Scores: held-out GSM8K answer
loss (the fine-tuned domain) and PIQA accuracy (knowledge the model had; length-normalised log-likelihood).
Writes `results/taia[-quick].json`, `.md` and `.png`.
"""

from __future__ import annotations

import sys
import time

from common import SHARED_DATA, apply_profile, benchmark_parser, finish, load_benchmark_model, training_args

ROWS = ["base", "vanilla (all updates)", "TAIA (attention only)", "TAIF (MLP only)"]
METRICS = ("gsm8k_answer_loss", "piqa_accuracy")


def run_seed(seed: int, args) -> dict[str, dict]:
    from peft import LoraConfig

    from robust_sft.evaluation import answer_loss, load_gsm8k, load_piqa, multiple_choice_accuracy
    from robust_sft.taia import TAIAConfig, TAIATrainer

    model, tokenizer = load_benchmark_model(args.quick, seed)
    train = load_gsm8k(SHARED_DATA / "gsm8k" / "train.jsonl").shuffle(seed=seed).select(range(args.train_rows))
    held_out = load_gsm8k(SHARED_DATA / "gsm8k" / "test.jsonl", args.eval_rows)
    piqa = load_piqa(SHARED_DATA / "piqa", args.piqa_questions)

    def score(current) -> dict[str, float]:
        return {
            "gsm8k_answer_loss": answer_loss(current, tokenizer, held_out, batch_size=8, max_length=512),
            "piqa_accuracy": multiple_choice_accuracy(current, tokenizer, piqa, length_normalized=True),
        }

    results = {"base": score(model)}
    trainer = TAIATrainer(
        model=model,
        args=TAIAConfig(
            **training_args(
                "taia", seed, max_steps=args.steps, learning_rate=1e-3, lr_scheduler_type="cosine", warmup_steps=0.03
            ),
            max_length=512,
        ),
        train_dataset=train,
        processing_class=tokenizer,
        peft_config=LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05),
    )
    started = time.perf_counter()
    trainer.train()
    train_seconds = time.perf_counter() - started
    results["vanilla (all updates)"] = score(trainer.model)
    for keep, name in (("attention", "TAIA (attention only)"), ("mlp", "TAIF (MLP only)")):
        with trainer.taia_view(keep):
            results[name] = score(trainer.model)
    for name, row in results.items():
        row["train_seconds"] = 0.0 if name == "base" else train_seconds
        print(f"seed {seed} {name}: " + ", ".join(f"{k} {v:.3f}" for k, v in row.items()))
    return results


def main(argv: list[str] | None = None) -> int:
    parser = benchmark_parser(__doc__)
    parser.add_argument("--train-rows", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--eval-rows", type=int, default=None, help="Held-out GSM8K test rows.")
    parser.add_argument("--piqa-questions", type=int, default=None)
    args = parser.parse_args(argv)
    apply_profile(args)
    args.train_rows = args.train_rows or (8 if args.quick else 240)
    args.steps = args.steps or (2 if args.quick else 30)
    args.eval_rows = args.eval_rows or (4 if args.quick else 100)
    args.piqa_questions = args.piqa_questions or (4 if args.quick else 300)

    import torch

    torch.set_num_threads(2)
    per_seed = {seed: run_seed(seed, args) for seed in args.seeds}
    facts = dict(
        train_rows=args.train_rows, steps=args.steps, eval_rows=args.eval_rows, piqa_questions=args.piqa_questions
    )
    finish("taia", args, argv, per_seed, ROWS, (*METRICS, "train_seconds"), "piqa_accuracy", **facts)
    return 0


if __name__ == "__main__":
    sys.exit(main())
