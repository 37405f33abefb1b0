"""The shared data layer: exact label masks and instruction spans for every format, clear errors, the collator."""

import pytest
import torch
from datasets import Dataset

from robust_sft.data import (
    DataFormatError,
    RobustDataCollator,
    detect_format,
    load_examples,
    prepare_dataset,
    render_example,
    to_example,
    tokenize_example,
)

SYSTEM_TEMPLATE_LLAMA3_STYLE = (
    "{{ bos_token }}{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' "
    "+ message['content'] | trim + '<|im_end|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def ids(tokenizer, text, special=False):
    return tokenizer(text, add_special_tokens=special)["input_ids"]


def expected_labels(tokenizer, pieces):
    """Concatenate (text, trained) pieces into the expected input_ids and labels."""
    input_ids, labels = [], []
    for text, trained in pieces:
        piece = ids(tokenizer, text)
        input_ids += piece
        labels += piece if trained else [-100] * len(piece)
    return input_ids, labels


def prepare_one(tokenizer, row, **kwargs):
    return prepare_dataset(Dataset.from_list([row]), tokenizer, **kwargs)[0]


def instruction_text(tokenizer, row):
    return tokenizer.decode([t for t, m in zip(row["input_ids"], row["instruction_mask"]) if m])


def test_detect_format():
    assert detect_format(["messages"]) == "messages"
    assert detect_format(["conversations", "id"]) == "messages"
    assert detect_format(["prompt", "completion"]) == "prompt_completion"
    assert detect_format(["instruction", "input", "output"]) == "alpaca"
    assert detect_format(["text"]) == "text"
    with pytest.raises(DataFormatError, match=r"columns \['answer', 'question'\].*Expected one of"):
        detect_format(["question", "answer"])


def test_messages_labels_exact(tokenizer):
    row = {
        "messages": [
            {"role": "user", "content": "Name the capital of France."},
            {"role": "assistant", "content": "Paris."},
        ]
    }
    prepared = prepare_one(tokenizer, row)
    want_ids, want_labels = expected_labels(
        tokenizer,
        [
            ("<|im_start|>user\nName the capital of France.<|im_end|>\n<|im_start|>assistant\n", False),
            ("Paris.<|im_end|>", True),
            ("\n", False),
        ],
    )
    assert prepared["input_ids"] == want_ids
    assert prepared["labels"] == want_labels
    assert instruction_text(tokenizer, prepared) == "Name the capital of France."


def test_multi_turn_trains_every_assistant_turn(tokenizer):
    row = {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello."},
            {"role": "user", "content": "Add 2 and 2."},
            {"role": "assistant", "content": "4"},
        ]
    }
    prepared = prepare_one(tokenizer, row)
    want_ids, want_labels = expected_labels(
        tokenizer,
        [
            (
                "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n",
                False,
            ),
            ("Hello.<|im_end|>", True),
            ("\n<|im_start|>user\nAdd 2 and 2.<|im_end|>\n<|im_start|>assistant\n", False),
            ("4<|im_end|>", True),
            ("\n", False),
        ],
    )
    assert prepared["input_ids"] == want_ids
    assert prepared["labels"] == want_labels
    # The instruction is the last user turn before the final answer.
    assert instruction_text(tokenizer, prepared) == "Add 2 and 2."


def test_sharegpt_conversations(tokenizer):
    row = {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello."}]}
    other = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]}
    assert prepare_one(tokenizer, row) == prepare_one(tokenizer, other)


def test_alpaca_with_and_without_input(tokenizer):
    row = {"instruction": "Classify the sentiment.", "input": "I love it", "output": "positive"}
    prepared = prepare_one(tokenizer, row)
    want_ids, want_labels = expected_labels(
        tokenizer,
        [
            ("<|im_start|>user\nClassify the sentiment.\n\nI love it<|im_end|>\n<|im_start|>assistant\n", False),
            ("positive<|im_end|>", True),
            ("\n", False),
        ],
    )
    assert (prepared["input_ids"], prepared["labels"]) == (want_ids, want_labels)
    # Only the instruction, not the input, is the instruction span.
    assert instruction_text(tokenizer, prepared) == "Classify the sentiment."
    no_input = prepare_one(tokenizer, {"instruction": "Say hi.", "input": "", "output": "hi"})
    assert tokenizer.decode(no_input["input_ids"]).startswith("<|im_start|>user\nSay hi.<|im_end|>")


