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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset, DatasetDict, IterableDataset, IterableDatasetDict
from transformers import PreTrainedModel
from trl import SFTConfig, SFTTrainer
from trl.chat_template_utils import get_training_chat_template
from trl.data_utils import is_conversational, maybe_convert_to_chatml
from trl.trainer.sft_trainer import DataCollatorForLanguageModeling
from trl.trainer.utils import global_then_local_main_first

from .data import (
    TOKEN_COLUMNS,
    DataFormatError,
    RobustDataCollator,
    alpaca_to_conversational,
    apply_instruction_transform,
    assistant_token_masks,
    check_rows,
    column_names,
    detect_format,
    instruction_token_mask,
    load_examples,
    require_chat_template,
)
from .modeling import is_quantized, load_model_and_tokenizer
from .trl_internals import TRLLossMixin

logger = logging.getLogger(__name__)

# Rows of an `IterableDataset` checked up front (a stream is not read to the end before training).
STREAM_CHECK_ROWS = 100


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


def check_output_dir(output_dir: str | os.PathLike | None) -> None:
    """Raise before any expensive work when `output_dir` cannot be created or written."""
    if not output_dir:
        return
    path = Path(output_dir).expanduser().absolute()
    if path.exists() and not path.is_dir():
        raise NotADirectoryError(f"output_dir {str(path)!r} is a file, not a folder. Pick a folder for checkpoints.")
    existing = path
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise NotADirectoryError(
            f"output_dir {str(path)!r} cannot be created: {str(existing)!r} is a file, not a folder. Pick another "
            "output_dir."
        )
    if not os.access(existing, os.W_OK | os.X_OK):
        raise PermissionError(
            f"output_dir {str(path)!r} is not writable ({str(existing)!r} does not let this user write). Training "
            "would fail at the first checkpoint; pick a folder you can write to."
        )


def _load_datasets(source: Any, argument: str) -> Any:
    """Paths and lists of rows -> `Dataset`; Dataset / IterableDataset pass through; a `DatasetDict` is refused."""
    if source is None or isinstance(source, (Dataset, IterableDataset)):
        return source
    if isinstance(source, (DatasetDict, IterableDatasetDict)):
        raise TypeError(
            f"`{argument}` is a DatasetDict with splits {list(source)}; pass one split, e.g. "
            f"`{argument}=dataset['{next(iter(source), 'train')}']`."
        )
    if isinstance(source, (str, os.PathLike, list, tuple)):
        return load_examples(source)
    raise TypeError(
        f"`{argument}` must be a Dataset, an IterableDataset, a list of rows or a data file path, got "
        f"{type(source).__name__}."
    )


def _first_row(dataset: Dataset | IterableDataset | None) -> dict[str, Any] | None:
    return None if dataset is None else next(iter(dataset), None)


@dataclass
class RobustSFTConfig(SFTConfig):
    r"""
    Configuration for [`RobustSFTTrainer`] and the base of every robust_sft config.

    Differences from [`~trl.SFTConfig`]:

    - `bf16` defaults to `True` only where the hardware supports it (so the config works on CPU as is).
    - `use_cpu` is set when the machine has no accelerator, so that several CPU processes (`torchrun` or
      `accelerate launch --multi_gpu --num_processes 2` on a CPU-only machine) train with DDP over gloo.
    - Data preparation is TRL's, so the trained tokens are those of `SFTTrainer` with the same config (`text` rows
      get EOS, `messages` rows train the whole sequence unless `assistant_only_loss=True`, prompt/completion rows
      train the completion). On top: Alpaca rows, and `assistant_only_loss=True` also works for chat templates
      without `{% generation %}` markers (assistant turns located from character offsets).
    - `quantization` loads the model quantized when the trainer loads it; an already-loaded model in another
      precision is refused.

    Parameters:
        quantization (`str` or `None`, *optional*, defaults to `None`):
            When the trainer loads the model itself (`model` is a hub id, a folder or `None`): `"4bit"` for QLoRA
            (NF4, double quantization) or `"8bit"`; needs bitsandbytes. With an already-loaded model it must match
            how that model was loaded (else a `ValueError`).
    """

    quantization: str | None = field(
        default=None,
        metadata={
            "help": "When the trainer loads the model itself: '4bit' (QLoRA, NF4 + double quantization) or '8bit'; "
            "needs bitsandbytes. An already-loaded model must have been loaded that way.",
            "choices": [None, "4bit", "8bit"],
        },
    )

    def __post_init__(self):
        apply_device_defaults(self)
        if self.quantization not in (None, "4bit", "8bit"):
            raise ValueError(f"quantization must be None, '4bit' or '8bit', got {self.quantization!r}.")
        super().__post_init__()


