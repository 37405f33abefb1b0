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
Files: `formats.py` (formats, rows, checks, loading), `tokens.py` (token masks from offsets, `prepare_dataset`),
`collator.py` (`RobustDataCollator`), `queries.py` (`read_queries`: queries for self-sampling).
"""

from .collator import RobustDataCollator
from .formats import (
    ALPACA_COLUMNS,
    FORMATS,
    INSTRUCTION_COLUMN,
    DataFormatError,
    Example,
    alpaca_to_conversational,
    chat_template_options,
    check_rows,
    column_names,
    detect_format,
    load_examples,
    to_example,
)
from .queries import Query, read_queries
from .tokens import (
    TOKEN_COLUMNS,
    InstructionTransform,
    RenderedExample,
    apply_instruction_transform,
    assistant_token_masks,
    instruction_token_mask,
    prepare_dataset,
    render_example,
    require_chat_template,
    tokenize_example,
)

__all__ = [
    "ALPACA_COLUMNS",
    "FORMATS",
    "INSTRUCTION_COLUMN",
    "TOKEN_COLUMNS",
    "DataFormatError",
    "Example",
    "InstructionTransform",
    "RenderedExample",
    "RobustDataCollator",
    "alpaca_to_conversational",
    "apply_instruction_transform",
    "assistant_token_masks",
    "chat_template_options",
    "check_rows",
    "column_names",
    "detect_format",
    "instruction_token_mask",
    "load_examples",
    "Query",
    "prepare_dataset",
    "read_queries",
    "render_example",
    "require_chat_template",
    "to_example",
    "tokenize_example",
]
