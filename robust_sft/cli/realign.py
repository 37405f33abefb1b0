"""`robust-sft train realign`: safety realignment of a fine-tune (arXiv 2405.09055), parsed like every method.

The flags are TRL's `TrlParser` over ([`RealignScriptArguments`], `SafetyRealignConfig`, `ModelConfig`, ...): see
[`robust_sft.cli.train.parse_args`]. `robust-sft realign ...` is an alias of `robust-sft train realign ...`.
"""

from __future__ import annotations

from typing import Any

from .core import UsageError
from .train import finish, load_model


def realign(script_args: Any, training_args: Any, model_args: Any) -> int:
    """Learn a DPO mask over the fine-tune's task vector, export the realigned model with its model card."""
    if bool(script_args.finetuned_model) == bool(script_args.finetuned_adapter):
        raise UsageError("Give exactly one of --finetuned_model (full mode) or --finetuned_adapter (LoRA mode).")
    if script_args.safe_adapter and not script_args.finetuned_adapter:
        raise UsageError("--safe_adapter is for LoRA mode: give --finetuned_adapter too.")
    if script_args.merge and not script_args.finetuned_adapter:
        raise UsageError("--merge is for LoRA mode (--finetuned_adapter): full mode writes a full model already.")
    if not script_args.dataset_name:
        raise UsageError("Name the safety preference pairs: --dataset_name FILE (prompt/chosen/rejected rows).")
    from peft import PeftModel

    from ..realign import load_preference_pairs, task_vector_from_adapters, task_vector_from_models, zero_adapter

    pairs = load_preference_pairs(script_args.dataset_name)  # before the model loads: a bad file fails fast
    if script_args.num_pairs is not None:
        pairs = pairs.select(range(min(script_args.num_pairs, len(pairs))))
    model, tokenizer = load_model(model_args, training_args)
    if script_args.finetuned_model:
        vector = task_vector_from_models(model.name_or_path, script_args.finetuned_model)
    else:
        vector = task_vector_from_adapters(script_args.finetuned_adapter, script_args.safe_adapter)
        model = PeftModel.from_pretrained(model, script_args.safe_adapter or script_args.finetuned_adapter)
        if not script_args.safe_adapter:  # the safe model is the base: its adapter is zero
            zero_adapter(model)

    from ..realign import SafetyRealignTrainer

    trainer = SafetyRealignTrainer(
        model=model, task_vector=vector, args=training_args, train_dataset=pairs, processing_class=tokenizer
    )
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    report = trainer.export(training_args.output_dir, merge=script_args.merge)
    finish(trainer, "realign", training_args, script_args, save=False)
    print(
        f"Realigned model saved to {training_args.output_dir} (model card: README.md); kept "
        f"{100 * report['kept_fraction']:.1f}% of the task vector."
    )
    return 0
