"""ANIT vs plain SFT, NEFTune, noise only and ANIT with eta = 0 on SST-2 instruction classification: clean accuracy,
accuracy under perturbed instructions and PDR, mean and 95% confidence interval over seeds.

    python benchmarks/anit.py --seeds 0 1 2    # embedded SmolLM2-135M-Instruct, 256 train / 500 eval rows per seed
    python benchmarks/anit.py --step-probe     # the measurement behind ANIT's step-size defaults (no training)
    python benchmarks/anit.py --quick          # tiny in-process model, a few rows (the CI smoke run)

Every configuration trains LoRA (r=16, all linear layers) from the same base model on the same SST-2 rows, in the
same order, for the same number of steps, and is scored on the same held-out rows (>= 500 in the full run) with clean
instructions and with each perturbation operator (seeded per row, so every model sees the same noisy instructions).
The interval is the t-interval of the mean over seeds (none for a single seed). Writes `results/anit[-quick].json`,
`anit[-quick]-summary.md` and `anit[-quick]-summary.png` (each metric's mean with its interval).
"""

from __future__ import annotations

import json
import math
import shlex
import sys
import time
from pathlib import Path

from common import (
    SHARED_DATA,
    apply_profile,
    benchmark_parser,
    forget_resumed_seeds,
    load_benchmark_model,
    machine,
    mean_and_interval,
    model_description,
    report_suffix,
    resumable_seeds,
    summary_plot,
    summary_table,
    training_args,
    write_report,
)

OPERATORS = [
    "char_substitute",
    "keyboard_typo",
    "word_shuffle",
    "word_delete",
    "irrelevant_append",
    "distracting_context",
]
# Instructions written by hand for this benchmark, unlike anything a noise operator produces (rewordings, questions,
# other registers), to test generalisation beyond the training noise. Each is scored on every evaluation row.
PARAPHRASES = [
    "Is the following movie review positive or negative?",
    "Read this review and tell me whether the reviewer liked the film. Answer positive or negative.",
    "What sentiment does the text below express? Reply with one word: positive or negative.",
    "Decide whether the opinion in this review is favourable (positive) or unfavourable (negative).",
    "Sentiment analysis task - label the review as positive or negative:",
    "Here is a short film review. Would you say its tone is positive or negative?",
    "Does the critic recommend this movie? Say positive if yes and negative if no.",
]
CONFIGURATIONS = ["base (no training)", "SFT", "NEFTune (alpha 5)", "noise only", "ANIT eta=0", "ANIT"]
METRICS = (
    "clean_accuracy",
    "perturbed_accuracy",
    "mean_pdr",
    "paraphrase_accuracy",
    "paraphrase_pdr",
    "train_seconds",
)


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
    else:  # ANIT at its defaults (step, ball, schedule), the paper's noise rate for classification
        anit = dict(noise_rate=0.5, distortion_metric="levenshtein" if quick else "embedding")
        if name == "noise only":
            anit["use_adversarial"] = False
        elif name == "ANIT eta=0":
            anit["adversarial_eta"] = 0.0
        trainer_class, config = ANITTrainer, ANITConfig(**common, **anit)
    return trainer_class(model=model, args=config, train_dataset=rows, processing_class=tokenizer, peft_config=lora)