def test_prompt_completion_text(tokenizer):
    prepared = prepare_one(tokenizer, {"prompt": "Q: two plus two? A:", "completion": " Four."})
    prompt_ids = tokenizer("Q: two plus two? A:")["input_ids"]  # with special tokens, as TRL tokenizes text
    completion_ids = ids(tokenizer, " Four.<|im_end|>")
    assert prepared["input_ids"] == prompt_ids + completion_ids
    assert prepared["labels"] == [-100] * len(prompt_ids) + completion_ids
    assert instruction_text(tokenizer, prepared) == "Q: two plus two? A:"


def test_prompt_completion_conversational(tokenizer):
    row = {
        "prompt": [{"role": "user", "content": "Name a color."}],
        "completion": [{"role": "assistant", "content": "Blue."}],
    }
    same = {"messages": row["prompt"] + row["completion"]}
    assert prepare_one(tokenizer, row) == prepare_one(tokenizer, same)


def test_text_trains_every_token(tokenizer):
    prepared = prepare_one(tokenizer, {"text": "The capital of Italy is Rome."})
    assert prepared["labels"] == prepared["input_ids"]
    assert sum(prepared["instruction_mask"]) == 0


def test_completion_only_loss_off_trains_everything(tokenizer):
    row = {"instruction": "Say hi.", "output": "hi"}
    prepared = prepare_one(tokenizer, row, completion_only_loss=False)
    assert prepared["labels"] == prepared["input_ids"]


def test_template_that_trims_content():
    from robust_sft.testing import make_tiny_tokenizer

    tokenizer = make_tiny_tokenizer()
    tokenizer.chat_template = SYSTEM_TEMPLATE_LLAMA3_STYLE
    row = {
        "messages": [{"role": "user", "content": "  Name a fruit.  "}, {"role": "assistant", "content": " Apple. "}]
    }
    prepared = prepare_one(tokenizer, row)
    assert instruction_text(tokenizer, prepared) == "Name a fruit."
    trained = tokenizer.decode([t for t in prepared["labels"] if t != -100])
    assert trained == "Apple.<|im_end|>"


def test_embedded_smollm2_template_masks(embedded):
    _, tokenizer = embedded
    row = {"instruction": "What is the capital of France?", "output": "Paris."}
    prepared = prepare_one(tokenizer, row)
    text = tokenizer.decode(prepared["input_ids"])
    assert text.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")  # default system turn
    assert tokenizer.decode([t for t in prepared["labels"] if t != -100]) == "Paris.<|im_end|>"
    assert instruction_text(tokenizer, prepared) == "What is the capital of France?"


def test_truncation_keeps_columns_aligned(tokenizer):
    row = {"instruction": "Repeat: " + "one two three " * 20, "output": "done"}
    prepared = prepare_one(tokenizer, row, max_length=16)
    assert len(prepared["input_ids"]) == len(prepared["labels"]) == len(prepared["instruction_mask"]) == 16
    full = prepare_one(tokenizer, row, max_length=None, truncation_mode="keep_start")
    assert prepared["input_ids"] == full["input_ids"][:16]
    kept_end = prepare_one(tokenizer, row, max_length=16, truncation_mode="keep_end")
    assert kept_end["labels"] == full["labels"][-16:]


@pytest.mark.parametrize(
    "rows, message",
    [
        ([{"instruction": "ok", "output": "fine"}, {"instruction": "", "output": "x"}], r"Row 1: field `instruction`"),
        ([{"instruction": "ok", "output": None}], r"Row 0: field `output` is missing"),
        (
            [{"messages": [{"role": "user", "content": "hi"}]}],
            r"Row 0: the conversation does not end with an assistant",
        ),
        (
            [{"messages": [{"role": "user"}, {"role": "assistant", "content": "x"}]}],
            r"Row 0: a turn of `messages` lacks",
        ),
        ([{"prompt": "fine", "completion": ""}], r"Row 0: field `completion`"),
    ],
)
def test_bad_rows_name_the_row(tokenizer, rows, message):
    with pytest.raises(DataFormatError, match=message):
        prepare_dataset(Dataset.from_list(rows), tokenizer)


