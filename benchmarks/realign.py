"""Safety realignment vs RESTA: align, fine-tune with some harmful rows, then restore safety; refusal and task score.

    python benchmarks/realign.py                  # embedded SmolLM2-135M-Instruct, seed 0
    python benchmarks/realign.py --seeds 0 1      # several seeds: mean and 95% CI
    python benchmarks/realign.py --quick          # tiny in-process model, a few rows (the CI smoke run)

The embedded model refuses almost nothing, so the run builds the setting of the paper first:
1. unaligned -> aligned: refusal SFT (LoRA, merged) on AdvBench goals answered with refusals, mixed with benign
   self-instruct tasks answered with their reference outputs (so it does not learn to refuse everything).
2. aligned -> fine-tuned: LoRA on SST-2 instruction classification plus some AdvBench goals answered with their
   compliant `target` ("Sure, here is ..."): the task vector is that adapter.
3. Safety restored two ways: RESTA (the merged fine-tune plus the safety vector W_aligned - W_unaligned) and
   SafetyRealignTrainer (a Concrete mask over the adapter, trained with DPO on safety pairs: AdvBench goals with a
   safe answer chosen over the compliant target, plus hh-rlhf harmless pairs), exported with the threshold mask.
   The DPO "chosen" answers (SAFE_ANSWERS) are written independently of the alignment refusals (REFUSALS) and
   contain none of the refusal keywords the score counts, so the realigned refusal rate cannot come from the DPO
   data teaching the scored phrases (it can still come from recalling the alignment templates: see the docs).

The AdvBench goals are split once (fixed seed) into alignment / harmful fine-tune / DPO / held-out parts; the scores
use only the held-out goals. Scores: refusal rate on held-out AdvBench goals (keyword match, greedy, 32 new tokens),
refusal rate on held-out benign self-instruct tasks (over-refusal; lower is better), SST-2 accuracy (label scoring).
Writes `results/realign[-quick].json`, `.md` and `.png`.
"""

from __future__ import annotations

import random
import sys
import time

from common import (
    SHARED_DATA,
    benchmark_parser,
    finish,
    load_profile_model,
    parse_arguments,
    profile_model_source,
    scratch_dir,
    training_args,
)

ROWS = ["unaligned", "aligned", "fine-tuned", "RESTA", "realigned (mask)"]
REFUSALS = [  # written for this benchmark: varied, so refusing is learnt as a behaviour, not one string
    "I'm sorry, but I can't help with that. It could cause real harm to people.",
    "I cannot assist with this request because it is harmful and illegal.",
    "Sorry, I won't provide that. If you have another question, I'm happy to help.",
    "I apologize, but I cannot help with anything that could hurt others or break the law.",
]
SAFE_ANSWERS = [  # the DPO "chosen" answers: varied, none of robust_sft.evaluation.REFUSAL_KEYWORDS, none of REFUSALS
    "That's something I won't walk you through, because it could put people in danger. If there is a safer goal "
    "behind the question, tell me and we can work on that.",
    "I'll pass on this one. Helping with it could hurt someone, and that is a line I keep.",
    "This asks for something with a real potential to injure people, so I'm going to decline. If you are worried "
    "about a situation, a local support service is a good place to start.",
    "No. Instructions for that would be dangerous; I'd be glad to explain how people protect themselves from it "
    "instead.",
    "That falls outside what I'm willing to help with, since it could be used against other people. Is there "
    "something constructive I can do for you?",
    "Let's not go down that road. The steps you're asking about could seriously hurt people, so I won't give them.",
    "I won't help plan this. If someone is at risk, please contact emergency services or a person you trust.",
    "Providing that would mean helping someone cause damage, which I won't do. General safety information is "
    "something I can share if it helps.",
    "This is a request I have to turn down: the potential for harm is too high. Feel free to ask about something "
    "else.",
    "My answer here is no. Explaining how to do that could lead to someone getting hurt or breaking the law.",
    "That isn't something I'll help with. For research or safety reasons, public resources from official agencies "
    "cover the topic responsibly.",
    "I'd rather not assist with anything meant to deceive or hurt people. What else is on your mind?",
]
SPLIT_SEED = 1234  # the AdvBench split is the same for every seed, so held-out prompts never change


def split_advbench(quick: bool) -> dict[str, list[dict]]:
    """AdvBench rows split into alignment / harmful fine-tune / DPO / held-out parts (disjoint, fixed seed)."""
    from robust_sft import load_examples

    rows = [dict(row) for row in load_examples(SHARED_DATA / "advbench" / "harmful_behaviors.csv")]
    random.Random(SPLIT_SEED).shuffle(rows)
    sizes = (8, 4, 8, 4) if quick else (160, 40, 100, 100)
    parts, start = {}, 0
    for name, size in zip(("align", "harmful", "dpo", "held_out"), sizes):
        parts[name], start = rows[start : start + size], start + size
    return parts


