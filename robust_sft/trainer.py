"""The shared base of every robust_sft trainer: `SFTTrainer` with the shared data layer, collator and model loading.

`RobustSFTTrainer` is itself a drop-in `SFTTrainer` (plain SFT), useful as the baseline every method is compared with:
it accepts Alpaca rows, masks the loss to assistant turns for any chat template, loads `model=None` as the embedded
default and `quantization="4bit"` as QLoRA.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Any

import torch
from datasets import Dataset
from transformers import PreTrainedModel
from trl import SFTConfig, SFTTrainer

from .data import TOKEN_COLUMNS, RobustDataCollator, load_examples, prepare_dataset
from .modeling import load_model_and_tokenizer
from .trl_internals import TRLLossMixin

logger = logging.getLogger(__name__)


def _bf16_available() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_bf16_supported()


def _accelerator_available() -> bool:
    xpu = getattr(torch, "xpu", None)
    return torch.cuda.is_available() or torch.backends.mps.is_available() or bool(xpu and xpu.is_available())


def apply_device_defaults(config: Any) -> None:
    """bf16 only where the hardware has it (unless set), and `use_cpu` without an accelerator (DDP over gloo)."""
    if config.bf16 is None and not config.fp16:
        config.bf16 = _bf16_available()
    if not _accelerator_available():
        config.use_cpu = True


@dataclass
class RobustSFTConfig(SFTConfig):
    r"""
    Configuration for [`RobustSFTTrainer`] and the base of every robust_sft config.

    Differences from [`~trl.SFTConfig`]:

    - `bf16` defaults to `True` only where the hardware supports it (so the config works on CPU as is).
    - `use_cpu` is set when the machine has no accelerator, so that several CPU processes (`torchrun` or
      `accelerate launch --multi_gpu --num_processes 2` on a CPU-only machine) train with DDP over gloo.
    - The loss covers the completion / assistant turns for every data format and any chat template (set
      `completion_only_loss=False` to train on whole sequences). `assistant_only_loss` is therefore not needed.

    Parameters:
        quantization (`str` or `None`, *optional*, defaults to `None`):
            When the trainer loads the model itself (`model` is a hub id, a folder or `None`): `"4bit"` for QLoRA
            (NF4, double quantization) or `"8bit"`; needs bitsandbytes.
    """

    quantization: str | None = field(
        default=None,
        metadata={
            "help": "When the trainer loads the model itself: '4bit' (QLoRA, NF4 + double quantization) or '8bit'; "
            "needs bitsandbytes.",
            "choices": [None, "4bit", "8bit"],
        },
    )

    def __post_init__(self):
        apply_device_defaults(self)
        if self.quantization not in (None, "4bit", "8bit"):
            raise ValueError(f"quantization must be None, '4bit' or '8bit', got {self.quantization!r}.")
        super().__post_init__()


class RobustSFTTrainer(TRLLossMixin, SFTTrainer):
    """[`~trl.SFTTrainer`] on the shared robust_sft data layer (plain SFT: the baseline of every method).

    Overrides of [`~trl.SFTTrainer`]: `__init__` (model loading, collator), `_prepare_dataset`,
    `_set_signature_columns_if_needed` and `compute_loss` (carried fields kept from the model).

    Args:
        model: A model, a hub id, a local folder, or `None` for the embedded SmolLM2-135M-Instruct. Ids and folders
            are loaded by [`load_model_and_tokenizer`] (QLoRA with `args.quantization`).
        train_dataset: A `Dataset` (or a `.json`/`.jsonl`/`.csv`/`.tsv`/`.parquet` path) in any format of
            [`robust_sft.data`]: `messages`, `prompt`/`completion`, `instruction`/`input`/`output`, `text`.

    Every other argument is that of [`~trl.SFTTrainer`].
    """

    _tag_names = ["trl", "sft", "robust_sft"]
    _name = "Robust SFT"
    _paper: dict[str, str] = {}

    # Per-token and per-example fields that a subclass needs in `compute_loss`; raw columns to keep for them.
    _token_fields: tuple[str, ...] = ()
    _example_fields: tuple[str, ...] = ()

    def __init__(
        self,
        model: str | os.PathLike | PreTrainedModel | None = None,
        args: SFTConfig | None = None,
        data_collator: Any | None = None,
        train_dataset: Dataset | str | os.PathLike | None = None,
        eval_dataset: Dataset | dict[str, Dataset] | str | os.PathLike | None = None,
        processing_class: Any | None = None,
        **kwargs: Any,
    ):
        args = args if args is not None else RobustSFTConfig(output_dir="robust-sft-output")
        if model is None or isinstance(model, (str, os.PathLike)):
            model, tokenizer = self._load_model(model, args, kwargs.pop("quantization_config", None))
            processing_class = processing_class if processing_class is not None else tokenizer
        model = self._prepare_model(model, processing_class, args, kwargs)
        if train_dataset is not None:
            train_dataset = load_examples(train_dataset)
        if isinstance(eval_dataset, (str, os.PathLike)):
            eval_dataset = load_examples(eval_dataset)
        if getattr(args, "assistant_only_loss", False):
            # The data layer already masks everything but the assistant turns, for any template; TRL's own path
            # would demand `{% generation %}` markers.
            args.assistant_only_loss = False
        tokenizer = getattr(processing_class, "tokenizer", processing_class)
        if tokenizer is not None and tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        needs_fields = bool(self._token_fields or self._example_fields)
        if args.padding_free or args.packing:
            if needs_fields:
                raise ValueError(
                    f"{type(self).__name__} carries per-example fields {self._token_fields + self._example_fields} to "
                    "the loss, which packing and padding-free batches cannot keep. Set packing=False and "
                    "padding_free=False."
                )
        elif data_collator is None and tokenizer is not None:
            data_collator = RobustDataCollator(
                pad_token_id=tokenizer.pad_token_id,
                pad_to_multiple_of=args.pad_to_multiple_of,
                token_fields=self._token_fields,
                example_fields=self._example_fields,
            )
        super().__init__(
            model=model,
            args=args,
            data_collator=data_collator,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            **kwargs,
        )

    @staticmethod
    def _load_model(model: str | os.PathLike | None, args: SFTConfig, quantization_config: Any | None):
        kwargs = dict(args.model_init_kwargs or {})
        if quantization_config is not None:
            kwargs["quantization_config"] = quantization_config
        quantization = getattr(args, "quantization", None)
        if quantization is not None and "quantization_config" in kwargs:
            raise ValueError("Set either `quantization` in the config or a `quantization_config`, not both.")
        loaded, tokenizer = load_model_and_tokenizer(
            model,
            quantization=quantization,
            trust_remote_code=args.trust_remote_code,
            gradient_checkpointing=args.gradient_checkpointing,
            **kwargs,
        )
        if "quantization_config" in kwargs:
            from peft import prepare_model_for_kbit_training

            loaded = prepare_model_for_kbit_training(loaded, use_gradient_checkpointing=args.gradient_checkpointing)
        return loaded, tokenizer

    def _prepare_model(self, model: PreTrainedModel, processing_class: Any, args: SFTConfig, kwargs: dict[str, Any]):
        """Hook between loading and SFTTrainer's set-up (PEFT wrapping): change the model or `kwargs` (e.g. the
        `peft_config`) in place. Returns the model."""
        return model

    # ----------------------------------------------------------------------------------------------- data
    def _keep_columns(self, dataset: Dataset, dataset_name: str) -> tuple[str, ...]:
        """Raw columns to keep through tokenization (the per-example fields the loss needs)."""
        return tuple(name for name in self._example_fields if name in dataset.column_names)

    def _instruction_transform(self, dataset: Dataset, dataset_name: str):
        """A function `f(instruction, row_index) -> instruction` applied before tokenization, or None."""
        return None

    def _prepare_dataset(self, dataset, processing_class, args, packing, formatting_func, dataset_name):
        columns = dataset.column_names if isinstance(dataset, Dataset) else None
        if isinstance(dataset, Dataset) and formatting_func is None and "input_ids" not in columns:
            dataset = self._tokenize(
                dataset,
                processing_class,
                args,
                f"{dataset_name} dataset",
                keep_columns=self._keep_columns(dataset, dataset_name),
                instruction_transform=self._instruction_transform(dataset, dataset_name),
            )
        return super()._prepare_dataset(dataset, processing_class, args, packing, formatting_func, dataset_name)

    @staticmethod
    def _tokenize(dataset: Dataset, processing_class: Any, args: SFTConfig, description: str, **options: Any):
        """Raw rows -> token columns with the data layer, under the config's length and loss settings."""
        return prepare_dataset(
            dataset,
            getattr(processing_class, "tokenizer", processing_class),
            max_length=args.max_length,
            truncation_mode=args.truncation_mode,
            completion_only_loss=args.completion_only_loss is not False,
            num_proc=args.dataset_num_proc,
            desc=f"Tokenizing {description}",
            **options,
        )

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        extra = [name for name in (*self._token_fields, *self._example_fields) if name not in self._signature_columns]
        self._signature_columns = [*self._signature_columns, *extra]

    # ----------------------------------------------------------------------------------------------- loss
    def _split_extras(self, inputs: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        """Separate the carried fields from the model inputs (the model must never see them)."""
        names = set(self._token_fields) | set(self._example_fields) | (set(TOKEN_COLUMNS) - {"input_ids", "labels"})
        extras = {name: inputs[name] for name in names if name in inputs}
        model_inputs = {key: value for key, value in inputs.items() if key not in extras}
        return model_inputs, extras

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        model_inputs, _ = self._split_extras(inputs)
        return super().compute_loss(model, model_inputs, return_outputs, num_items_in_batch)