def run_seed(seed: int, args) -> dict[str, dict]:
    from robust_sft.evaluation import SST2_LABELS, load_sst2, perturbation_robustness

    train_rows = load_sst2(SHARED_DATA / "sst2" / "train.tsv", args.train_rows, seed=seed, min_words=6)
    eval_rows = load_sst2(SHARED_DATA / "sst2" / "dev.tsv", args.eval_rows, seed=1000 + seed)
    operators = OPERATORS[:2] if args.quick else args.operators
    paraphrases = PARAPHRASES[:2] if args.quick else PARAPHRASES
    # The paraphrases are scored on the first `--paraphrase-rows` held-out rows (each paraphrase on all of them).
    paraphrase_rows = eval_rows.select(range(min(args.paraphrase_rows, len(eval_rows))))
    results = {}
    for name in args.configurations:
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
        reworded = perturbation_robustness(
            model, tokenizer, paraphrase_rows, SST2_LABELS, [], seed=seed, batch_size=32,
            instruction_variants=paraphrases,
        )  # fmt: skip
        scores.update({key: value for key, value in reworded.items() if key.startswith("paraphrase:")})
        scores["paraphrase_clean"] = reworded["clean"]
        perturbed = [scores[op]["accuracy"] for op in operators]
        reworded = [scores[f"paraphrase:{number}"] for number in range(len(paraphrases))]
        results[name] = {
            "clean_accuracy": scores["clean"]["accuracy"],
            "perturbed_accuracy": sum(perturbed) / len(perturbed),
            "mean_pdr": sum(scores[op]["pdr"] for op in operators) / len(operators),
            "paraphrase_accuracy": sum(score["accuracy"] for score in reworded) / len(reworded),
            "paraphrase_pdr": sum(score["pdr"] for score in reworded) / len(reworded),
            "train_seconds": train_seconds,
            "eval_rows": len(eval_rows),
            "scores": scores,
        }
        print(
            f"seed {seed} {name}: clean {results[name]['clean_accuracy']:.3f} mean PDR {results[name]['mean_pdr']:.3f}"
        )
    return results