class RobustSFTTrainer(TRLLossMixin, SFTTrainer):
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
        train_dataset = self._check_and_convert(_load_datasets(train_dataset, "train_dataset"), args, formatting_func)
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

    # ----------------------------------------------------------------------------------------------- checks
    def _check_and_convert(
        self, dataset: Any, args: SFTConfig, formatting_func: Any, dataset_name: str = "train"
    ) -> Any:
        """Check raw rows (clear errors before the model loads) and turn Alpaca rows into the conversational
        prompt/completion rows TRL prepares, so TRL's format-dependent choices (completion-only loss) see them."""
        if dataset is None or (isinstance(dataset, Dataset) and dataset.format["type"] == "custom"):
            return dataset  # TRL explains why it cannot prepare a with_transform dataset
        columns = column_names(dataset)
        if "input_ids" in columns:
            return dataset  # already tokenized: TRL's path
        if formatting_func is not None:
            self._check_formatting_func(dataset, formatting_func, dataset_name)
            return dataset
        data_format = detect_format(columns, args.dataset_text_field)
        check_rows(
            dataset,
            data_format,
            dataset_name=dataset_name,
            text_field=args.dataset_text_field,
            example_fields=self._example_fields,
            limit=None if isinstance(dataset, Dataset) else STREAM_CHECK_ROWS,
        )
        if data_format == "alpaca":
            dataset = alpaca_to_conversational(dataset)
        return dataset

    @staticmethod
    def _check_formatting_func(dataset: Any, formatting_func: Any, dataset_name: str) -> None:
        first = _first_row(dataset)
        if first is None:
            raise DataFormatError(f"The {dataset_name} dataset is empty: there is nothing to train or evaluate on.")
        value = formatting_func(first)
        if not isinstance(value, str):
            raise DataFormatError(
                f"formatting_func must return one text per row (str), got {type(value).__name__} for the first row "
                f"of the {dataset_name} dataset. TRL >= 0.20 calls it row by row, not on batches."
            )

    def _check_fields(self, train_dataset: Any, args: SFTConfig, formatting_func: Any) -> None:
        fields = self._token_fields + self._example_fields
        if args.assistant_only_loss and formatting_func is None and not is_conversational(_first_row(train_dataset)):
            raise DataFormatError(
                "assistant_only_loss=True needs conversational rows (`messages`, chat `prompt`/`completion` or Alpaca "
                "rows), but the train rows are text. Set assistant_only_loss=False; for text `prompt`/`completion` "
                "rows completion_only_loss already trains the completion only."
            )
        if not fields:
            return
        eval_packing = args.packing if args.eval_packing is None else args.eval_packing
        if args.padding_free or args.packing or eval_packing:
            raise ValueError(
                f"{type(self).__name__} carries per-example fields {fields} to the loss, which packing and "
                "padding-free batches cannot keep. Set packing=False and padding_free=False."
            )

    def _needs_offset_assistant_masks(self, args: SFTConfig, processing_class: Any, sample: Any) -> bool:
        """Whether conversational rows get their assistant masks here (from offsets) instead of from TRL."""
        if sample is None or not is_conversational(sample):
            return False
        if args.assistant_only_loss:
            if args.chat_template_path is not None:
                return False  # TRL sets the template first; it decides
            try:
                get_training_chat_template(processing_class)  # TRL handles markers and the templates it can patch
            except ValueError:
                return True
            return False
        if self._assistant_only_loss_default:
            logger.warning(
                "%s trains conversational rows on their assistant turns only (the method's default, whatever "
                "`assistant_only_loss` says).",
                type(self).__name__,
            )
            return True
        return False

    # ----------------------------------------------------------------------------------------------- data
    def _keep_columns(self, dataset: Dataset, dataset_name: str) -> tuple[str, ...]:
        """Raw columns that must reach the collator (the per-example fields the loss needs). TRL keeps every raw
        column through preparation; these are also checked for `None` values."""
        return tuple(name for name in self._example_fields if name in column_names(dataset))

    def _instruction_transform(self, dataset: Dataset, dataset_name: str):
        """A function `f(instruction, row_index) -> instruction` applied before tokenization, or None."""
        return None

    def _prepare_dataset(self, dataset, processing_class, args, packing, formatting_func, dataset_name):
        columns = column_names(dataset)
        if "input_ids" in columns or (isinstance(dataset, Dataset) and dataset.format["type"] == "custom"):
            return super()._prepare_dataset(dataset, processing_class, args, packing, formatting_func, dataset_name)
        tokenizer = getattr(processing_class, "tokenizer", processing_class)
        with global_then_local_main_first():
            dataset, data_format = self._before_trl(dataset, tokenizer, args, formatting_func, dataset_name)
        rows = len(dataset) if isinstance(dataset, Dataset) else None
        dataset = super()._prepare_dataset(dataset, processing_class, args, packing, formatting_func, dataset_name)
        if rows is not None and not packing:
            self._report_dropped_rows(rows, len(dataset), args, dataset_name)
        if "instruction_mask" in self._token_fields:
            with global_then_local_main_first():
                dataset = self._add_instruction_mask(dataset, tokenizer, args, data_format, dataset_name)
        return dataset

    def _before_trl(self, dataset, tokenizer, args, formatting_func, dataset_name):
        """What TRL lacks, on raw rows: checks, Alpaca conversion, the instruction transform, offset masks."""
        if formatting_func is not None:
            self._check_formatting_func(dataset, formatting_func, dataset_name)
            return dataset, "text"
        is_dataset = isinstance(dataset, Dataset)
        data_format = detect_format(column_names(dataset), args.dataset_text_field)
        check_rows(
            dataset,
            data_format,
            dataset_name=dataset_name,
            text_field=args.dataset_text_field,
            example_fields=self._keep_columns(dataset, dataset_name),
            limit=None if is_dataset else STREAM_CHECK_ROWS,
        )
        if data_format == "alpaca":
            dataset, data_format = alpaca_to_conversational(dataset), "prompt_completion"
        conversational = is_conversational(_first_row(dataset))
        if conversational:
            require_chat_template(tokenizer, {"chat_template": getattr(self, "chat_template", None)})
        map_kwargs = {"num_proc": args.dataset_num_proc} if is_dataset else {}
        if "conversations" in column_names(dataset):  # ShareGPT, converted as TRL would
            dataset = dataset.map(maybe_convert_to_chatml, remove_columns="conversations", **map_kwargs)
        transform = self._instruction_transform(dataset, dataset_name) if data_format != "text" else None
        if transform is not None:
            desc = {"desc": f"Applying the instruction transform to the {dataset_name} dataset"} if is_dataset else {}
            dataset = dataset.map(
                apply_instruction_transform,
                with_indices=True,
                fn_kwargs={"transform": transform, "data_format": data_format},
                **map_kwargs,
                **desc,
            )
        if self._offset_assistant_masks and conversational:
            desc = {"desc": f"Masking assistant turns of the {dataset_name} dataset"} if is_dataset else {}

            def masks(row: dict[str, Any], index: int) -> dict[str, list[int]]:
                return assistant_token_masks(row, tokenizer, data_format, index)

            dataset = dataset.map(masks, with_indices=True, **map_kwargs, **desc)
        return dataset, data_format

    def _add_instruction_mask(self, dataset, tokenizer, args, data_format, dataset_name):
        is_dataset = isinstance(dataset, Dataset)
        options = {"num_proc": args.dataset_num_proc, "desc": f"Locating instructions in the {dataset_name} dataset"}

        def mask(row: dict[str, Any], index: int) -> dict[str, list[int]]:
            return {
                "instruction_mask": instruction_token_mask(
                    row,
                    tokenizer,
                    data_format,
                    truncation_mode=args.truncation_mode,
                    chat_template=getattr(self, "chat_template", None),
                    index=index,
                )
            }

        return dataset.map(mask, with_indices=True, **(options if is_dataset else {}))

    @staticmethod
    def _report_dropped_rows(before: int, after: int, args: SFTConfig, dataset_name: str) -> None:
        """TRL drops the rows that truncation leaves without a trained token: fail when that is every row, else say
        how many."""
        if after == before:
            return
        fix = (
            f"Raise max_length (now {args.max_length}), shorten the prompts, or use truncation_mode='keep_end' "
            f"(now {args.truncation_mode!r})."
        )
        if after == 0:
            raise DataFormatError(
                f"Every row of the {dataset_name} dataset ({before}) has no trained token left once cut to "
                f"max_length={args.max_length}: the prompts alone fill it. {fix}"
            )
        logger.warning(
            "%d of %d rows of the %s dataset were dropped: cut to max_length=%s they have no trained token left. %s",
            before - after,
            before,
            dataset_name,
            args.max_length,
            fix,
        )

    def _tokenize(self, dataset: Dataset, processing_class: Any, args: SFTConfig, description: str) -> Dataset:
        """Raw rows -> `input_ids` and `labels` exactly as this trainer prepares its train rows (TRL's preparation,
        without packing), e.g. for extra rows a method mixes in before the final preparation."""
        return RobustSFTTrainer._prepare_dataset(self, dataset, processing_class, args, False, None, description)

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
