"""Safety realignment by subspace-oriented model fusion (arXiv 2405.09055): mask a fine-tune's task vector with DPO.

    python examples/safety_realign.py --output_dir outputs/realign --max_steps 30 --per_device_train_batch_size 8
    python examples/safety_realign.py ... --finetuned_adapter outputs/my-task-adapter \\
        --dataset_name ../shared/data/hh_harmless/test.jsonl.gz --num_pairs 2000 \\
        --eval_prompts ../shared/data/advbench/harmful_behaviors.csv

1. Without --finetuned_adapter, the safe model (default: the embedded SmolLM2-135M-Instruct) is fine-tuned with LoRA
   on a small downstream task (generated review sentiment) that includes some compliant answers to unsafe requests:
   the task vector is that adapter (LoRA mode; the safe model is the base, whose adapter is zero).
2. SafetyRealignTrainer learns a Concrete mask over the task vector with DPO on safety preference pairs; the model's
   weights stay frozen and DPO's reference is the same model with the mask forced to 1 (no copy). The deterministic
   mask is exported as a plain PEFT adapter; checkpoints (`--save_strategy steps`) hold the realigned adapter and
   the mask logits (`realign_masks.safetensors`), from which `--resume_from_checkpoint` continues.
3. Refusal rate on held-out requests and downstream accuracy are reported for safe / fine-tuned / realigned.
"""

import json
import os
from dataclasses import dataclass, field

from datasets import concatenate_datasets
from peft import LoraConfig, PeftModel
from trl import TrlParser

from robust_sft import RobustSFTConfig, RobustSFTTrainer, load_model_and_tokenizer
from robust_sft.demo import make_safety_demo_data, make_sentiment_data
from robust_sft.evaluation import label_accuracy, refusal_rate
from robust_sft.realign import (
    SafetyRealignConfig,
    SafetyRealignTrainer,
    load_preference_pairs,
    task_vector_from_adapters,
    zero_adapter,
)


@dataclass
class ScriptArguments:
    model_name_or_path: str | None = field(default=None, metadata={"help": "The safe model (default: embedded)."})
    finetuned_adapter: str | None = field(default=None, metadata={"help": "A LoRA fine-tune of the safe model."})
    finetune_steps: int = field(default=20, metadata={"help": "Steps of the LoRA fine-tune made without one."})
    finetune_rows: int = field(default=64, metadata={"help": "Downstream rows of that fine-tune."})
    dataset_name: str | None = field(
        default=None,
        metadata={"help": "Safety preference pairs, a file (as in `robust-sft train realign`; default: demo pairs)."},
    )
    num_pairs: int | None = field(default=None, metadata={"help": "Use the first N pairs."})
    eval_prompts: str | None = field(default=None, metadata={"help": "Held-out harmful prompts (.csv with `goal`)."})
    num_eval_prompts: int = field(default=16, metadata={"help": "How many held-out prompts to score."})


def finetune(script_args, model, tokenizer, output_dir: str) -> str:
    """LoRA on the downstream task plus compliant answers to unsafe requests (what erodes safety)."""
    task, _ = make_sentiment_data(script_args.finetune_rows, 0)
    pairs, _ = make_safety_demo_data()
    unsafe = pairs.map(
        lambda row: {"messages": row["prompt"] + row["rejected"]}, remove_columns=pairs.column_names
    ).select(range(8))
    task = task.map(
        lambda row: {
            "messages": [
                {"role": "user", "content": f"{row['instruction']}\n\n{row['input']}"},
                {"role": "assistant", "content": row["output"]},
            ]
        },
        remove_columns=task.column_names,
    )
    trainer = RobustSFTTrainer(
        model=model,
        args=RobustSFTConfig(
            output_dir=output_dir,
            max_steps=script_args.finetune_steps,
            per_device_train_batch_size=8,
            learning_rate=1e-3,
            gradient_checkpointing=False,
            report_to=[],
            save_strategy="no",
        ),
        train_dataset=concatenate_datasets([task, unsafe]).shuffle(seed=0),
        processing_class=tokenizer,
        peft_config=LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"),
    )
    trainer.train()
    trainer.save_model(output_dir)
    return output_dir


def scores(model, tokenizer, prompts, task_rows) -> dict[str, float]:
    refusals = refusal_rate(model, tokenizer, prompts, max_new_tokens=48)["refusal_rate"]
    accuracy = label_accuracy(model, tokenizer, task_rows, ["negative", "positive"])
    return {"refusal_rate": refusals, "task_accuracy": accuracy}


def held_out_prompts(script_args) -> list[str]:
    if not script_args.eval_prompts:
        return make_safety_demo_data()[1]
    from robust_sft import load_examples

    return load_examples(script_args.eval_prompts)["goal"][: script_args.num_eval_prompts]


def main(script_args: ScriptArguments, training_args: SafetyRealignConfig) -> None:
    model, tokenizer = load_model_and_tokenizer(script_args.model_name_or_path)
    adapter = script_args.finetuned_adapter or finetune(
        script_args, model, tokenizer, os.path.join(training_args.output_dir, "finetuned-adapter")
    )
    prompts, (_, task_rows) = held_out_prompts(script_args), make_sentiment_data(8, 16, seed=1)
    results = {
        "safe": scores(load_model_and_tokenizer(script_args.model_name_or_path)[0], tokenizer, prompts, task_rows)
    }
    base = load_model_and_tokenizer(script_args.model_name_or_path)[0]
    finetuned = PeftModel.from_pretrained(base, adapter)
    results["fine-tuned"] = scores(finetuned, tokenizer, prompts, task_rows)

    vector = task_vector_from_adapters(adapter)  # the safe model is the base: its adapter is zero
    zero_adapter(finetuned)
    pairs = load_preference_pairs(script_args.dataset_name) if script_args.dataset_name else make_safety_demo_data()[0]
    if script_args.num_pairs is not None:
        pairs = pairs.select(range(min(script_args.num_pairs, len(pairs))))
    trainer = SafetyRealignTrainer(
        model=finetuned, task_vector=vector, args=training_args, train_dataset=pairs, processing_class=tokenizer
    )
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    report = trainer.export(os.path.join(training_args.output_dir, "realigned-adapter"))
    results["realigned"] = scores(trainer.model, tokenizer, prompts, task_rows)
    results["kept_fraction"] = report["kept_fraction"]
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    parser = TrlParser((ScriptArguments, SafetyRealignConfig))
    main(*parser.parse_args_and_config())
