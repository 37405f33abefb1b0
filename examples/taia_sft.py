"""TAIA: LoRA on every linear layer, then keep only the attention updates (arXiv 2405.20192).

    python examples/taia_sft.py --output_dir outputs/taia --max_steps 30 --gradient_checkpointing false \\
        --learning_rate 1e-3 --use_peft --lora_r 16 --lora_alpha 32
    python examples/taia_sft.py --config examples/recipes/taia.yaml
    python examples/taia_sft.py ... --dataset_name ../shared/data/gsm8k/train.jsonl --question_field question \\
        --answer_field answer

The flags are those of `robust-sft train taia` (the same parser, robust_sft.cli.train), plus the example's own.
Without --dataset_name the generated word problems of the demo are used; without --model_name_or_path, the embedded
SmolLM2-135M-Instruct. The trained (vanilla) adapter goes to output_dir, the merged TAIA model (plain transformers)
to output_dir/taia-model and, for LoRA runs, the TAIA adapter (attention updates only, for PEFT or a LoRA server) to
output_dir/taia-adapter. A rerun replaces those two folders.
"""

from dataclasses import dataclass, field

from robust_sft.cli.train import finish, load_datasets, load_model, names_a_dataset, parse_args, peft_config
from robust_sft.demo import make_demo_data
from robust_sft.taia import TAIATrainer


@dataclass
class ExampleArguments:
    question_field: str | None = field(default=None, metadata={"help": "Rename this column to `instruction`."})
    answer_field: str | None = field(default=None, metadata={"help": "Rename this column to `output`."})
    train_size: int = field(default=240, metadata={"help": "Rows used (generated rows without --dataset_name)."})


def load_training_rows(script_args, dataset_args, training_args, example_args: ExampleArguments):
    if not names_a_dataset(script_args, dataset_args):
        return make_demo_data(n_train=example_args.train_size, n_eval=0, seed=training_args.seed)[0]
    rows = load_datasets(script_args, dataset_args, training_args)[0]
    if example_args.question_field:
        rows = rows.rename_column(example_args.question_field, "instruction")
    if example_args.answer_field:
        rows = rows.rename_column(example_args.answer_field, "output")
    return rows.shuffle(seed=training_args.seed).select(range(min(example_args.train_size, len(rows))))


def main(script_args, training_args, model_args, dataset_args, example_args: ExampleArguments) -> None:
    model, tokenizer = load_model(model_args, training_args)
    trainer = TAIATrainer(
        model=model,
        args=training_args,
        train_dataset=load_training_rows(script_args, dataset_args, training_args, example_args),
        processing_class=tokenizer,
        peft_config=peft_config(model_args, training_args),
    )
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    script_args.save_taia_model = True  # the example always writes the merged TAIA model
    finish(trainer, "taia", training_args, script_args)


if __name__ == "__main__":
    main(*parse_args("taia", extra=(ExampleArguments,), prog="examples/taia_sft.py"))
