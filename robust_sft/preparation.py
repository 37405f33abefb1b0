"""Dataset preparation of the base trainer: TRL's own `_prepare_dataset`, plus what TRL lacks.

Checks (before the model loads), Alpaca conversion, assistant-only masks for templates without `{% generation %}`
markers, the instruction span for trainers that need it, and the report of rows TRL drops by truncation.
[`DataPreparationMixin`] is part of `RobustSFTTrainer`.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from datasets import Dataset, DatasetDict, IterableDataset, IterableDatasetDict
from trl import SFTConfig
from trl.chat_template_utils import get_training_chat_template
from trl.data_utils import is_conversational, maybe_convert_to_chatml
from trl.trainer.utils import global_then_local_main_first

from .data import (
    DataFormatError,
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

logger = logging.getLogger(__name__)


# Rows of an `IterableDataset` checked up front (a stream is not read to the end before training).
STREAM_CHECK_ROWS = 100


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


def _dataset_key(dataset: Any) -> Any:
    """What identifies a dataset's rows: a `Dataset`'s fingerprint (changed by every map, filter or new column), else
    the object itself (a stream)."""
    fingerprint = getattr(dataset, "_fingerprint", None) if isinstance(dataset, Dataset) else None
    return ("fingerprint", fingerprint) if fingerprint is not None else ("object", id(dataset))


def _first_row(dataset: Dataset | IterableDataset | None) -> dict[str, Any] | None:
    return None if dataset is None else next(iter(dataset), None)


class DataPreparationMixin:
    """The data side of `RobustSFTTrainer` (see the module docstring); its `_prepare_dataset` wraps TRL's."""

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
        self._check_rows_once(dataset, data_format, args, self._example_fields, dataset_name)
        if data_format == "alpaca":
            dataset = alpaca_to_conversational(dataset)
            self._remember_checked(dataset, self._example_fields)  # valid by construction from checked rows
        return dataset

    def _check_rows_once(
        self, dataset: Any, data_format: str, args: SFTConfig, example_fields: tuple[str, ...], dataset_name: str
    ) -> None:
        """`check_rows` (a Python loop over every row), skipped for a dataset already checked for these fields: the
        rows checked in `__init__` reach `_prepare_dataset` unchanged, and a dataset passed later (e.g. to
        `evaluate`) has another fingerprint, so it is checked."""
        checked = getattr(self, "_checked_datasets", {}).get(_dataset_key(dataset))
        if checked is not None and set(example_fields) <= checked[1]:
            return
        check_rows(
            dataset,
            data_format,
            dataset_name=dataset_name,
            text_field=args.dataset_text_field,
            example_fields=example_fields,
            limit=None if isinstance(dataset, Dataset) else STREAM_CHECK_ROWS,
        )
        self._remember_checked(dataset, example_fields)

    def _remember_checked(self, dataset: Any, example_fields: tuple[str, ...]) -> None:
        if not hasattr(self, "_checked_datasets"):
            self._checked_datasets: dict[Any, tuple[Any, frozenset[str]]] = {}
        # The dataset is kept with its key, so an `id` key is never reused by another object.
        self._checked_datasets[_dataset_key(dataset)] = (dataset, frozenset(example_fields))

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
        self._check_rows_once(dataset, data_format, args, self._keep_columns(dataset, dataset_name), dataset_name)
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
        return DataPreparationMixin._prepare_dataset(self, dataset, processing_class, args, False, None, description)
