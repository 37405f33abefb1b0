"""ANIT: noisy instructions + a distortion-scaled adversarial embedding term (Bai et al., AAAI 2025).

    python examples/anit_sft.py --output_dir outputs/anit --max_steps 20 --gradient_checkpointing false \\
        --learning_rate 5e-4 --use_peft --lora_r 16 --lora_alpha 16 --lora_target_modules all-linear
    python examples/anit_sft.py --config examples/recipes/anit.yaml
    python examples/anit_sft.py ... --dataset_path ../shared/data/sst2/train.tsv --text_field sentence \\
        --label_field label --label_words negative,positive

Without --dataset_path, generated review-sentiment rows are used; without --model_name_or_path, the embedded
SmolLM2-135M-Instruct. After training, label accuracy on held-out rows is reported with clean instructions and with
each evaluation operator's perturbation, as PDR = 1 - perturbed / clean. Ablations: --use_noise false (adversarial
only), --use_adversarial false (noisy instructions only), --adversarial_eta 0 (the random start only, NEFTune-like).
--noise_per_epoch true redraws the noisy instructions every epoch.
"""

import json
from dataclasses import dataclass, field

from datasets import Dataset
from trl import ModelConfig, TrlParser, get_peft_config

from robust_sft import load_examples, load_model_and_tokenizer
from robust_sft.anit import ANITConfig, ANITTrainer
from robust_sft.demo import SENTIMENT_INSTRUCTIONS, make_sentiment_data
from robust_sft.evaluation import perturbation_robustness


@dataclass
class ScriptArguments:
    dataset_path: str | None = field(default=None, metadata={"help": "A .json/.jsonl/.csv/.tsv/.parquet file."})
    text_field: str = field(default="sentence", metadata={"help": "Column with the text to classify."})
    label_field: str = field(default="label", metadata={"help": "Column with the label (an index or a name)."})
    label_words: str = field(default="negative,positive", metadata={"help": "Label words, by label index."})
    train_size: int = field(default=64, metadata={"help": "Training rows."})
    eval_size: int = field(default=32, metadata={"help": "Held-out rows for the robustness report."})
    eval_operators: str = field(
        default="char_substitute,word_shuffle,word_delete,irrelevant_append",
        metadata={"help": "Operators of the robustness report (comma-separated)."},
    )
    eval_rate: float = field(default=0.3, metadata={"help": "Operator rate of the robustness report."})


def classification_rows(script_args: ScriptArguments, seed: int) -> tuple[Dataset, Dataset]:
    """(train, eval) rows in the Alpaca layout with label words as answers."""
    if not script_args.dataset_path:
        return make_sentiment_data(script_args.train_size, script_args.eval_size, seed)
    names = script_args.label_words.split(",")
    raw = load_examples(script_args.dataset_path).shuffle(seed=seed)
    raw = raw.select(range(min(len(raw), script_args.train_size + script_args.eval_size)))

    def to_row(row, index):
        label = row[script_args.label_field]
        return {
            "instruction": SENTIMENT_INSTRUCTIONS[index % len(SENTIMENT_INSTRUCTIONS)],
            "input": str(row[script_args.text_field]),
            "output": names[int(label)] if str(label).isdigit() else str(label),
        }

    rows = raw.map(to_row, with_indices=True, remove_columns=raw.column_names)
    return rows.select(range(script_args.train_size)), rows.select(range(script_args.train_size, len(rows)))


def main(script_args: ScriptArguments, training_args: ANITConfig, model_args: ModelConfig) -> None:
    quantization = "4bit" if model_args.load_in_4bit else "8bit" if model_args.load_in_8bit else None
    model, tokenizer = load_model_and_tokenizer(
        model_args.model_name_or_path, quantization=quantization, trust_remote_code=training_args.trust_remote_code
    )
    train_rows, eval_rows = classification_rows(script_args, training_args.seed)
    trainer = ANITTrainer(
        model=model,
        args=training_args,
        train_dataset=train_rows,
        processing_class=tokenizer,
        peft_config=get_peft_config(model_args),
    )
    noisy = [row for row in trainer.noise_log if row["operator"]][:3]
    for row in noisy:
        print(f"[{row['operator']}, distortion {row['distortion']:.3f}] {row['noisy_instruction']!r}")
    trainer.train()
    trainer.save_model(training_args.output_dir)
    labels = sorted(set(train_rows["output"]))
    report = perturbation_robustness(
        trainer.model, tokenizer, eval_rows, labels, script_args.eval_operators.split(","), rate=script_args.eval_rate
    )
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    parser = TrlParser((ScriptArguments, ANITConfig, ModelConfig))
    main(*parser.parse_args_and_config())
