"""ANIT: noisy instructions + a distortion-scaled adversarial embedding term (Bai et al., AAAI 2025).

    python examples/anit_sft.py --output_dir outputs/anit --max_steps 20 --gradient_checkpointing false \\
        --learning_rate 5e-4 --use_peft --lora_r 16 --lora_alpha 16 --lora_target_modules all-linear
    python examples/anit_sft.py --config examples/recipes/anit.yaml
    python examples/anit_sft.py ... --dataset_name ../shared/data/sst2/train.tsv --text_field sentence \\
        --label_field label --label_words negative,positive

The flags are those of `robust-sft train anit` (the same parser, robust_sft.cli.train), plus the example's own.
Without --dataset_name, generated review-sentiment rows are used; without --model_name_or_path, the embedded
SmolLM2-135M-Instruct. After training, label accuracy on held-out rows is reported with clean instructions and with
each evaluation operator's perturbation, as PDR = 1 - perturbed / clean. Ablations: --use_noise false (adversarial
only), --use_adversarial false (noisy instructions only), --adversarial_eta 0 (the random start only, NEFTune-like).
--noise_per_epoch true redraws the noisy instructions every epoch.
"""

import json
from dataclasses import dataclass, field

from datasets import Dataset

from robust_sft.anit import ANITTrainer
from robust_sft.cli.train import finish, load_datasets, load_model, names_a_dataset, parse_args, peft_config
from robust_sft.demo import SENTIMENT_INSTRUCTIONS, make_sentiment_data
from robust_sft.evaluation import perturbation_robustness


@dataclass
class ExampleArguments:
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


def classification_rows(script_args, dataset_args, training_args, example_args) -> tuple[Dataset, Dataset]:
    """(train, eval) rows in the Alpaca layout with label words as answers."""
    seed, args = training_args.seed, example_args
    if not names_a_dataset(script_args, dataset_args):
        return make_sentiment_data(args.train_size, args.eval_size, seed)
    names = args.label_words.split(",")
    raw = load_datasets(script_args, dataset_args, training_args)[0].shuffle(seed=seed)
    raw = raw.select(range(min(len(raw), args.train_size + args.eval_size)))

    def to_row(row, index):
        label = row[args.label_field]
        return {
            "instruction": SENTIMENT_INSTRUCTIONS[index % len(SENTIMENT_INSTRUCTIONS)],
            "input": str(row[args.text_field]),
            "output": names[int(label)] if str(label).isdigit() else str(label),
        }

    rows = raw.map(to_row, with_indices=True, remove_columns=raw.column_names)
    return rows.select(range(args.train_size)), rows.select(range(args.train_size, len(rows)))


def main(script_args, training_args, model_args, dataset_args, example_args: ExampleArguments) -> None:
    model, tokenizer = load_model(model_args, training_args)
    train_rows, eval_rows = classification_rows(script_args, dataset_args, training_args, example_args)
    trainer = ANITTrainer(
        model=model,
        args=training_args,
        train_dataset=train_rows,
        processing_class=tokenizer,
        peft_config=peft_config(model_args, training_args),
    )
    noisy = [row for row in trainer.noise_log if row["operator"]][:3]
    for row in noisy:
        print(f"[{row['operator']}, distortion {row['distortion']:.3f}] {row['noisy_instruction']!r}")
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    finish(trainer, "anit", training_args, script_args)
    labels = sorted(set(train_rows["output"]))
    operators = example_args.eval_operators.split(",")
    rate = example_args.eval_rate
    report = perturbation_robustness(trainer.model, tokenizer, eval_rows, labels, operators, rate=rate)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main(*parse_args("anit", extra=(ExampleArguments,), prog="examples/anit_sft.py"))
