"""The shared data layer: every input format TRL accepts, plus Alpaca, turned into token ids with exact label masks and
an identifiable instruction span, and a collator that carries extra per-example fields to `compute_loss`.

Formats (detected from the column names):

- `messages`: a list of `{"role", "content"}` turns (ShareGPT `conversations` with `from`/`value` is converted);
- `prompt` + `completion`: both text, or both lists of messages;
- `instruction` + `output` (+ optional `input`): the Alpaca layout, rendered as one user turn and one assistant turn;
- `text`: plain language modelling (every token is trained; there is no instruction span).

Why not TRL's own preparation: TRL masks assistant turns only for chat templates with `{% generation %}` markers, and
keeps no trace of where the instruction is. Here each example is rendered with the tokenizer's own chat template and
the assistant turns and the instruction are located as character spans of the rendered text, then mapped onto tokens
with the fast tokenizer's offsets. This works for any template that renders a conversation's prefix as a prefix of
the whole conversation (all common templates do; the rare ones that do not get a clear error).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset, load_dataset
from transformers import PreTrainedTokenizerBase
from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

FORMATS = ("messages", "prompt_completion", "alpaca", "text")
TOKEN_COLUMNS = ("input_ids", "labels", "instruction_mask")
InstructionTransform = Callable[[str, int], str]


class DataFormatError(ValueError):
    """A dataset or a row that the data layer cannot use; the message names the row and the fix."""


def detect_format(column_names: Iterable[str]) -> str:
    """Name the format of a dataset from its columns: one of `FORMATS`."""
    columns = set(column_names)
    if "messages" in columns or "conversations" in columns:
        return "messages"
    if {"prompt", "completion"} <= columns:
        return "prompt_completion"
    if {"instruction", "output"} <= columns:
        return "alpaca"
    if "text" in columns:
        return "text"
    raise DataFormatError(
        f"Cannot tell the data format from the columns {sorted(columns)}. Expected one of: `messages` (chat turns), "
        "`prompt` + `completion`, `instruction` + `output` (+ `input`, the Alpaca layout), or `text`. Rename your "
        "columns (e.g. `dataset.rename_column('question', 'instruction')`)."
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
    return DataFormatError(f"{where}: {problem}. {fix}")


def _require_text(row: dict[str, Any], key: str, index: int | None, allow_empty: bool = False) -> str:
    value = row.get(key)
    if value is None or not isinstance(value, str) or (not allow_empty and not value.strip()):
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
            raise _row_error(index, f"a turn of `{key}` lacks a `role` or a text `content`: {turn!r}", "Fix the turn.")
        turns.append({"role": turn["role"], "content": turn["content"]})
    return turns


def _last_user_turn(messages: list[dict[str, str]], before: int) -> int | None:
    for position in range(before - 1, -1, -1):
        if messages[position]["role"] == "user":
            return position
    return None


def to_example(row: dict[str, Any], data_format: str, index: int | None = None) -> Example:
    """Convert one raw row of a known format into the internal `Example`; bad rows raise `DataFormatError`."""
    if data_format == "messages":
        key = "messages" if row.get("messages") is not None else "conversations"
        messages = _check_messages(row.get(key), index, key)
        if messages[-1]["role"] != "assistant":
            raise _row_error(
                index, "the conversation does not end with an assistant turn", "Nothing would be trained."
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
            return Example(
                messages=messages,
                instruction_turn=turn,
                instruction=messages[turn]["content"] if turn is not None else "",
            )
        prompt = _require_text(row, "prompt", index)
        completion = _require_text(row, "completion", index)
        return Example(prompt=prompt, completion=completion, instruction=prompt)
    if data_format == "alpaca":
        instruction = _require_text(row, "instruction", index)
        output = _require_text(row, "output", index)
        extra_input = row.get("input") or ""
        if not isinstance(extra_input, str):
            raise _row_error(
                index, f"field `input` must be text, got {extra_input!r}", "Use an empty string for none."
            )
        content = instruction + ("\n\n" + extra_input if extra_input.strip() else "")
        messages = [{"role": "user", "content": content}, {"role": "assistant", "content": output}]
        return Example(messages=messages, instruction_turn=0, instruction=instruction)
    if data_format == "text":
        return Example(prompt=_require_text(row, "text", index), train_on_prompt=True)
    raise ValueError(f"Unknown data format {data_format!r}; expected one of {FORMATS}.")


@dataclass
class RenderedExample:
    """The text to tokenize and the character spans that matter in it."""

    text: str
    completion_spans: list[tuple[int, int]] = field(default_factory=list)
    instruction_span: tuple[int, int] | None = None
    add_special_tokens: bool = False
    train_everything: bool = False


def _render(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def render_example(example: Example, tokenizer: PreTrainedTokenizerBase) -> RenderedExample:
    """Render an example with the tokenizer's chat template (chat) or as prompt + completion + EOS (text)."""
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
    if not getattr(tokenizer, "chat_template", None):
        raise DataFormatError(
            "The data is conversational (messages or Alpaca rows) but the tokenizer has no chat template. Set one "
            "(`load_model_and_tokenizer(..., chat_template='chatml')` or `tokenizer.chat_template = ...`), or give "
            "`prompt`/`completion` text rows instead."
        )
    messages = example.messages
    text = _render(tokenizer, messages, add_generation_prompt=False)
    spans = []
    for position, turn in enumerate(messages):
        if turn["role"] != "assistant":
            continue
        start = len(_check_prefix(_render(tokenizer, messages[:position], True), text))
        end = len(_check_prefix(_render(tokenizer, messages[: position + 1], False), text))
        end = start + len(text[start:end].rstrip())  # trailing newlines after the end-of-turn token do not train
        spans.append((start, end))
    instruction_span = None
    if example.instruction_turn is not None and example.instruction:
        instruction_span = _locate_instruction(
            tokenizer, messages, example.instruction_turn, example.instruction, text
        )
    return RenderedExample(text=text, completion_spans=spans, instruction_span=instruction_span)


def _check_prefix(prefix: str, text: str) -> str:
    if not text.startswith(prefix):
        raise DataFormatError(
            "The chat template renders a conversation's beginning differently from the whole conversation (it "
            "rewrites earlier turns), so the assistant turns cannot be located. Keep only the last assistant turn "
            "(prompt/completion rows) or use a template whose rendering of a prefix is a prefix."
        )
    return prefix


def _locate_instruction(
    tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]], turn: int, instruction: str, text: str
) -> tuple[int, int]:
    upto = _check_prefix(_render(tokenizer, messages[: turn + 1], False), text)
    content = messages[turn]["content"]
    # The turn's content is the last copy of it in the prefix that ends with that turn; some templates trim it.
    for shown, wanted in ((content, instruction), (content.strip(), instruction.strip())):
        content_at, offset = upto.rfind(shown), shown.find(wanted)
        if content_at >= 0 and offset >= 0:
            return content_at + offset, content_at + offset + len(wanted)
    raise DataFormatError(
        "The chat template changes the text of the instruction turn (beyond trimming), so the instruction cannot be "
        "located in the rendered prompt."
    )


def _token_mask(offsets: Sequence[tuple[int, int]], spans: Sequence[tuple[int, int]]) -> list[int]:
    # A token belongs to a span when their characters overlap; zero-width tokens (auto-added BOS/EOS) to none.
    return [int(any(end > s and start < e for s, e in spans)) if end > start else 0 for start, end in offsets]


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
        trained = _token_mask(offsets, rendered.completion_spans)
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
