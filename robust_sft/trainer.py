"""The shared base of every robust_sft trainer: `SFTTrainer` with TRL's own data preparation, plus what TRL lacks.

`RobustSFTTrainer` is itself a drop-in `SFTTrainer` (plain SFT), the baseline every method is compared with. With the
same config it prepares the same `input_ids` and trains the same tokens as `SFTTrainer` (TRL's `_prepare_dataset` does
the work), and adds: Alpaca rows, `assistant_only_loss=True` for chat templates without `{% generation %}` markers, the
instruction span for trainers that need it, per-example fields carried to `compute_loss`, clear errors for bad input
before any expensive work, `model=None` as the embedded default and `quantization="4bit"` as QLoRA.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import os
from typing import Any

from datasets import Dataset, IterableDataset
from transformers import PreTrainedModel
from trl import SFTConfig, SFTTrainer
from trl.data_utils import is_conversational
from trl.trainer.sft_trainer import DataCollatorForLanguageModeling
from trl.trainer.utils import global_then_local_main_first

from .config import RobustSFTConfig, apply_device_defaults  # noqa: F401 (the method configs import them from here)
from .data import (
    TOKEN_COLUMNS,
    DataFormatError,
    RobustDataCollator,
    column_names,
    require_chat_template,
)
from .modeling import is_quantized, load_model_and_tokenizer
from .preparation import DataPreparationMixin, _first_row, _load_datasets, check_output_dir
from .trl_internals import TRLLossMixin

logger = logging.getLogger(__name__)


class RobustSFTTrainer(TRLLossMixin, DataPreparationMixin, SFTTrainer):
    """[`~trl.SFTTrainer`] with TRL's own data preparation plus Alpaca rows, marker-free assistant-only loss, the
    instruction span and clear bad-input errors (plain SFT: the baseline of every method).

    Overrides of [`~trl.SFTTrainer`]: `__init__` (model loading, collator), `_prepare_dataset`,
    `_set_signature_columns_if_needed` and `compute_loss` (carried fields kept from the model).

    Args:
        model: A model, a hub id, a local folder, or `None` for the embedded SmolLM2-135M-Instruct. Ids and folders
            are loaded by [`load_model_and_tokenizer`] (QLoRA with `args.quantization`).
        train_dataset: A `Dataset`, an `IterableDataset`, a list of rows or a `.json`/`.jsonl`/`.csv`/`.tsv`/
            `.parquet` path, in any format TRL accepts or Alpaca (`instruction`/`input`/`output`).
        eval_dataset: The same, or a dict (or `DatasetDict`) of them, each evaluated under its name.

    Every other argument is that of [`~trl.SFTTrainer`].

    Subclass hooks: `_token_fields` / `_example_fields` name the per-token / per-example fields `compute_loss` needs
    (carried by [`RobustDataCollator`]; take them out with `_split_extras`); `instruction_mask` in `_token_fields`
    computes the instruction span; `_assistant_only_loss_default = True` trains conversational rows on assistant
    turns only even when `args.assistant_only_loss` is False (the method must say so in its config doc; it is logged
    once); `_instruction_transform`, `_keep_columns`, `_prepare_model` and `_log_metric` as documented below.
    """

    _tag_names = ["trl", "sft", "robust_sft"]
    _name = "Robust SFT"
    _paper: dict[str, str] = {}

    # Per-token and per-example fields that a subclass needs in `compute_loss`.
    _token_fields: tuple[str, ...] = ()
    _example_fields: tuple[str, ...] = ()
    # A method whose objective needs assistant-only loss sets this; the user's config is never rewritten.
    _assistant_only_loss_default: bool = False

    def __init__(
        self,
        model: str | os.PathLike | PreTrainedModel | None = None,
        args: SFTConfig | None = None,
        data_collator: Any | None = None,
        train_dataset: Dataset | IterableDataset | str | os.PathLike | list[dict[str, Any]] | None = None,
        eval_dataset: Dataset | IterableDataset | dict[str, Any] | str | os.PathLike | None = None,
        processing_class: Any | None = None,
        **kwargs: Any,
    ):
        args = args if args is not None else RobustSFTConfig(output_dir="robust-sft-output")
        if not isinstance(args, SFTConfig):  # plain TrainingArguments, converted as SFTTrainer does
            args = SFTConfig(**{**args.to_dict(), "hub_token": args.hub_token})
        # Everything that can be checked without the model is checked before it loads.
        check_output_dir(args.output_dir)
        formatting_func = kwargs.get("formatting_func")
        if train_dataset is None:
            raise ValueError("`train_dataset` is required.")
        # Loading and the Alpaca conversion write the datasets cache: the main process first, as TRL prepares.
        with global_then_local_main_first():
            train_dataset = self._check_and_convert(
                _load_datasets(train_dataset, "train_dataset"), args, formatting_func
            )
            if isinstance(eval_dataset, dict):  # a DatasetDict too: one eval set per name
                eval_dataset = {
                    name: self._check_and_convert(
                        _load_datasets(value, f"eval_dataset[{name!r}]"), args, formatting_func, name
                    )
                    for name, value in eval_dataset.items()
                }
            elif eval_dataset is not None:
                eval_dataset = self._check_and_convert(
                    _load_datasets(eval_dataset, "eval_dataset"), args, formatting_func, "eval"
                )
        self._check_fields(train_dataset, args, formatting_func)

        if model is None or isinstance(model, (str, os.PathLike)):
            model, tokenizer = self._load_model(model, args, kwargs.pop("quantization_config", None))
            processing_class = processing_class if processing_class is not None else tokenizer
        else:
            self._check_loaded_model(model, args)
        if processing_class is None:
            processing_class = self._default_processing_class(model, args)
        model = self._prepare_model(model, processing_class, args, kwargs)

        tokenizer = getattr(processing_class, "tokenizer", processing_class)
        sample = _first_row(train_dataset)
        if sample is not None and is_conversational(sample) and args.chat_template_path is None:
            require_chat_template(tokenizer)
        self._offset_assistant_masks = self._needs_offset_assistant_masks(args, processing_class, sample)
        # TRL refuses assistant_only_loss for templates without markers while it is constructed; here those rows
        # arrive tokenized with their assistant masks, so TRL must not see the flag then. Restored right after.
        hide_flag = self._offset_assistant_masks and args.assistant_only_loss
        if hide_flag:
            args.assistant_only_loss = False
        try:
            super().__init__(
                model=model,
                args=args,
                data_collator=data_collator,
                train_dataset=train_dataset,
                eval_dataset=eval_dataset,
                processing_class=processing_class,
                **kwargs,
            )
        finally:
            if hide_flag:
                args.assistant_only_loss = True
        self._install_collator(data_collator)

    # ----------------------------------------------------------------------------------------------- model
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

    @staticmethod
    def _check_loaded_model(model: Any, args: SFTConfig) -> None:
        """`quantization` cannot be applied to a model that is already loaded: refuse a mismatch instead of training
        in a precision the config does not say."""
        quantization = getattr(args, "quantization", None)
        if quantization is None:
            return
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        loaded = "4bit" if getattr(base, "is_loaded_in_4bit", False) else "8bit" if is_quantized(model) else None
        if loaded != quantization:
            raise ValueError(
                f"quantization={quantization!r} applies when the trainer loads the model (a hub id, a folder or "
                f"None), but an already-loaded {loaded or 'full-precision'} model was passed, which would train "
                f"unquantized. Pass the model's id or folder instead, or load it with "
                f"`load_model_and_tokenizer(path, quantization={quantization!r})`, or set quantization=None."
            )

    @staticmethod
    def _default_processing_class(model: Any, args: SFTConfig) -> Any:
        # As SFTTrainer does, but before construction: the data checks need the tokenizer.
        from transformers import AutoProcessor
        from trl.trainer.utils import get_config_model_id

        name = get_config_model_id(model.config)
        try:
            return AutoProcessor.from_pretrained(name, trust_remote_code=args.trust_remote_code)
        except OSError as error:
            raise ValueError(
                f"No `processing_class` was passed and the tokenizer of {name!r} cannot be loaded ({error}). Pass the "
                "tokenizer: `processing_class=tokenizer`."
            ) from None

    def _prepare_model(self, model: PreTrainedModel, processing_class: Any, args: SFTConfig, kwargs: dict[str, Any]):
        """Hook between loading and SFTTrainer's set-up (PEFT wrapping): change the model or `kwargs` (e.g. the
        `peft_config`) in place. Returns the model."""
        return model

    # ----------------------------------------------------------------------------------------------- collator
    def _install_collator(self, data_collator: Any | None) -> None:
        """Carry the per-example fields to `compute_loss`: TRL's collator (whatever pad token, padding-free or
        position-id settings it was built with) becomes a `RobustDataCollator`; a custom one is checked."""
        fields = self._token_fields + self._example_fields
        if not fields:
            return
        missing = [name for name in fields if name not in column_names(self.train_dataset)]
        if missing:
            raise DataFormatError(
                f"{type(self).__name__} needs the per-example column(s) {missing} in train_dataset, which has only "
                f"{column_names(self.train_dataset)}. Add them (e.g. `dataset.add_column('{missing[0]}', values)`)."
            )
        if data_collator is None and type(self.data_collator) is DataCollatorForLanguageModeling:
            settings = {
                item.name: getattr(self.data_collator, item.name) for item in dataclasses.fields(self.data_collator)
            }
            self.data_collator = RobustDataCollator(
                **settings, token_fields=self._token_fields, example_fields=self._example_fields
            )
            return
        self._set_signature_columns_if_needed()
        rows = list(itertools.islice(iter(self.train_dataset), 2))
        if self.args.remove_unused_columns:
            rows = [{key: value for key, value in row.items() if key in self._signature_columns} for row in rows]
        try:
            batch = self.data_collator(rows)
        except Exception as error:
            raise ValueError(
                f"The data_collator fails on the first training rows ({type(error).__name__}: {error}). "
                f"{type(self).__name__} passes it rows with {sorted(rows[0])}."
            ) from error
        missing = [name for name in fields if name not in batch]
        if missing:
            raise ValueError(
                f"The data_collator drops {missing}, which {type(self).__name__} needs in compute_loss. Use "
                f"`robust_sft.RobustDataCollator(pad_token_id=..., token_fields={self._token_fields}, "
                f"example_fields={self._example_fields})` (or a subclass), or return these keys from your collator."
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