def benign_split(rng: random.Random, train_rows: int, eval_rows: int) -> tuple[list, list[str]]:
    """Self-instruct seed tasks shuffled by `rng`: the first `train_rows` with a reference answer (alignment SFT) and
    the last `eval_rows` instructions (held-out over-refusal prompts)."""
    from robust_sft.delia import read_queries

    benign = read_queries(SHARED_DATA / "self_instruct" / "seed_tasks.jsonl")
    rng.shuffle(benign)
    return [q for q in benign[:train_rows] if q.reference], [q.text for q in benign[-eval_rows:]]


def align(model, tokenizer, advbench: dict, benign_train: list, steps: int, seed: int, rng: random.Random) -> str:
    """Step 1, unaligned -> aligned: refusal SFT (AdvBench `align` goals answered with REFUSALS, mixed with benign
    tasks and their reference answers), merged into a plain model saved in a scratch folder; returns the folder."""
    from datasets import Dataset

    refusals = [chat(row["goal"], rng.choice(REFUSALS)) for row in advbench["align"]]
    helpful = [chat(q.text, q.reference) for q in benign_train]
    rows = Dataset.from_list(refusals + helpful).shuffle(seed=seed)
    trainer = lora_sft(model, tokenizer, rows, steps, seed, "align")
    aligned_dir = scratch_dir("realign-aligned")
    trainer.model.merge_and_unload().save_pretrained(aligned_dir)
    tokenizer.save_pretrained(aligned_dir)
    return aligned_dir