# ---------------------------------------------------------------------------------------------------- step probe
def step_probe(args) -> dict:
    """The losses behind ANIT's step defaults: on one training batch of the embedded model, the clean loss, the loss
    after an ascent step of each size, and after a random perturbation of the same per-token norm."""
    import torch
    from peft import LoraConfig

    from robust_sft import ANITConfig, ANITTrainer
    from robust_sft.anit.trainer import anit_perturbation
    from robust_sft.evaluation import load_sst2
    from robust_sft.trl_internals import muted_metrics

    model, tokenizer = load_benchmark_model(args.quick, 0)
    rows = load_sst2(SHARED_DATA / "sst2" / "train.tsv", 8 * args.probe_batches, seed=0, min_words=6)
    config = ANITConfig(
        **training_args("anit-probe", 0, max_steps=1, max_length=256), use_noise=False, distortion_metric="levenshtein"
    )
    lora = LoraConfig(r=16, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear")
    trainer = ANITTrainer(model=model, args=config, train_dataset=rows, processing_class=tokenizer, peft_config=lora)
    model = trainer.model
    model.train()
    scale = trainer.embedding_scale(model)
    sizes = [0.0, *args.probe_sizes]
    totals = {"clean": 0.0, **{f"ascent {size}": 0.0 for size in sizes}, **{f"random {size}": 0.0 for size in sizes}}
    token_norms = []
    for start in range(0, len(trainer.train_dataset), 8):
        batch = trainer.data_collator([trainer.train_dataset[i] for i in range(start, start + 8)])
        batch = trainer._prepare_inputs(batch)
        with trainer.perturbed_embeddings(model) as state, muted_metrics(trainer):
            clean = trainer._clean_loss(model, dict(batch))
        (gradient,) = torch.autograd.grad(clean, state["probe"])
        mask = trainer.perturbation_mask(batch)
        with torch.no_grad():
            embeds = model.get_input_embeddings()(batch["input_ids"])
            token_norms.append(embeds.norm(dim=-1)[mask.bool()])
        radius = torch.full((gradient.shape[0],), scale)
        totals["clean"] += clean.item()
        for size in sizes:
            for kind, (init, eta) in (("ascent", (0.0, size)), ("random", (size, 0.0))):
                if size == 0.0 and kind == "random":
                    continue
                _, delta = anit_perturbation(gradient, mask, radius, init=init, eta=eta, epsilon=max(size, 1e-12))
                with torch.no_grad(), trainer.perturbed_embeddings(model, delta), muted_metrics(trainer):
                    totals[f"{kind} {size}"] += trainer._clean_loss(model, dict(batch)).item()
    batches = math.ceil(len(trainer.train_dataset) / 8)
    losses = {name: value / batches for name, value in totals.items() if not name == "random 0.0"}
    clean = losses["clean"]
    table = [
        {
            "size": size,
            "ascent_loss": losses[f"ascent {size}"],
            "random_loss": losses.get(f"random {size}", clean),
            "ascent_increase": losses[f"ascent {size}"] / clean - 1,
            "random_increase": losses.get(f"random {size}", clean) / clean - 1,
        }
        for size in sizes
    ]
    report = {
        "benchmark": "anit-step-probe",
        "command": "python benchmarks/anit.py --step-probe" + (" --quick" if args.quick else ""),
        "machine": machine(),
        "model": model_description(args.quick),
        "batches": batches,
        "embedding_scale_vocabulary_mean": scale,
        "prompt_token_norm_mean": torch.cat(token_norms).mean().item(),
        "clean_loss": clean,
        "per_token_size_relative_to_scale": table,
    }
    suffix = "-quick" if args.quick else ""
    write_report(args.output_dir, f"anit-step-probe{suffix}", report)
    print(json.dumps(report, indent=2))
    return report


def main(argv: list[str] | None = None) -> int:
    parser = benchmark_parser(__doc__)
    parser.add_argument("--train-rows", type=int, default=None)
    parser.add_argument("--eval-rows", type=int, default=None, help="Held-out rows (each scored per operator).")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--rate", type=float, default=0.3, help="The evaluation operators' rate.")
    parser.add_argument("--step-probe", action="store_true", help="Measure the ascent step's effect; no training.")
    parser.add_argument("--probe-batches", type=int, default=2, help="Batches of 8 rows for --step-probe.")
    parser.add_argument(
        "--probe-sizes", type=float, nargs="+", default=[0.003, 0.01, 0.03, 0.1], help="Per-token sizes to probe."
    )
    parser.add_argument("--operators", nargs="+", default=OPERATORS, choices=OPERATORS, help="Evaluation operators.")
    parser.add_argument(
        "--paraphrase-rows", type=int, default=None, help="Held-out rows each paraphrase is scored on."
    )
    parser.add_argument(
        "--configurations", nargs="+", default=CONFIGURATIONS, choices=CONFIGURATIONS, help="What to train and score."
    )
    args = parser.parse_args(argv)
    apply_profile(args)
    args.paraphrase_rows = args.paraphrase_rows or (8 if args.quick else 100)
    args.train_rows = args.train_rows or (16 if args.quick else 256)
    args.eval_rows = args.eval_rows or (8 if args.quick else 500)
    args.steps = args.steps or (2 if args.quick else args.train_rows // 8)

    import torch

    torch.set_num_threads(2)
    if args.step_probe:
        step_probe(args)
        return 0
    started = time.perf_counter()
    suffix = report_suffix(args.quick)
    settings = {key: value for key, value in vars(args).items() if key not in ("seeds", "output_dir")}
    per_seed, seed_seconds = resumable_seeds(f"anit{suffix}", args, settings, lambda seed: run_seed(seed, args))
    summary = {
        name: {metric: mean_and_interval([per_seed[seed][name][metric] for seed in args.seeds]) for metric in METRICS}
        for name in args.configurations
    }
    report = {
        "benchmark": "anit",
        "command": ("python benchmarks/anit.py " + shlex.join(sys.argv[1:] if argv is None else argv)).strip(),
        "machine": machine(),
        "model": model_description(args.quick),
        "train_rows": args.train_rows,
        "eval_rows": args.eval_rows,
        "steps": args.steps,
        "eval_rate": args.rate,
        "operators": OPERATORS[:2] if args.quick else args.operators,
        "paraphrases": PARAPHRASES[:2] if args.quick else PARAPHRASES,
        "paraphrase_rows": args.paraphrase_rows,
        "wall_seconds": time.perf_counter() - started,  # this process; seed_seconds also counts resumed seeds
        "seed_seconds": seed_seconds,
        "seeds": args.seeds,
        "interval": "95% t-interval of the mean over seeds",
        "summary": summary,
        "per_seed": per_seed,
    }
    write_report(args.output_dir, f"anit{suffix}", report)
    forget_resumed_seeds(f"anit{suffix}", args)
    output_dir = Path(args.output_dir)
    (output_dir / f"anit{suffix}-summary.md").write_text(summary_table(summary, METRICS))
    plotted = ("clean_accuracy", "perturbed_accuracy", "paraphrase_accuracy", "mean_pdr")
    summary_plot(summary, plotted, output_dir / f"anit{suffix}-summary.png", f"ANIT on SST-2, seeds {args.seeds}")
    print(summary_table(summary, METRICS))
    return 0


if __name__ == "__main__":
    sys.exit(main())