def test_chat_rows_without_chat_template():
    from robust_sft.testing import make_tiny_tokenizer

    plain = make_tiny_tokenizer()
    plain.chat_template = None
    with pytest.raises(DataFormatError, match="no chat template"):
        prepare_dataset(Dataset.from_list([{"instruction": "a", "output": "b"}]), plain)


def test_instruction_transform_replaces_only_the_instruction(tokenizer):
    row = {"instruction": "Classify the sentiment.", "input": "I love it", "output": "positive"}
    prepared = prepare_dataset(
        Dataset.from_list([row]), tokenizer, instruction_transform=lambda text, index: text.upper()
    )[0]
    text = tokenizer.decode(prepared["input_ids"])
    assert "CLASSIFY THE SENTIMENT.\n\nI love it" in text
    assert instruction_text(tokenizer, prepared) == "CLASSIFY THE SENTIMENT."


def test_example_with_instruction_for_text_rows():
    example = to_example({"prompt": "Q?", "completion": "A"}, "prompt_completion")
    changed = example.with_instruction("Q??")
    assert (changed.prompt, changed.completion, changed.instruction) == ("Q??", "A", "Q??")


def test_render_then_tokenize_spans_are_character_exact(tokenizer):
    example = to_example({"instruction": "Add one.", "output": "Two."}, "alpaca")
    rendered = render_example(example, tokenizer)
    start, end = rendered.instruction_span
    assert rendered.text[start:end] == "Add one."
    ((c_start, c_end),) = rendered.completion_spans
    # The span runs to the end of the turn's own rendering; the newline token after <|im_end|> does not train.
    assert rendered.text[c_start:c_end] == "Two.<|im_end|>\n"
    encoded = tokenize_example(rendered, tokenizer)
    assert len(encoded["input_ids"]) == len(encoded["labels"]) == len(encoded["instruction_mask"])
    trained = [token for token in encoded["labels"] if token != -100]
    assert tokenizer.decode(trained) == "Two.<|im_end|>"


def test_keep_columns_and_collator_carry_fields(tokenizer):
    rows = [
        {"instruction": "Say yes.", "output": "yes", "weight": 0.5, "source": "task"},
        {"instruction": "Say a longer no please.", "output": "no no no", "weight": 2.0, "source": "diverse"},
    ]
    prepared = prepare_dataset(Dataset.from_list(rows), tokenizer, keep_columns=("weight", "source"))
    assert set(prepared.column_names) == {"input_ids", "labels", "instruction_mask", "weight", "source"}
    collator = RobustDataCollator(
        pad_token_id=tokenizer.pad_token_id, token_fields=("instruction_mask",), example_fields=("weight", "source")
    )
    batch = collator(list(prepared))
    width = max(len(r["input_ids"]) for r in prepared)
    assert batch["input_ids"].shape == batch["instruction_mask"].shape == (2, width)
    short = len(prepared[0]["input_ids"])
    assert batch["instruction_mask"][0, :short].tolist() == prepared[0]["instruction_mask"]
    assert batch["instruction_mask"][0, short:].sum() == 0
    assert torch.equal(batch["weight"], torch.tensor([0.5, 2.0], dtype=torch.float64))
    assert batch["source"] == ["task", "diverse"]
    assert batch["labels"][0, short:].eq(-100).all()


def test_keep_missing_column_is_an_error(tokenizer):
    with pytest.raises(DataFormatError, match=r"Columns \['weight'\] were asked to be kept"):
        prepare_dataset(Dataset.from_list([{"text": "a"}]), tokenizer, keep_columns=("weight",))


def test_collator_missing_field(tokenizer):
    collator = RobustDataCollator(pad_token_id=0, example_fields=("weight",))
    with pytest.raises(KeyError, match="carry `weight`"):
        collator([{"input_ids": [1, 2], "labels": [1, 2]}])


def test_load_examples_from_files(tmp_path):
    jsonl = tmp_path / "rows.jsonl"
    jsonl.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "c", "output": "d"}\n')
    assert len(load_examples(jsonl)) == 2
    tsv = tmp_path / "rows.tsv"
    tsv.write_text("prompt\tcompletion\nx\ty\n")
    assert load_examples(tsv)[0] == {"prompt": "x", "completion": "y"}
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_examples(tmp_path / "missing.jsonl")
    with pytest.raises(ValueError, match="Unsupported data file type '.txt'"):
        (tmp_path / "rows.txt").write_text("x")
        load_examples(tmp_path / "rows.txt")
