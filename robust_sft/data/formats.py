"""Row formats: detection, the per-row view (`Example`), loading files, Alpaca conversion and the row checks."""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from datasets import Dataset, IterableDataset, load_dataset

FORMATS = ("messages", "prompt_completion", "alpaca", "text")


# Alpaca rows become conversational prompt/completion rows; this column keeps the instruction (without its `input`).
INSTRUCTION_COLUMN = "robust_sft_instruction"


ALPACA_COLUMNS = ("instruction", "input", "output")


class DataFormatError(ValueError):
    """A dataset or a row that the data layer cannot use; the message names the row and the fix."""


def detect_format(column_names: Iterable[str], dataset_text_field: str = "text") -> str:
    """Name the format of a dataset from its columns: one of `FORMATS` (`text` is `dataset_text_field`)."""
    columns = set(column_names)
    if "messages" in columns or "conversations" in columns:
        return "messages"
    if {"prompt", "completion"} <= columns:
        return "prompt_completion"
    if {"instruction", "output"} <= columns:
        return "alpaca"
    if dataset_text_field in columns:
        return "text"
    text = "`text`" if dataset_text_field == "text" else f"`{dataset_text_field}` (your `dataset_text_field`)"
    raise DataFormatError(
        f"Cannot tell the data format from the columns {sorted(columns)}. Expected one of: `messages` (chat turns), "
        f"`prompt` + `completion`, `instruction` + `output` (+ `input`, the Alpaca layout), or {text}. Rename your "
        "columns (e.g. `dataset.rename_column('question', 'instruction')`), set `dataset_text_field`, or pass a "
        "`formatting_func`."
    )


@dataclass
class Example:
    """One example in the internal form.

    Chat examples have `messages` (the whole conversation, ending with an assistant turn) and
    `instruction_turn`, the index of the user turn that carries the instruction; `instruction` is the instruction
    text inside that turn (for Alpaca rows the instruction without its `input`). Text examples (`messages is None`)
    have `prompt` and `completion` strings; `instruction` is then the prompt.
    """

    messages: list[dict[str, str]] | None = None
    instruction_turn: int | None = None
    prompt: str = ""
    completion: str = ""
    instruction: str = ""
    train_on_prompt: bool = False  # `text` rows: every token trains

    def with_instruction(self, new_instruction: str) -> Example:
        """A copy whose instruction text is replaced (the rest of its turn is kept), e.g. by a noise operator."""
        if self.messages is None:
            return Example(prompt=new_instruction, completion=self.completion, instruction=new_instruction)
        messages = [dict(turn) for turn in self.messages]
        turn = messages[self.instruction_turn]
        start = turn["content"].find(self.instruction)
        turn["content"] = turn["content"][:start] + new_instruction + turn["content"][start + len(self.instruction) :]
        return Example(messages=messages, instruction_turn=self.instruction_turn, instruction=new_instruction)


def _row_error(index: int | None, problem: str, fix: str) -> DataFormatError:
    where = f"Row {index}" if index is not None else "A row"
    return DataFormatError(f"{where}: {problem.rstrip('.')}. {fix}".rstrip())


def _require_text(row: dict[str, Any], key: str, index: int | None, allow_empty: bool = False) -> str:
    value = row.get(key)
    if value is not None and not isinstance(value, str):
        raise _row_error(
            index,
            f"field `{key}` must be text, got {type(value).__name__} ({value!r})",
            f"Convert it, e.g. `dataset.map(lambda row: {{'{key}': str(row['{key}'])}})`.",
        )
    if value is None or (not allow_empty and not value.strip()):
        raise _row_error(
            index, f"field `{key}` is missing or empty (got {value!r})", f"Give every row a `{key}` text."
        )
    return value


