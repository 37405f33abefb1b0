"""Token-level masks from character offsets.

Assistant turns without `{% generation %}` markers, the instruction span, and the standalone tokenizer
`prepare_dataset` used by the evaluation.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from datasets import Dataset
from transformers import PreTrainedTokenizerBase
from trl.data_utils import common_prefix_length

from .formats import (
    INSTRUCTION_COLUMN,
    DataFormatError,
    Example,
    _row_error,
    chat_template_options,
    detect_format,
    to_example,
)

TOKEN_COLUMNS = ("input_ids", "labels", "instruction_mask")


InstructionTransform = Callable[[str, int], str]


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
