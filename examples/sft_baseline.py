"""Plain SFT on the shared robust_sft data layer: the baseline every method is compared with.

    python examples/sft_baseline.py --output_dir out/baseline --max_steps 30 --gradient_checkpointing false \
        --dataset_path examples/data/word_problems.jsonl
    python examples/sft_baseline.py --config examples/recipes/sft.yaml

Without --dataset_path, generated word problems (robust_sft.demo) are used; without --model_name_or_path, the
embedded SmolLM2-135M-Instruct.
"""

from dataclasses import dataclass, field

from trl import ModelConfig, TrlParser, get_peft_config

from robust_sft import RobustSFTConfig, RobustSFTTrainer, load_examples, load_model_and_tokenizer
from robust_sft.demo import make_demo_data


@dataclass
class ScriptArguments:
    dataset_path: str | None = field(default=None, metadata={"help": "A .json/.jsonl/.csv/.tsv/.parquet file."})
    train_size: int = field(default=240, metadata={"help": "Generated rows when no dataset_path is given."})


def main(script_args: ScriptArguments, training_args: RobustSFTConfig, model_args: ModelConfig) -> None:
    quantization = "4bit" if model_args.load_in_4bit else "8bit" if model_args.load_in_8bit else None
    model, tokenizer = load_model_and_tokenizer(
        model_args.model_name_or_path, quantization=quantization, trust_remote_code=training_args.trust_remote_code
    )
    if script_args.dataset_path:
        train_dataset = load_examples(script_args.dataset_path)
    else:
        train_dataset, _ = make_demo_data(n_train=script_args.train_size, n_eval=0, seed=training_args.seed)
    if model_args.use_peft and not model_args.lora_target_modules:
        model_args.lora_target_modules = "all-linear"
    trainer = RobustSFTTrainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        processing_class=tokenizer,
        peft_config=get_peft_config(model_args),
    )
    trainer.train()
    trainer.save_model(training_args.output_dir)


if __name__ == "__main__":
    parser = TrlParser((ScriptArguments, RobustSFTConfig, ModelConfig))
    main(*parser.parse_args_and_config())