def _check_messages(messages: Any, index: int | None, key: str) -> list[dict[str, str]]:
    if not isinstance(messages, list) or not messages:
        raise _row_error(index, f"`{key}` must be a non-empty list of turns, got {messages!r}", "Fix or drop the row.")
    turns = []
    for turn in messages:
        if not isinstance(turn, dict):
            raise _row_error(index, f"a turn of `{key}` is {turn!r}, not a dict", "Use {'role': ..., 'content': ...}.")
        if "from" in turn and "value" in turn:  # ShareGPT
            turn = {
                "role": {"human": "user", "gpt": "assistant"}.get(turn["from"], turn["from"]),
                "content": turn["value"],
            }
        if not isinstance(turn.get("role"), str) or not isinstance(turn.get("content"), str):
            content = turn.get("content")
            got = f", got {type(content).__name__}" if content is not None and not isinstance(content, str) else ""
            raise _row_error(
                index,
                f"a turn of `{key}` lacks a text `role` or a text `content`{got}: {turn!r}",
                "Every turn needs {'role': str, 'content': str}.",
            )
        turns.append(dict(turn))  # every key (`tool_calls`, `name`...): the template may render them
    return turns


def _last_user_turn(messages: list[dict[str, str]], before: int) -> int | None:
    for position in range(before - 1, -1, -1):
        if messages[position]["role"] == "user":
            return position
    return None


def to_example(row: dict[str, Any], data_format: str, index: int | None = None, text_field: str = "text") -> Example:
    """Convert one raw row of a known format into the internal `Example`; bad rows raise `DataFormatError`."""
    if data_format == "messages":
        key = "messages" if row.get("messages") is not None else "conversations"
        messages = _check_messages(row.get(key), index, key)
        if messages[-1]["role"] != "assistant":
            raise _row_error(
                index,
                "the conversation does not end with an assistant turn",
                "End it with the answer to train on (drop the trailing turns), or drop the row.",
            )
        turn = _last_user_turn(messages, len(messages) - 1)
        return Example(
            messages=messages, instruction_turn=turn, instruction=messages[turn]["content"] if turn is not None else ""
        )
    if data_format == "prompt_completion":
        prompt, completion = row.get("prompt"), row.get("completion")
        if isinstance(prompt, list) or isinstance(completion, list):
            prompt = _check_messages(prompt, index, "prompt")
            completion = _check_messages(completion, index, "completion")
            messages = prompt + completion
            if messages[-1]["role"] != "assistant":
                raise _row_error(index, "`completion` does not end with an assistant turn", "Fix the row.")
            turn = _last_user_turn(messages, len(prompt))
            instruction = messages[turn]["content"] if turn is not None else ""
            carried = row.get(INSTRUCTION_COLUMN)  # an Alpaca row: the instruction without its `input`
            if isinstance(carried, str) and carried and carried in instruction:
                instruction = carried
            return Example(messages=messages, instruction_turn=turn, instruction=instruction)
        prompt = _require_text(row, "prompt", index)
        completion = _require_text(row, "completion", index)
        return Example(prompt=prompt, completion=completion, instruction=prompt)
    if data_format == "alpaca":
        instruction = _require_text(row, "instruction", index)
        output = _require_text(row, "output", index)
        extra_input = row.get("input") or ""
        if not isinstance(extra_input, str):
            raise _row_error(
                index,
                f"field `input` must be text, got {type(extra_input).__name__} ({extra_input!r})",
                "Use an empty string for none.",
            )
        content = instruction + ("\n\n" + extra_input if extra_input.strip() else "")
        messages = [{"role": "user", "content": content}, {"role": "assistant", "content": output}]
        return Example(messages=messages, instruction_turn=0, instruction=instruction)
    if data_format == "text":
        return Example(prompt=_require_text(row, text_field, index), train_on_prompt=True)
    raise ValueError(f"Unknown data format {data_format!r}; expected one of {FORMATS}.")


def load_examples(source: str | Path | Dataset | Sequence[dict[str, Any]], split: str = "train") -> Dataset:
    """A `Dataset` from a Dataset, a list of rows, or a `.json`/`.jsonl`/`.csv`/`.tsv`/`.parquet` file."""
    if isinstance(source, Dataset):
        return source
    if isinstance(source, (list, tuple)):
        return Dataset.from_list(list(source))
    path = Path(source)
    if not path.is_file():
        raise FileNotFoundError(f"Data file {path} does not exist.")
    suffix = path.suffix.lower()
    if suffix in (".json", ".jsonl"):
        return load_dataset("json", data_files=str(path), split=split)
    if suffix in (".csv", ".tsv"):
        return load_dataset("csv", data_files=str(path), split=split, delimiter="\t" if suffix == ".tsv" else ",")
    if suffix == ".parquet":
        return load_dataset("parquet", data_files=str(path), split=split)
    raise ValueError(f"Unsupported data file type {suffix!r} for {path}: use .json, .jsonl, .csv, .tsv or .parquet.")


