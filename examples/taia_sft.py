"""TAIA: LoRA on every linear layer, then keep only the attention updates (arXiv 2405.20192).

    python examples/taia_sft.py --output_dir outputs/taia --max_steps 30 --gradient_checkpointing false \\
        --learning_rate 1e-3 --use_peft --lora_r 16 --lora_alpha 32
    python examples/taia_sft.py --config examples/recipes/taia.yaml
    python examples/taia_sft.py ... --dataset_path ../shared/data/gsm8k/train.jsonl --question_field question \\
        --answer_field answer

Without --dataset_path the generated word problems of the demo are used; without --model_name_or_path, the embedded
SmolLM2-135M-Instruct. The trained (vanilla) adapter goes to output_dir, the merged TAIA model (plain transformers)
to output_dir/taia-model and, for LoRA runs, the TAIA adapter (attention updates only, for PEFT or a LoRA server) to
output_dir/taia-adapter. A rerun replaces those two folders.
"""

from dataclasses import dataclass, field

from trl import ModelConfig, TrlParser, get_peft_config

from robust_sft import load_examples, load_model_and_tokenizer
from robust_sft.demo import make_demo_data
from robust_sft.taia import TAIAConfig, TAIATrainer


@dataclass
class ScriptArguments:
    dataset_path: str | None = field(default=None, metadata={"help": "A .json/.jsonl/.csv/.tsv/.parquet file."})
    question_field: str | None = field(default=None, metadata={"help": "Rename this column to `instruction`."})
    answer_field: str | None = field(default=None, metadata={"help": "Rename this column to `output`."})
    train_size: int = field(default=240, metadata={"help": "Rows used (generated rows without dataset_path)."})


def load_training_rows(script_args: ScriptArguments, seed: int):
    if not script_args.dataset_path:
        return make_demo_data(n_train=script_args.train_size, n_eval=0, seed=seed)[0]
    rows = load_examples(script_args.dataset_path)
    if script_args.question_field:
        rows = rows.rename_column(script_args.question_field, "instruction")
    if script_args.answer_field:
        rows = rows.rename_column(script_args.answer_field, "output")
    return rows.shuffle(seed=seed).select(range(min(script_args.train_size, len(rows))))


def main(script_args: ScriptArguments, training_args: TAIAConfig, model_args: ModelConfig) -> None:
    quantization = "4bit" if model_args.load_in_4bit else "8bit" if model_args.load_in_8bit else None
    model, tokenizer = load_model_and_tokenizer(
        model_args.model_name_or_path, quantization=quantization, trust_remote_code=training_args.trust_remote_code
    )
    peft_config = get_peft_config(model_args)
    if peft_config is not None:
        peft_config.target_modules = model_args.lora_target_modules  # None: TAIATrainer picks attention + MLP
    trainer = TAIATrainer(
        model=model,
        args=training_args,
        train_dataset=load_training_rows(script_args, training_args.seed),
        processing_class=tokenizer,
        peft_config=peft_config,
    )
    trainer.train()
    trainer.save_model(training_args.output_dir)
    print(f"TAIA model: {trainer.save_taia_model(f'{training_args.output_dir}/taia-model', overwrite=True)}")
    if trainer.is_lora:
        print(f"TAIA adapter: {trainer.save_taia_adapter(f'{training_args.output_dir}/taia-adapter', overwrite=True)}")


if __name__ == "__main__":
    parser = TrlParser((ScriptArguments, TAIAConfig, ModelConfig))
    main(*parser.parse_args_and_config())
