"""The shared data layer: what TRL's own `SFTTrainer._prepare_dataset` lacks, plus the row checks and the collator.

`RobustSFTTrainer` lets TRL prepare every format TRL knows (`text` / `dataset_text_field`, `prompt` + `completion` as
text or chat, `messages`, ShareGPT `conversations`, `tools`, `chat_template_kwargs`, packing, truncation), so its
`input_ids` and labels are TRL's, token for token. This module adds only:

- Alpaca rows (`instruction` + `output`, optional `input`), converted to conversational `prompt`/`completion` rows
  (`alpaca_to_conversational`) before TRL sees them;
- assistant-only loss for chat templates without `{% generation %}` markers, which TRL refuses: the assistant turns are
  located as character spans of the rendered conversation and mapped onto tokens with the fast tokenizer's offsets
  (`assistant_token_masks`);
- the instruction span (`instruction_mask`, per token) for trainers that need it (`instruction_token_mask`);
- clear errors for rows TRL would fail on deep inside its preparation (`check_rows`).

`prepare_dataset` is the standalone, offset-based tokenizer (completion/assistant tokens trained, instruction span
marked) used to score answers in evaluation; training goes through TRL.

Formats (detected from the column names, `detect_format`):

- `messages`: a list of `{"role", "content"}` turns (ShareGPT `conversations` with `from`/`value` is converted);
- `prompt` + `completion`: both text, or both lists of messages;
- `instruction` + `output` (+ optional `input`): the Alpaca layout, rendered as one user turn and one assistant turn;
- `text` (or the config's `dataset_text_field`): plain language modelling.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset, IterableDataset, load_dataset
from transformers import PreTrainedTokenizerBase
from trl.data_utils import common_prefix_length
from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

FORMATS = ("messages", "prompt_completion", "alpaca", "text")
TOKEN_COLUMNS = ("input_ids", "labels", "instruction_mask")
# Alpaca rows become conversational prompt/completion rows; this column keeps the instruction (without its `input`).
INSTRUCTION_COLUMN = "robust_sft_instruction"
ALPACA_COLUMNS = ("instruction", "input", "output")
InstructionTransform = Callable[[str, int], str]


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


@dataclass
class RenderedExample:
    """The text to tokenize and the character spans that matter in it."""

    text: str
    completion_spans: list[tuple[int, int]] = field(default_factory=list)
    instruction_span: tuple[int, int] | None = None
    add_special_tokens: bool = False
    train_everything: bool = False


def _render(
    tokenizer: PreTrainedTokenizerBase,
    messages: list[dict[str, str]],
    add_generation_prompt: bool,
    template_options: dict[str, Any] | None = None,
) -> str:
    return tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt, **(template_options or {})
    )


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


def render_example(
    example: Example, tokenizer: PreTrainedTokenizerBase, template_options: dict[str, Any] | None = None
) -> RenderedExample:
    """Render an example with the tokenizer's chat template (chat) or as prompt + completion + EOS (text).

    `template_options` are extra `apply_chat_template` arguments (`tools`, `chat_template`, a row's
    `chat_template_kwargs`; see `chat_template_options`).
    """
    if example.messages is None:
        completion = example.completion
        if completion and tokenizer.eos_token and not completion.endswith(tokenizer.eos_token):
            completion += tokenizer.eos_token  # as TRL does for non-conversational data
        text = example.prompt + completion
        span = (0, len(example.prompt)) if example.instruction else None
        return RenderedExample(
            text=text,
            completion_spans=[(len(example.prompt), len(text))],
            instruction_span=span,
            add_special_tokens=True,
            train_everything=example.train_on_prompt,
        )
    require_chat_template(tokenizer, template_options)
    messages = example.messages
    text = _render(tokenizer, messages, False, template_options)
    spans = []
    for position, turn in enumerate(messages):
        if turn["role"] != "assistant":
            continue
        start = len(_check_prefix(_render(tokenizer, messages[:position], True, template_options), text))
        # The turn ends at most where its own rendering leaves the whole conversation's: some templates (Phi-3)
        # close a conversation rendered without a generation prompt with EOS, which the next turn replaces. That
        # point may fall inside the next turn's first token ("<|" of both); `_span_token_mask` keeps whole tokens.
        end = _common_prefix(_render(tokenizer, messages[: position + 1], False, template_options), text)
        if turn["content"].strip() and turn["content"].strip() not in text[start:end]:
            raise DataFormatError(
                "The chat template does not render an assistant turn's text where the turn starts (it rewrites "
                "earlier turns or drops the assistant text), so the assistant tokens cannot be located. Use a "
                "template with `{% generation %}` markers, or prompt/completion rows."
            )
        spans.append((start, end))
    instruction_span = None
    if example.instruction_turn is not None and example.instruction:
        instruction_span = _locate_instruction(
            tokenizer, messages, example.instruction_turn, example.instruction, text, template_options
        )
    return RenderedExample(text=text, completion_spans=spans, instruction_span=instruction_span)


def require_chat_template(tokenizer: PreTrainedTokenizerBase, template_options: dict[str, Any] | None = None) -> None:
    """Raise a `DataFormatError` naming the fix when conversational rows meet a tokenizer without a chat template."""
    if (template_options or {}).get("chat_template") or getattr(tokenizer, "chat_template", None):
        return
    raise DataFormatError(
        "The data is conversational (messages, chat prompt/completion or Alpaca rows) but the tokenizer has no chat "
        "template. Set one (`load_model_and_tokenizer(..., chat_template='chatml')`, `tokenizer.chat_template = ...` "
        "or `SFTConfig(chat_template_path=...)`), or give `prompt`/`completion` text rows instead."
    )


def _common_prefix(first: str, second: str) -> int:
    length = 0
    for a, b in zip(first, second):
        if a != b:
            break
        length += 1
    return length


def _check_prefix(prefix: str, text: str) -> str:
    if not text.startswith(prefix):
        raise DataFormatError(
            "The chat template renders a conversation's beginning differently from the whole conversation (it "
            "rewrites earlier turns), so the assistant turns and the instruction cannot be located. Keep only the "
            "last assistant turn (prompt/completion rows), or use a template whose rendering of a prefix is a prefix "
            "(for assistant-only loss: one with `{% generation %}` markers, which TRL handles itself)."
        )
    return prefix


def _locate_instruction(
    tokenizer: PreTrainedTokenizerBase,
    messages: list[dict[str, str]],
    turn: int,
    instruction: str,
    text: str,
    template_options: dict[str, Any] | None = None,
) -> tuple[int, int]:
    upto = text[: _common_prefix(_render(tokenizer, messages[: turn + 1], False, template_options), text)]
    content = messages[turn]["content"]
    # The turn's content is the last copy of it in the prefix that ends with that turn; some templates trim it.
    for shown, wanted in ((content, instruction), (content.strip(), instruction.strip())):
        content_at, offset = upto.rfind(shown), shown.find(wanted)
        if content_at >= 0 and offset >= 0:
            return content_at + offset, content_at + offset + len(wanted)
    raise DataFormatError(
        "The chat template changes the text of the instruction turn (beyond trimming), or renders it differently "
        "once later turns follow, so the instruction cannot be located in the rendered prompt."
    )


def _token_mask(offsets: Sequence[tuple[int, int]], spans: Sequence[tuple[int, int]]) -> list[int]:
    # A token belongs to a span when their characters overlap; zero-width tokens (auto-added BOS/EOS) to none.
    return [int(any(end > s and start < e for s, e in spans)) if end > start else 0 for start, end in offsets]


def _span_token_mask(offsets: Sequence[tuple[int, int]], spans: Sequence[tuple[int, int]], text: str) -> list[int]:
    """Assistant turns -> tokens: from the token holding the turn's first character to the last token that ends
    inside the turn, without trailing whitespace tokens (the newline after an end-of-turn token does not train)."""
    mask = [0] * len(offsets)
    for span_start, span_end in spans:
        inside = [
            index
            for index, (start, end) in enumerate(offsets)
            if end > start and end > span_start and start < span_end and end <= span_end
        ]
        while inside and not text[offsets[inside[-1]][0] : offsets[inside[-1]][1]].strip():
            inside.pop()
        for index in inside:
            mask[index] = 1
    return mask


def tokenize_example(
    rendered: RenderedExample,
    tokenizer: PreTrainedTokenizerBase,
    max_length: int | None = None,
    truncation_mode: str = "keep_start",
    completion_only_loss: bool = True,
) -> dict[str, list[int]]:
    """Tokenize a rendered example into `input_ids`, `labels` (-100 outside the completion) and `instruction_mask`."""
    if not tokenizer.is_fast:
        raise ValueError(
            f"The data layer needs a fast tokenizer (for character offsets); {type(tokenizer).__name__} is slow. "
            "Load it with `use_fast=True` or convert it with `tokenizers`."
        )
    encoded = tokenizer(rendered.text, add_special_tokens=rendered.add_special_tokens, return_offsets_mapping=True)
    input_ids, offsets = encoded["input_ids"], encoded["offset_mapping"]
    if rendered.train_everything or not completion_only_loss:
        trained = [1] * len(input_ids)
    else:
        trained = _span_token_mask(offsets, rendered.completion_spans, rendered.text)
    spans = [rendered.instruction_span] if rendered.instruction_span else []
    output = {
        "input_ids": input_ids,
        "labels": [token if keep else -100 for token, keep in zip(input_ids, trained, strict=True)],
        "instruction_mask": _token_mask(offsets, spans),
    }
    if max_length is not None and len(input_ids) > max_length:
        if truncation_mode not in ("keep_start", "keep_end"):
            raise ValueError(f"truncation_mode must be 'keep_start' or 'keep_end', got {truncation_mode!r}.")
        window = slice(None, max_length) if truncation_mode == "keep_start" else slice(-max_length, None)
        output = {key: values[window] for key, values in output.items()}
    return output


def prepare_dataset(
    dataset: Dataset,
    tokenizer: PreTrainedTokenizerBase,
    *,
    max_length: int | None = 1024,
    truncation_mode: str = "keep_start",
    completion_only_loss: bool = True,
    keep_columns: Sequence[str] = (),
    instruction_transform: InstructionTransform | None = None,
    num_proc: int | None = None,
    desc: str = "Tokenizing",
) -> Dataset:
    """Tokenize a raw dataset of any supported format into `input_ids`, `labels` and `instruction_mask`.

    Args:
        keep_columns: Raw columns to keep next to the token columns (per-example fields such as a weight or a
            source tag for the collator to carry).
        instruction_transform: `f(instruction, row_index) -> new_instruction`, applied before rendering (noise).
    """
    data_format = detect_format(dataset.column_names)
    missing = [column for column in keep_columns if column not in dataset.column_names]
    if missing:
        raise DataFormatError(
            f"Columns {missing} were asked to be kept but the dataset has only {dataset.column_names}."
        )

    def encode(row: dict[str, Any], index: int) -> dict[str, list[int]]:
        example = to_example(row, data_format, index)
        if instruction_transform is not None and example.instruction:
            example = example.with_instruction(instruction_transform(example.instruction, index))
        rendered = render_example(example, tokenizer)
        return tokenize_example(rendered, tokenizer, max_length, truncation_mode, completion_only_loss)

    remove = [column for column in dataset.column_names if column not in keep_columns]
    return dataset.map(encode, with_indices=True, remove_columns=remove, num_proc=num_proc, desc=desc)


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


def apply_instruction_transform(
    row: dict[str, Any], index: int, transform: InstructionTransform, data_format: str
) -> dict[str, Any]:
    """The row's columns with its instruction replaced by `transform(instruction, index)` (the rest is untouched)."""
    example = to_example(row, data_format, index)
    if not example.instruction:
        return {}
    changed = example.with_instruction(transform(example.instruction, index))
    if changed.messages is None:
        return {"prompt": changed.prompt}
    output = {INSTRUCTION_COLUMN: changed.instruction} if INSTRUCTION_COLUMN in row else {}
    if data_format == "messages":
        return {**output, "messages": changed.messages}
    split = len(row["prompt"])
    return {**output, "prompt": changed.messages[:split], "completion": changed.messages[split:]}


