"""`robust-sft train <method>`: TRL's `trl sft` script for every registered method, shared with `examples/`.

The arguments are parsed by TRL's `TrlParser` over (script arguments, the method's config class from the registry,
`trl.ModelConfig`, `trl.DatasetMixtureConfig`): every config field is a flag with its help text and choices, the flag
names are those of `trl sft`, and `--config recipe.yaml` reads a recipe (command-line flags win). A flag or a recipe
key that the method does not have is a usage error (exit code 2).

The example scripts parse with the same dataclasses ([`parse_args`] with their own extra dataclass) and load the model,
build the LoRA config and finish the run with the same functions, so a recipe runs unchanged from either.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trl import DatasetMixtureConfig, ModelConfig, ScriptArguments, TrlParser

from ..methods import get_method
from .core import OneLineErrors, UsageError

# The LoRA targets of `--use_peft` without `--lora_target_modules`, for every method: every linear layer but the LM
# head. A config may name its own (a `default_lora_target_modules()` method) where its paper says otherwise.
DEFAULT_LORA_TARGETS = "all-linear"

DATA_SUFFIXES = (".json", ".jsonl", ".csv", ".tsv", ".parquet")


# ----------------------------------------------------------------------------------------------- script arguments
@dataclass
class TrainScriptArguments(ScriptArguments):
    """TRL's script arguments; `--dataset_name` is a data file (.json/.jsonl/.csv/.tsv/.parquet, any format of the
    data layer), a folder (data files named by split, or a `save_to_disk` folder) or a hub id."""

    def trainer_inputs(self) -> dict[str, Any]:
        """Extra keyword arguments of the method's trainer (none for most methods)."""
        return {}

    def after_training(self, trainer: Any, output_dir: str) -> None:
        """What the method writes after the model is saved (nothing for most methods)."""


@dataclass
class DELIAScriptArguments(TrainScriptArguments):
    diverse_dataset: list[str] | None = field(
        default=None,
        metadata={"help": "DELIA's diverse rows: cache file(s) from `robust-sft build-cache` (space-separated)."},
    )

    def trainer_inputs(self) -> dict[str, Any]:
        return {"diverse_dataset": self.diverse_dataset}


@dataclass
class TAIAScriptArguments(TrainScriptArguments):
    save_taia_model: bool = field(
        default=False,
        metadata={"help": "Also write the merged TAIA model (plain transformers) to `output_dir/taia-model`."},
    )

    def after_training(self, trainer: Any, output_dir: str) -> None:
        if self.save_taia_model:  # a rerun replaces the export folders, never the run's own output_dir
            print(f"TAIA model: {trainer.save_taia_model(os.path.join(output_dir, 'taia-model'), overwrite=True)}")
            if trainer.is_lora:
                adapter = trainer.save_taia_adapter(os.path.join(output_dir, "taia-adapter"), overwrite=True)
                print(f"TAIA adapter (attention updates only): {adapter}")


@dataclass
class RealignScriptArguments(TrainScriptArguments):
    """Realignment: `--model_name_or_path` is the safe (aligned) model and `--dataset_name` the safety preference
    pairs (prompt/chosen/rejected rows, or hh-rlhf `.jsonl.gz`); the task vector is the fine-tune minus the safe model.
    """

    finetuned_model: str | None = field(
        default=None, metadata={"help": "Full mode: the fine-tuned model (a folder of safetensors)."}
    )
    finetuned_adapter: str | None = field(
        default=None, metadata={"help": "LoRA mode: the fine-tuned LoRA adapter folder (trained on the safe model)."}
    )
    safe_adapter: str | None = field(
        default=None,
        metadata={"help": "LoRA mode: the safe adapter folder (default: none, the safe model is the base)."},
    )
    num_pairs: int | None = field(default=None, metadata={"help": "Use the first N preference pairs."})
    merge: bool = field(
        default=False, metadata={"help": "LoRA mode: write the merged realigned model instead of an adapter."}
    )


# Methods whose trainer needs more than a model and a dataset; every other method uses TrainScriptArguments.
SCRIPT_ARGUMENTS: dict[str, type[TrainScriptArguments]] = {
    "delia": DELIAScriptArguments,
    "realign": RealignScriptArguments,
    "taia": TAIAScriptArguments,
}


# ----------------------------------------------------------------------------------------------- parsing
class TrainParser(OneLineErrors, TrlParser):
    """`TrlParser` with one-line usage errors (exit code 2)."""