def column_names(dataset: Dataset | IterableDataset) -> list[str]:
    """A dataset's columns; an `IterableDataset` without known features is read from its first row."""
    if dataset.column_names is not None:
        return list(dataset.column_names)
    first = next(iter(dataset), None)
    return list(first) if first is not None else []


def _alpaca_row(row: dict[str, Any]) -> dict[str, Any]:
    example = to_example(row, "alpaca")
    user, assistant = example.messages
    return {"prompt": [user], "completion": [assistant], INSTRUCTION_COLUMN: example.instruction}


def alpaca_to_conversational(dataset: Dataset | IterableDataset) -> Dataset | IterableDataset:
    """Alpaca rows -> conversational `prompt` (one user turn: instruction, a blank line, input) and `completion` (one
    assistant turn: output), which TRL prepares itself; the instruction alone is kept in `INSTRUCTION_COLUMN`."""
    columns = column_names(dataset)
    options = {"desc": "Converting Alpaca rows to prompt/completion"} if isinstance(dataset, Dataset) else {}
    remove = [name for name in ALPACA_COLUMNS if name in columns]
    return dataset.map(_alpaca_row, remove_columns=remove, **options)


def _check_turn_order(messages: list[dict[str, Any]], index: int | None) -> None:
    first = next((turn for turn in messages if turn["role"] != "system"), None)
    if first is not None and first["role"] == "assistant":
        raise _row_error(
            index,
            "the conversation starts with an assistant turn (nothing prompts it)",
            "Add the user turn it answers, or drop the row.",
        )


def check_rows(
    dataset: Dataset | IterableDataset,
    data_format: str,
    *,
    dataset_name: str = "train",
    text_field: str = "text",
    example_fields: Sequence[str] = (),
    limit: int | None = None,
) -> None:
    """Raise a `DataFormatError` naming the dataset, the row and the fix for the first row that cannot train.

    Checks every row of a `Dataset` (the first `limit` rows of an `IterableDataset`): an empty dataset, text fields
    that are missing or not text, conversations that do not start with a user turn or do not end with an assistant
    turn, malformed `tools` / `chat_template_kwargs`, and `None` in a per-example field the trainer carries.
    """
    rows = dataset if limit is None else itertools.islice(dataset, limit)
    count = 0
    try:
        for index, row in enumerate(rows):
            count += 1
            example = to_example(row, data_format, index, text_field)
            if example.messages is not None:
                _check_turn_order(example.messages, index)
                chat_template_options(row, None, index)
            for name in example_fields:
                if name in row and row[name] is None:
                    raise _row_error(
                        index,
                        f"the per-example field `{name}` is None",
                        f"Give every row a `{name}` value (or drop the rows without one).",
                    )
    except DataFormatError as error:
        raise DataFormatError(f"{dataset_name} dataset: {error}") from None
    if count == 0:
        raise DataFormatError(f"The {dataset_name} dataset is empty: there is nothing to train or evaluate on.")


def chat_template_options(
    row: dict[str, Any], chat_template: str | None = None, index: int | None = None
) -> dict[str, Any]:
    """The keyword arguments TRL passes to `apply_chat_template` for a row: its `tools` (a list or JSON text), its
    `chat_template_kwargs`, and the trainer's training template (None: the tokenizer's own)."""
    tools = row.get("tools")
    if isinstance(tools, str):
        try:
            tools = json.loads(tools)
        except json.JSONDecodeError as error:
            raise _row_error(index, f"`tools` is text but not JSON ({error})", "Give a list of schemas.") from None
    if tools is not None and not isinstance(tools, list):
        raise _row_error(index, f"`tools` must be a list of tool schemas, got {type(tools).__name__}", "Fix it.")
    extra = row.get("chat_template_kwargs", {})
    if not isinstance(extra, dict):
        raise _row_error(
            index,
            f"`chat_template_kwargs` must be a dict, got {type(extra).__name__} ({extra!r})",
            "Use {} for none (TRL unpacks it into `apply_chat_template`).",
        )
    return {"chat_template": chat_template, "tools": tools, **extra}