def _chat_ids(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, Any]], **options: Any) -> list[int]:
    # Exactly TRL's tokenization of conversational input (trl.data_utils._tokenize).
    return tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True, **options)["input_ids"]


def _offsets(tokenizer: PreTrainedTokenizerBase, rendered: RenderedExample) -> tuple[list[int], list[tuple[int, int]]]:
    if not tokenizer.is_fast:
        raise ValueError(
            f"Locating spans needs a fast tokenizer (for character offsets); {type(tokenizer).__name__} is slow. "
            "Load it with `use_fast=True` or convert it with `tokenizers`."
        )
    encoded = tokenizer(rendered.text, add_special_tokens=rendered.add_special_tokens, return_offsets_mapping=True)
    return encoded["input_ids"], encoded["offset_mapping"]


def _mismatch(what: str) -> DataFormatError:
    return DataFormatError(
        f"Tokenizing the rendered text does not give the token ids TRL gets from the chat template, so the {what} "
        "cannot be mapped onto tokens. This happens with templates whose output the tokenizer splits differently "
        "once rendered; use prompt/completion rows, or a template with `{% generation %}` markers."
    )


def assistant_token_masks(
    row: dict[str, Any], tokenizer: PreTrainedTokenizerBase, data_format: str, index: int | None = None
) -> dict[str, list[int]]:
    """TRL's `input_ids` for a conversational row, with the `assistant_masks` TRL would build from `{% generation %}`
    markers, found here from character offsets (for templates without markers); prompt/completion rows also get
    TRL's `completion_mask`. TRL then builds the labels from these masks as it does for its own."""
    example = to_example(row, data_format, index)
    options = chat_template_options(row, None, index)
    try:
        rendered = render_example(example, tokenizer, options)
    except DataFormatError as error:
        raise _row_error(index, str(error), "") from None
    input_ids, offsets = _offsets(tokenizer, rendered)
    if input_ids != _chat_ids(tokenizer, example.messages, **options):
        raise _mismatch("assistant turns")
    output = {
        "input_ids": input_ids,
        "assistant_masks": _span_token_mask(offsets, rendered.completion_spans, rendered.text),
    }
    if data_format == "prompt_completion":
        prompt_ids = _chat_ids(tokenizer, row["prompt"], add_generation_prompt=True, **options)
        prompt_length = common_prefix_length(prompt_ids, input_ids)
        output["completion_mask"] = [0] * prompt_length + [1] * (len(input_ids) - prompt_length)
    return output