def make_parser(method: str, *extra: type, prog: str | None = None) -> TrainParser:
    """The parser of `robust-sft train <method>`: (script arguments, the method's config, `ModelConfig`,
    `DatasetMixtureConfig`, *extra)."""
    spec = get_method(method)
    script_arguments = SCRIPT_ARGUMENTS.get(method, TrainScriptArguments)
    return TrainParser(
        (script_arguments, spec.config_class(), ModelConfig, DatasetMixtureConfig, *extra),
        prog=prog or f"robust-sft train {method}",
        description=f"{spec.summary} Docs: docs/{spec.docs} in the docs/ folder of the robust_sft repository. "
        "Every flag can also be a key of the --config YAML file.",
        allow_abbrev=False,
    )


def parse_args(method: str, args: list[str] | None = None, extra: tuple[type, ...] = (), prog: str | None = None):
    """(script_args, training_args, model_args, dataset_args, *extra) from `args` (default: `sys.argv[1:]`).

    An unknown flag or recipe key is a usage error: one line on stderr, exit code 2.
    """
    parser = make_parser(method, *extra, prog=prog)
    *parsed, from_config, from_command_line = parser.parse_args_and_config(
        args, return_remaining_strings=True, separate_remaining_strings=True
    )
    if from_command_line:
        parser.error(f"unrecognized arguments for `{method}`: {' '.join(from_command_line)}")
    if from_config:
        keys = [item[2:] for item in from_config[::2]]
        parser.error(f"the --config file has keys that `{method}` does not take: {', '.join(keys)}")
    return tuple(parsed)


# ----------------------------------------------------------------------------------------------- data
def load_splits(script_args: ScriptArguments, dataset_args: DatasetMixtureConfig | None = None):
    """The `DatasetDict` that `--dataset_name` (or a `datasets:` mixture in the recipe) names.

    A single data file is read by the data layer ([`load_examples`]) as the `train` split.
    """
    from datasets import DatasetDict, load_dataset, load_from_disk

    from ..data import load_examples

    if dataset_args is not None and dataset_args.datasets:
        from trl import get_dataset

        return get_dataset(dataset_args)
    if not script_args.dataset_name:
        raise UsageError("Name the training data: --dataset_name FILE|FOLDER|HUB_ID (or `datasets:` in --config).")
    if script_args.dataset_streaming:
        raise UsageError("--dataset_streaming is not supported: the data layer prepares map-style datasets.")
    path = Path(script_args.dataset_name)
    if path.is_file() or path.suffix.lower() in DATA_SUFFIXES:  # a missing file: the data layer says so
        return DatasetDict({"train": load_examples(path)})
    if path.is_dir() and any((path / name).is_file() for name in ("dataset_dict.json", "state.json")):
        loaded = load_from_disk(str(path))
        return loaded if isinstance(loaded, DatasetDict) else DatasetDict({"train": loaded})
    return load_dataset(script_args.dataset_name, name=script_args.dataset_config)


def pick_split(splits: Any, split: str, flag: str) -> Any:
    """`splits[split]`, or an error that lists the splits there are."""
    if split not in splits:
        raise ValueError(f"The dataset has no split {split!r} (it has {', '.join(splits)}); choose one with {flag}.")
    return splits[split]


@contextlib.contextmanager
def no_progress_bars():
    """Hide datasets' "Generating train split" bars while the data loads: an error after them is one line."""
    from datasets.utils.logging import disable_progress_bar, enable_progress_bar, is_progress_bar_enabled

    enabled = is_progress_bar_enabled()
    disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            enable_progress_bar()


def load_datasets(script_args: ScriptArguments, dataset_args: DatasetMixtureConfig, training_args: Any):
    """(train, eval) as `trl sft` picks them: `--dataset_train_split`, and `--dataset_test_split` when
    `eval_strategy` is not "no" (else None)."""
    with no_progress_bars():
        splits = load_splits(script_args, dataset_args)
    train_dataset = pick_split(splits, script_args.dataset_train_split, "--dataset_train_split")
    if training_args.eval_strategy == "no":
        return train_dataset, None
    return train_dataset, pick_split(splits, script_args.dataset_test_split, "--dataset_test_split")


def names_a_dataset(script_args: ScriptArguments, dataset_args: DatasetMixtureConfig) -> bool:
    """Whether data is named (`--dataset_name` or a `datasets:` mixture); the examples generate rows otherwise."""
    return bool(script_args.dataset_name or dataset_args.datasets)


def check_rows(method: str, training_args: Any, train_dataset: Any, eval_dataset: Any) -> None:
    """The method trainer's own checks of the rows, run before the model loads (as the trainer runs them when it
    loads the model itself), so that a bad file is one line in a second rather than after the weights load."""
    trainer_class = get_method(method).trainer_class()
    checker = trainer_class.__new__(trainer_class)  # the class's checks only read class attributes: no model needed
    checker._check_fields(checker._check_and_convert(train_dataset, training_args, None), training_args, None)
    if eval_dataset is not None:
        checker._check_and_convert(eval_dataset, training_args, None, "eval")