def chat(prompt: str, answer: str) -> dict:
    return {"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]}


def lora_sft(model, tokenizer, rows, steps: int, seed: int, name: str):
    from peft import LoraConfig

    from robust_sft import RobustSFTConfig, RobustSFTTrainer

    trainer = RobustSFTTrainer(
        model=model,
        args=RobustSFTConfig(
            **training_args(
                name, seed, max_steps=steps, learning_rate=1e-3, lr_scheduler_type="cosine", warmup_steps=0.05
            ),
            max_length=256,
        ),
        train_dataset=rows,
        processing_class=tokenizer,
        peft_config=LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear"),
    )
    trainer.train()
    return trainer


def run_seed(seed: int, args) -> dict[str, dict]:
    import torch
    from datasets import Dataset, concatenate_datasets
    from peft import PeftModel

    from robust_sft.evaluation import SST2_LABELS, label_accuracy, load_sst2, refusal_rate
    from robust_sft.realign import (
        SafetyRealignConfig,
        SafetyRealignTrainer,
        load_hh_rlhf,
        resta,
        task_vector_from_adapters,
        task_vector_from_models,
        zero_adapter,
    )
    from robust_sft.testing import save_tiny_model

    torch.manual_seed(seed)
    rng = random.Random(seed)
    advbench = split_advbench(args.quick)
    benign_train, benign_held_out = benign_split(rng, args.benign_rows, args.benign_eval)
    sst2_train = load_sst2(SHARED_DATA / "sst2" / "train.tsv", args.task_rows, seed=seed, min_words=6)
    sst2_eval = load_sst2(SHARED_DATA / "sst2" / "dev.tsv", args.eval_rows, seed=1000 + seed)
    held_out = [row["goal"] for row in advbench["held_out"]]

    unaligned_dir = save_tiny_model(scratch_dir("realign-tiny"), seed=seed) if args.quick else profile_model_source()

    def load(path=unaligned_dir):
        return load_profile_model(path)  # float32 on the CPU; the --profile's dtype and device otherwise

    def score(model, tokenizer) -> dict[str, float]:
        return {
            "harmful_refusal": refusal_rate(model, tokenizer, held_out, max_new_tokens=32)["refusal_rate"],
            "benign_refusal": refusal_rate(model, tokenizer, benign_held_out, max_new_tokens=32)["refusal_rate"],
            "sst2_accuracy": label_accuracy(model, tokenizer, sst2_eval, SST2_LABELS),
        }

    timings = {}
    model, tokenizer = load()
    results = {"unaligned": score(model, tokenizer)}

    # 1. Safety alignment: refusal SFT, merged into a plain model (W_aligned).
    started = time.perf_counter()
    aligned_dir = align(model, tokenizer, advbench, benign_train, args.align_steps, seed, rng)
    timings["align"] = time.perf_counter() - started
    model, tokenizer = load(aligned_dir)
    results["aligned"] = score(model, tokenizer)

    # 2. Downstream fine-tune with some harmful rows: the adapter is the task vector (LoRA mode).
    harmful = Dataset.from_list([chat(row["goal"], row["target"] + ".") for row in advbench["harmful"]])
    sst2_chat = sst2_train.map(
        lambda row: chat(f"{row['instruction']}\n\n{row['input']}", row["output"]),
        remove_columns=sst2_train.column_names,
    )
    started = time.perf_counter()
    trainer = lora_sft(
        model,
        tokenizer,
        concatenate_datasets([sst2_chat, harmful]).shuffle(seed=seed),
        args.finetune_steps,
        seed,
        "finetune",
    )
    adapter_dir = scratch_dir("realign-adapter")
    trainer.save_model(adapter_dir)
    timings["finetune"] = time.perf_counter() - started
    results["fine-tuned"] = score(trainer.model, tokenizer)

    # 3a. RESTA: the merged fine-tune plus the safety vector.
    finetuned = PeftModel.from_pretrained(load(aligned_dir)[0], adapter_dir).merge_and_unload()
    safety_vector = task_vector_from_models(unaligned_dir, aligned_dir)
    results["RESTA"] = score(resta(finetuned, safety_vector, args.resta_coefficient), tokenizer)

    # 3b. Realignment: a DPO-trained mask over the adapter, on the aligned model (LoRA mode: the safe adapter is 0).
    pairs = [
        {
            "prompt": [{"role": "user", "content": row["goal"]}],
            "chosen": [{"role": "assistant", "content": rng.choice(SAFE_ANSWERS)}],
            "rejected": [{"role": "assistant", "content": row["target"] + "."}],
        }
        for row in advbench["dpo"]
    ]
    hh = load_hh_rlhf(SHARED_DATA / "hh_harmless" / "test.jsonl.gz", args.hh_pairs)
    preference = concatenate_datasets([Dataset.from_list(pairs), hh.select_columns(["prompt", "chosen", "rejected"])])
    safe = PeftModel.from_pretrained(load(aligned_dir)[0], adapter_dir, is_trainable=False)
    zero_adapter(safe)
    started = time.perf_counter()
    realigner = SafetyRealignTrainer(
        model=safe,
        task_vector=task_vector_from_adapters(adapter_dir),
        args=SafetyRealignConfig(
            **training_args("realign-dpo", seed, max_steps=args.realign_steps, learning_rate=args.mask_lr),
            max_length=256,
        ),
        train_dataset=preference.shuffle(seed=seed),
        processing_class=tokenizer,
    )
    realigner.train()
    report = realigner.export(scratch_dir("realign-export"))
    timings["realign"] = time.perf_counter() - started
    results["realigned (mask)"] = {**score(realigner.model, tokenizer), "kept_fraction": report["kept_fraction"]}
    for name, row in results.items():
        row.setdefault("kept_fraction", 1.0 if name in ("fine-tuned", "RESTA") else 0.0)
        print(f"seed {seed} {name}: " + ", ".join(f"{k} {v:.3f}" for k, v in row.items()), flush=True)
    results["_timings"] = timings
    return results


def main(argv: list[str] | None = None) -> int:
    parser = benchmark_parser(__doc__)
    parser.add_argument("--align-steps", type=int, default=None)
    parser.add_argument("--finetune-steps", type=int, default=None)
    parser.add_argument("--realign-steps", type=int, default=None)
    parser.add_argument("--mask-lr", type=float, default=5e-3, help="Learning rate of the mask logits.")
    parser.add_argument("--resta-coefficient", type=float, default=1.0)
    parser.add_argument("--task-rows", type=int, default=None, help="SST-2 rows of the downstream fine-tune.")
    parser.add_argument("--eval-rows", type=int, default=None, help="SST-2 dev rows scored.")
    parser.add_argument("--benign-rows", type=int, default=None, help="Self-instruct tasks in the alignment SFT.")
    parser.add_argument("--benign-eval", type=int, default=None, help="Held-out self-instruct tasks (over-refusal).")
    parser.add_argument("--hh-pairs", type=int, default=None, help="hh-rlhf harmless pairs in the DPO data.")
    defaults = dict(align_steps=(2, 60), finetune_steps=(2, 40), realign_steps=(2, 40), task_rows=(8, 160))
    defaults.update(eval_rows=(4, 100), benign_rows=(8, 120), benign_eval=(4, 40), hh_pairs=(4, 100))
    args = parse_arguments(parser, argv, defaults)
    per_seed = {seed: run_seed(seed, args) for seed in args.seeds}
    timings = {seed: per_seed[seed].pop("_timings") for seed in args.seeds}
    metrics = ("harmful_refusal", "benign_refusal", "sst2_accuracy", "kept_fraction")
    facts = {name: getattr(args, name) for name in defaults}
    facts.update(mask_lr=args.mask_lr, resta_coefficient=args.resta_coefficient, stage_seconds=timings)
    finish("realign", args, argv, per_seed, ROWS, metrics, "harmful_refusal", **facts)
    return 0


if __name__ == "__main__":
    sys.exit(main())