def _window(full: int, kept: int, truncation_mode: str) -> slice:
    if kept >= full:
        return slice(None)
    return slice(None, kept) if truncation_mode == "keep_start" else slice(full - kept, None)


def instruction_token_mask(
    row: dict[str, Any],
    tokenizer: PreTrainedTokenizerBase,
    data_format: str,
    *,
    truncation_mode: str = "keep_start",
    chat_template: str | None = None,
    index: int | None = None,
) -> list[int]:
    """1 on the tokens of the row's instruction in TRL's (possibly truncated) `input_ids` of that row, else 0.

    `text` rows have no instruction (all 0). The rendering is TRL's (same template, `tools` and
    `chat_template_kwargs`); its tokenization is checked against the row's `input_ids`.
    """
    input_ids = row["input_ids"]
    if data_format == "text":
        return [0] * len(input_ids)
    example = to_example(row, data_format, index)
    if not example.instruction:
        return [0] * len(input_ids)
    options = chat_template_options(row, chat_template, index) if example.messages is not None else None
    try:
        rendered = render_example(example, tokenizer, options)
    except DataFormatError as error:
        raise _row_error(index, str(error), "") from None
    full_ids, offsets = _offsets(tokenizer, rendered)
    window = _window(len(full_ids), len(input_ids), truncation_mode)
    if full_ids[window] != list(input_ids):
        raise _mismatch("instruction")
    return _token_mask(offsets, [rendered.instruction_span] if rendered.instruction_span else [])[window]


