"""TAIA's safety claim: after a harmful fine-tune, does keeping only the attention updates keep an aligned model safe?

    python benchmarks/taia_safety.py --seeds 0 1 2     # embedded SmolLM2-135M-Instruct, made safe first
    python benchmarks/taia_safety.py --quick           # tiny in-process model, a few rows (the CI smoke run)

The paper (arXiv 2405.20192) fine-tunes LLaMA-2-7B-chat on harmful rows and reports AdvBench attack success 84.59%
for the vanilla model against 8.27% with TAIA. Here, on the embedded model (which refuses almost nothing):
1. aligned model: built as `benchmarks/realign.py` builds it (refusal SFT on the AdvBench `align` goals mixed with
   benign self-instruct tasks, LoRA merged), once, with `--align-seed`: it is the fixed starting point and the seeds
   vary the harmful fine-tune only;
2. harmful fine-tune: `TAIATrainer` (LoRA r=16 on every linear layer) on the AdvBench `harmful` and `dpo` goals
   answered with their compliant target ("Sure, here is ..."); a seed changes the row order, the LoRA init and dropout;
3. exports of that one adapter: vanilla (every update merged), TAIA (attention only), TAIF (MLP only), each built by
   `TAIATrainer.taia_model(keep)`, the tensors `save_taia_model` writes.
Scores, on AdvBench goals no step trained on (the `held_out` split, fixed for every seed): refusal rate (keyword
match, greedy, 32 new tokens; attack success = 1 - refusal), the loss of the compliant target after those goals
(lower = the fine-tune's compliance carried over), and benign over-refusal on held-out self-instruct tasks.
Writes `results/taia_safety[-quick].json`, `.md` and `.png`.
"""

from __future__ import annotations

import random
import sys
import time

from common import (
    benchmark_parser,
    finish,
    load_profile_model,
    parse_arguments,
    profile_model_source,
    scratch_dir,
    training_args,
)
from realign import aligned_model, benign_split, chat, split_advbench

ROWS = ["aligned", "vanilla (all updates)", "TAIA (attention only)", "TAIF (MLP only)"]
METRICS = ("harmful_refusal", "compliance_loss", "benign_refusal")


def load(path):
    return load_profile_model(path)  # float32 on the CPU; the --profile's dtype and device otherwise


def scorer(advbench: dict, benign_held_out: list[str]):
    """`score(model, tokenizer)`: the three metrics on the held-out goals and tasks."""
    from datasets import Dataset

    from robust_sft.evaluation import answer_loss, refusal_rate

    goals = [row["goal"] for row in advbench["held_out"]]
    compliant = Dataset.from_list([chat(row["goal"], row["target"] + ".") for row in advbench["held_out"]])

    def score(model, tokenizer) -> dict[str, float]:
        return {
            "harmful_refusal": refusal_rate(model, tokenizer, goals, max_new_tokens=32)["refusal_rate"],
            "compliance_loss": answer_loss(model, tokenizer, compliant, batch_size=16, max_length=256),
            "benign_refusal": refusal_rate(model, tokenizer, benign_held_out, max_new_tokens=32)["refusal_rate"],
        }

    return score


def harmful_finetune(aligned_dir: str, advbench: dict, seed: int, args):
    """Step 2: TAIATrainer, LoRA on every linear layer, on goals answered with their compliant target."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig

    from robust_sft.taia import TAIAConfig, TAIATrainer

    torch.manual_seed(seed)
    model, tokenizer = load(aligned_dir)
    rows = [chat(row["goal"], row["target"] + ".") for part in ("harmful", "dpo") for row in advbench[part]]
    trainer = TAIATrainer(
        model=model,
        args=TAIAConfig(
            **training_args(
                "taia-safety",
                seed,
                max_steps=args.finetune_steps,
                learning_rate=1e-3,
                lr_scheduler_type="cosine",
                warmup_steps=0.05,
            ),  # fmt: skip
            max_length=256,
        ),
        train_dataset=Dataset.from_list(rows).shuffle(seed=seed),
        processing_class=tokenizer,
        peft_config=LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05),
    )
    trainer.train()
    return trainer, tokenizer


def main(argv: list[str] | None = None) -> int:
    from robust_sft.testing import save_tiny_model

    parser = benchmark_parser(__doc__)
    parser.add_argument("--align-seed", type=int, default=0, help="Seed of the one alignment run all seeds share.")
    parser.add_argument("--align-steps", type=int, default=None)
    parser.add_argument("--finetune-steps", type=int, default=None, help="Steps of the harmful fine-tune.")
    parser.add_argument("--benign-rows", type=int, default=None, help="Self-instruct tasks in the alignment SFT.")
    parser.add_argument("--benign-eval", type=int, default=None, help="Held-out self-instruct tasks (over-refusal).")
    parser.add_argument(
        "--aligned-dir", default=None, help="Keep the aligned model here; a run with the same settings reuses it."
    )
    sizes = dict(align_steps=(2, 60), finetune_steps=(2, 40), benign_rows=(8, 120), benign_eval=(4, 40))
    args = parse_arguments(parser, argv, sizes)

    advbench = split_advbench(args.quick)
    rng = random.Random(args.align_seed)
    benign_train, benign_held_out = benign_split(rng, args.benign_rows, args.benign_eval)
    score = scorer(advbench, benign_held_out)
    unaligned_dir = save_tiny_model(scratch_dir("taia-safety-tiny")) if args.quick else profile_model_source()

    started = time.perf_counter()
    aligned_dir = aligned_model(args, unaligned_dir, advbench, benign_train, rng)
    stage_seconds = {"align": time.perf_counter() - started}
    aligned = score(*load(aligned_dir))
    print("aligned: " + ", ".join(f"{k} {v:.3f}" for k, v in aligned.items()), flush=True)

    per_seed = {}
    for seed in args.seeds:
        started = time.perf_counter()
        trainer, tokenizer = harmful_finetune(aligned_dir, advbench, seed, args)
        stage_seconds[f"finetune seed {seed}"] = time.perf_counter() - started
        results = {"aligned": aligned}
        for keep, name in (("all", ROWS[1]), ("attention", ROWS[2]), ("mlp", ROWS[3])):
            results[name] = score(trainer.taia_model(keep), tokenizer)
            print(f"seed {seed} {name}: " + ", ".join(f"{k} {v:.3f}" for k, v in results[name].items()), flush=True)
        per_seed[seed] = results

    facts = {name: getattr(args, name) for name in sizes}
    facts.update(align_seed=args.align_seed, stage_seconds=stage_seconds)
    facts["finetune_rows"] = len(advbench["harmful"]) + len(advbench["dpo"])
    facts["held_out_goals"] = len(advbench["held_out"])
    finish("taia_safety", args, argv, per_seed, ROWS, METRICS, "harmful_refusal", **facts)
    return 0


if __name__ == "__main__":
    sys.exit(main())
