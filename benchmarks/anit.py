"""ANIT vs plain SFT, NEFTune and noise-only on SST-2 instruction classification: clean accuracy and PDR.

    python benchmarks/anit.py                  # embedded SmolLM2-135M-Instruct, 256 train / 100 eval rows, seed 0
    python benchmarks/anit.py --seeds 0 1 2    # several seeds: mean and spread
    python benchmarks/anit.py --quick          # tiny in-process model, a few rows (the CI smoke run)

Every configuration trains LoRA (r=16, all linear layers) from the same base model on the same SST-2 rows, in the
same order, for the same number of steps, and is scored on the same held-out rows with clean instructions and with
each perturbation operator (seeded per row, so every model sees the same noisy instructions). Writes
`results/anit[-quick].json`, `.md` and `.png` (PDR per operator).
"""

from __future__ import annotations

import sys
import time

from common import SHARED_DATA, benchmark_parser, finish, load_benchmark_model, training_args

OPERATORS = [
    "char_substitute",
    "keyboard_typo",
    "word_shuffle",
    "word_delete",
    "irrelevant_append",
    "distracting_context",
]
CONFIGURATIONS = ["base (no training)", "SFT", "NEFTune (alpha 5)", "noise only", "ANIT"]


def build_trainer(name: str, model, tokenizer, rows, steps: int, seed: int, quick: bool):
    from peft import LoraConfig

    from robust_sft import ANITConfig, ANITTrainer, RobustSFTConfig, RobustSFTTrainer

    common = training_args(
        "anit",
        seed,
        max_steps=steps,
        learning_rate=5e-4,
        lr_scheduler_type="cosine",
        warmup_steps=0.04,
        weight_decay=0.01,
        max_grad_norm=0.3,
        max_length=256,
        logging_steps=1,
    )
    lora = LoraConfig(r=16, lora_alpha=16, lora_dropout=0.05, target_modules="all-linear")
    if name == "SFT":
        trainer_class, config = RobustSFTTrainer, RobustSFTConfig(**common)
    elif name.startswith("NEFTune"):
        trainer_class, config = RobustSFTTrainer, RobustSFTConfig(**common, neftune_noise_alpha=5.0)
    else:
        anit = dict(noise_rate=0.5, adversarial_eta=2e-3, distortion_metric="levenshtein" if quick else "embedding")
        if name == "noise only":
            anit["use_adversarial"] = False
        trainer_class, config = ANITTrainer, ANITConfig(**common, **anit)
    return trainer_class(model=model, args=config, train_dataset=rows, processing_class=tokenizer, peft_config=lora)


def run_seed(seed: int, args) -> dict[str, dict]:

    from robust_sft.evaluation import SST2_LABELS, load_sst2, perturbation_robustness

    train_rows = load_sst2(SHARED_DATA / "sst2" / "train.tsv", args.train_rows, seed=seed, min_words=6)
    eval_rows = load_sst2(SHARED_DATA / "sst2" / "dev.tsv", args.eval_rows, seed=1000 + seed)
    operators = OPERATORS[:2] if args.quick else OPERATORS
    results = {}
    for name in CONFIGURATIONS:
        model, tokenizer = load_benchmark_model(args.quick, seed)
        started = time.perf_counter()
        train_seconds = 0.0
        if name != "base (no training)":
            trainer = build_trainer(name, model, tokenizer, train_rows, args.steps, seed, args.quick)
            trainer.train()
            model = trainer.model
            train_seconds = time.perf_counter() - started
        scores = perturbation_robustness(
            model, tokenizer, eval_rows, SST2_LABELS, operators, rate=args.rate, seed=seed, batch_size=32
        )
        perturbed = [scores[op]["accuracy"] for op in operators]
        results[name] = {
            "clean_accuracy": scores["clean"]["accuracy"],
            "perturbed_accuracy": sum(perturbed) / len(perturbed),
            "mean_pdr": sum(scores[op]["pdr"] for op in operators) / len(operators),
            "train_seconds": train_seconds,
            "scores": scores,
        }
        print(
            f"seed {seed} {name}: clean {results[name]['clean_accuracy']:.3f} mean PDR {results[name]['mean_pdr']:.3f}"
        )
    return results


def main(argv: list[str] | None = None) -> int:
    parser = benchmark_parser(__doc__)
    parser.add_argument("--train-rows", type=int, default=None)
    parser.add_argument("--eval-rows", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--rate", type=float, default=0.3, help="The evaluation operators' rate.")
    args = parser.parse_args(argv)
    args.train_rows = args.train_rows or (16 if args.quick else 256)
    args.eval_rows = args.eval_rows or (8 if args.quick else 100)
    args.steps = args.steps or (2 if args.quick else args.train_rows // 8)

    import torch

    torch.set_num_threads(2)
    per_seed = {seed: run_seed(seed, args) for seed in args.seeds}
    metrics = ("clean_accuracy", "perturbed_accuracy", "mean_pdr", "train_seconds")
    facts = dict(train_rows=args.train_rows, eval_rows=args.eval_rows, steps=args.steps, eval_rate=args.rate)
    finish("anit", args, argv, per_seed, CONFIGURATIONS, metrics, "mean_pdr", **facts)
    return 0


if __name__ == "__main__":
    sys.exit(main())