@dataclass
class RobustDataCollator(DataCollatorForLanguageModeling):
    """TRL's language-modelling collator that also carries extra fields to `compute_loss`.

    Args:
        token_fields: Per-token fields (lists as long as `input_ids`, e.g. `instruction_mask`), right-padded with 0.
        example_fields: Per-example fields (a number or a string per row, e.g. a weight, a distortion score, a source
            tag): numbers become a tensor of shape `(batch,)`, strings a list.
    """

    token_fields: tuple[str, ...] = ()
    example_fields: tuple[str, ...] = ()

    def torch_call(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        if self.padding_free and self.token_fields:
            raise ValueError(
                "Per-token extra fields cannot be carried with padding_free=True; set padding_free=False."
            )
        output = super().torch_call(examples)
        length = output["input_ids"].shape[1]
        for name in self.token_fields:
            if name not in examples[0]:
                raise KeyError(
                    f"The collator was asked to carry `{name}` but the examples only have {list(examples[0])}."
                )
            padded = torch.zeros((len(examples), length), dtype=torch.long)
            for row, example in enumerate(examples):
                values = torch.as_tensor(example[name][:length], dtype=torch.long)
                padded[row, : len(values)] = values
            output[name] = padded
        for name in self.example_fields:
            if name not in examples[0]:
                raise KeyError(
                    f"The collator was asked to carry `{name}` but the examples only have {list(examples[0])}."
                )
            values = [example[name] for example in examples]
            output[name] = values if isinstance(values[0], str) else torch.as_tensor(values)
        return output