# ----------------------------------------------------------------------------------------------- model
def quantization(model_args: ModelConfig, training_args: Any) -> str | None:
    """`"4bit"`/`"8bit"` from `--load_in_4bit`/`--load_in_8bit` or the config's `quantization` (they must agree)."""
    from_model_args = "4bit" if model_args.load_in_4bit else "8bit" if model_args.load_in_8bit else None
    from_config = getattr(training_args, "quantization", None)
    if from_model_args and from_config and from_model_args != from_config:
        raise UsageError(f"--load_in_{from_model_args} contradicts --quantization {from_config}: give one.")
    return from_model_args or from_config


def load_model(model_args: ModelConfig, training_args: Any):
    """(model, tokenizer) of `--model_name_or_path` (default: the embedded SmolLM2-135M-Instruct), loaded as `trl sft`
    loads it (revision, attention implementation, dtype) plus robust_sft's QLoRA recipe for 4/8-bit."""
    from ..modeling import load_model_and_tokenizer

    return load_model_and_tokenizer(
        model_args.model_name_or_path,
        quantization=quantization(model_args, training_args),
        dtype=model_args.dtype,
        revision=model_args.model_revision,
        attn_implementation=model_args.attn_implementation,
        trust_remote_code=training_args.trust_remote_code,
        gradient_checkpointing=training_args.gradient_checkpointing,
        **(training_args.model_init_kwargs or {}),
    )


def default_lora_targets(training_args: Any) -> str | list[str] | None:
    """The LoRA targets when none are given: [`DEFAULT_LORA_TARGETS`], unless the method's config names its own."""
    own = getattr(training_args, "default_lora_target_modules", None)
    return own() if callable(own) else DEFAULT_LORA_TARGETS


def peft_config(model_args: ModelConfig, training_args: Any):
    """TRL's `get_peft_config(model_args)`, with one default of the LoRA targets for every method."""
    from trl import get_peft_config

    if model_args.use_peft and model_args.lora_target_modules is None:
        model_args = dataclasses.replace(model_args, lora_target_modules=default_lora_targets(training_args))
    return get_peft_config(model_args)


# ----------------------------------------------------------------------------------------------- run
def finish(
    trainer: Any, method: str, training_args: Any, script_args: ScriptArguments | None = None, save: bool = True
) -> None:
    """Save the model (unless `save=False`: the method wrote it already) with TRL's model card (the method's tags and
    paper from the registry), write what the method writes after training, push to the Hub with `--push_to_hub`,
    and close the trackers."""
    spec = get_method(method)
    output_dir = training_args.output_dir
    if save:
        trainer.save_model(output_dir)
    model_name = training_args.hub_model_id.split("/")[-1] if training_args.hub_model_id else Path(output_dir).name
    # Written after save_model: PEFT's save_pretrained leaves its placeholder card in the same README.md.
    dataset_name = getattr(script_args, "dataset_name", None)
    if dataset_name and Path(dataset_name).exists():
        dataset_name = None  # the card links a dataset name to the Hub: a local path is no such name
    trainer.create_model_card(model_name=model_name, dataset_name=dataset_name, tags=spec.tags)
    if isinstance(script_args, TrainScriptArguments):
        script_args.after_training(trainer, output_dir)
    if training_args.push_to_hub:
        trainer.push_to_hub(dataset_name=dataset_name, tags=spec.tags)
    if hasattr(trainer, "end"):  # transformers >= 5.18: finish the trackers, destroy the process group
        trainer.end()


def quiet() -> None:
    """Silence warnings a user cannot act on: SFTConfig's own `gradient_checkpointing` deprecation, and
    bitsandbytes' note about an optional CPU kernel package at import."""
    warnings.filterwarnings("ignore", message="`gradient_checkpointing` is deprecated", category=FutureWarning)
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)


def train(method: str, args: list[str] | None = None) -> int:
    """`robust-sft train <method> [flags]`: load, train, save with a model card. Returns the exit code."""
    from ..preparation import check_output_dir

    quiet()
    script_args, training_args, model_args, dataset_args = parse_args(method, args)
    check_output_dir(training_args.output_dir)
    if method == "realign":  # a DPO run over a task vector: its own inputs
        from .realign import realign

        return realign(script_args, training_args, model_args)
    train_dataset, eval_dataset = load_datasets(script_args, dataset_args, training_args)
    with no_progress_bars():
        check_rows(method, training_args, train_dataset, eval_dataset)
    peft = peft_config(model_args, training_args)
    model, tokenizer = load_model(model_args, training_args)
    trainer = get_method(method).trainer_class()(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
        peft_config=peft,
        **script_args.trainer_inputs(),
    )
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    finish(trainer, method, training_args, script_args)
    print(f"Model saved to {training_args.output_dir} (model card: README.md).")
    return 0
