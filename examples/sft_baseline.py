"""Plain SFT on the shared robust_sft data layer: the baseline every method is compared with.

    python examples/sft_baseline.py --output_dir outputs/baseline --max_steps 30 --gradient_checkpointing false \\
        --dataset_name examples/data/word_problems.jsonl
    python examples/sft_baseline.py --config examples/recipes/sft.yaml

The flags are those of `robust-sft train sft` (the same parser, robust_sft.cli.train), plus --train_size. Without
--dataset_name, generated word problems (robust_sft.demo) are used; without --model_name_or_path, the embedded
SmolLM2-135M-Instruct.
"""

from dataclasses import dataclass, field

from robust_sft import RobustSFTTrainer
from robust_sft.cli.train import finish, load_datasets, load_model, names_a_dataset, parse_args, peft_config
from robust_sft.demo import make_demo_data


@dataclass
class ExampleArguments:
    train_size: int = field(default=240, metadata={"help": "Generated rows when no --dataset_name is given."})


def main(script_args, training_args, model_args, dataset_args, example_args: ExampleArguments) -> None:
    model, tokenizer = load_model(model_args, training_args)
    if names_a_dataset(script_args, dataset_args):
        train_dataset, eval_dataset = load_datasets(script_args, dataset_args, training_args)
    else:
        train_dataset = make_demo_data(n_train=example_args.train_size, n_eval=0, seed=training_args.seed)[0]
        eval_dataset = None
    trainer = RobustSFTTrainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
        peft_config=peft_config(model_args, training_args),
    )
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    finish(trainer, "sft", training_args, script_args)


if __name__ == "__main__":
    main(*parse_args("sft", extra=(ExampleArguments,), prog="examples/sft_baseline.py"))
