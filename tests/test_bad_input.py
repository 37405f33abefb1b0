"""Bad input gets a clear error (the problem and the fix), raised before any expensive work: one test per row of
docs/bad-input.md."""

import logging
import os

import pytest
from datasets import Dataset, DatasetDict

from robust_sft import DataFormatError, RobustSFTTrainer
from robust_sft.testing import make_tiny_model, make_tiny_tokenizer

from .conftest import train_args

GOOD = [{"instruction": f"Add {i} and 1.", "output": f"{i + 1}"} for i in range(4)]
USER, ASSISTANT = {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}


class WeightedTrainer(RobustSFTTrainer):
    _token_fields = ("instruction_mask",)
    _example_fields = ("weight",)


@pytest.fixture
def no_model_loading(monkeypatch):
    """The errors below must come before the model loads: loading fails the test."""

    def load(*args, **kwargs):
        raise AssertionError("the model was loaded before the bad input was reported")

    monkeypatch.setattr(RobustSFTTrainer, "_load_model", staticmethod(load))


def construct(tmp_path, train, trainer_class=RobustSFTTrainer, model="some-org/some-model", **options):
    """A trainer on a model id (never loaded: `no_model_loading`) or a given model object."""
    kwargs = {key: options.pop(key) for key in ("eval_dataset", "formatting_func", "data_collator") if key in options}
    if not isinstance(model, str):
        kwargs["processing_class"] = options.pop("tokenizer", None) or make_tiny_tokenizer()
    return trainer_class(model=model, args=train_args(tmp_path, **options), train_dataset=train, **kwargs)


def rows(*items):
    return Dataset.from_list(list(items))


# (case, train rows, config / trainer options, error, message)
BEFORE_LOADING = [
    ("empty dataset", Dataset.from_dict({"text": []}), {}, DataFormatError, "train dataset is empty"),
    (
        "unknown columns",
        rows({"question": "2+2?", "answer": "4"}),
        {},
        DataFormatError,
        r"Cannot tell the data format from the columns \['answer', 'question'\].*Rename your columns",
    ),
    (
        "conversation starts with an assistant turn",
        rows({"messages": [ASSISTANT, USER, ASSISTANT]}),
        {},
        DataFormatError,
        "Row 0: the conversation starts with an assistant turn.*Add the user turn",
    ),
    (
        "conversation does not end with an assistant turn",
        rows({"messages": [USER, ASSISTANT, USER]}),
        {},
        DataFormatError,
        "Row 0: the conversation does not end with an assistant turn",
    ),
    (
        "numeric output",
        rows({"instruction": "Add 2 and 3.", "output": 5}),
        {},
        DataFormatError,
        r"Row 0: field `output` must be text, got int \(5\).*str\(row\['output'\]\)",
    ),
    (
        "numeric input",
        rows({"instruction": "Add.", "input": 7, "output": "8"}),
        {},
        DataFormatError,
        "field `input` must be text, got int",
    ),
    (
        "empty completion",
        rows({"prompt": "2+2=", "completion": ""}),
        {},
        DataFormatError,
        "field `completion` is missing or empty",
    ),
    ("missing text", rows({"text": None}, {"text": "ok"}), {}, DataFormatError, "Row 0: field `text` is missing"),
    (
        "dataset_text_field names a missing column",
        rows({"body": "a text"}),
        {"dataset_text_field": "content"},
        DataFormatError,
        r"`content` \(your `dataset_text_field`\)",
    ),
    ("empty messages", rows({"messages": []}), {}, DataFormatError, "`messages` must be a non-empty list of turns"),
    (
        "turn without a role",
        rows({"messages": [{"content": "Hi"}, ASSISTANT]}),
        {},
        DataFormatError,
        "lacks a text `role` or a text `content`",
    ),
    (
        "turn content is not text",
        rows({"messages": [{"role": "user", "content": "3"}, {"role": "assistant", "content": None}]}),
        {},
        DataFormatError,
        "Row 0: a turn of `messages` lacks a text `role` or a text `content`",
    ),
    (
        "chat prompt with a text completion",
        rows({"prompt": [USER], "completion": "Hello."}),
        {},
        DataFormatError,
        "`completion` must be a non-empty list of turns, got 'Hello.'",
    ),
    (
        "tools that are not JSON",
        rows({"messages": [USER, ASSISTANT], "tools": "{not json"}),
        {},
        DataFormatError,
        "`tools` is text but not JSON",
    ),
    (
        "chat_template_kwargs that are not a dict",
        rows({"messages": [USER, ASSISTANT], "chat_template_kwargs": "enable_thinking"}),
        {},
        DataFormatError,
        "`chat_template_kwargs` must be a dict, got str",
    ),
    (
        "assistant_only_loss on text rows",
        rows({"text": "just text"}),
        {"assistant_only_loss": True},
        DataFormatError,
        "assistant_only_loss=True needs conversational rows.*Set assistant_only_loss=False",
    ),
]


@pytest.mark.parametrize(
    ("train", "options", "error", "message"),
    [case[1:] for case in BEFORE_LOADING],
    ids=[case[0] for case in BEFORE_LOADING],
)
def test_bad_rows_are_reported_before_the_model_loads(tmp_path, no_model_loading, train, options, error, message):
    with pytest.raises(error, match=message):
        construct(tmp_path, train, **options)


def test_none_per_example_field(tmp_path, no_model_loading):
    train = Dataset.from_list([dict(GOOD[0], weight=1.0), dict(GOOD[1], weight=None)])
    with pytest.raises(DataFormatError, match=r"Row 1: the per-example field `weight` is None.*Give every row"):
        construct(tmp_path, train, WeightedTrainer)


def test_eval_rows_are_checked_too(tmp_path, no_model_loading):
    with pytest.raises(DataFormatError, match=r"eval dataset: Row 0: field `output` must be text, got float"):
        construct(tmp_path, Dataset.from_list(GOOD), eval_dataset=rows({"instruction": "a", "output": 1.5}))


def test_output_dir_not_writable(tmp_path, no_model_loading, monkeypatch):
    import robust_sft.trainer as trainer_module

    locked = tmp_path / "locked"
    locked.mkdir()
    # chmod does not stop root: make the permission check itself answer "no" for this folder.
    real_access = os.access
    monkeypatch.setattr(
        trainer_module.os, "access", lambda path, mode: str(path) != str(locked) and real_access(path, mode)
    )
    with pytest.raises(PermissionError, match="output_dir .* is not writable.*pick a folder you can write to"):
        construct(locked / "run", Dataset.from_list(GOOD))


def test_output_dir_is_a_file(tmp_path, no_model_loading):
    (tmp_path / "run").write_text("")
    with pytest.raises(NotADirectoryError, match="is a file, not a folder"):
        construct(tmp_path / "run", Dataset.from_list(GOOD))
    with pytest.raises(NotADirectoryError, match="is a file, not a folder"):
        construct(tmp_path / "run" / "inside", Dataset.from_list(GOOD))


def test_dataset_dict_as_train_dataset(tmp_path, no_model_loading):
    splits = DatasetDict({"train": Dataset.from_list(GOOD)})
    with pytest.raises(TypeError, match=r"DatasetDict with splits \['train'\]; pass one split.*dataset\['train'\]"):
        construct(tmp_path, splits)


def test_missing_data_file(tmp_path, no_model_loading):
    with pytest.raises(FileNotFoundError, match="Data file .*nope.jsonl does not exist"):
        construct(tmp_path, str(tmp_path / "nope.jsonl"))


def test_unsupported_data_file(tmp_path, no_model_loading):
    (tmp_path / "rows.txt").write_text("a\n")
    with pytest.raises(ValueError, match=r"Unsupported data file type '.txt'.*use .json, .jsonl"):
        construct(tmp_path, str(tmp_path / "rows.txt"))


def test_missing_eval_file_in_a_dict(tmp_path, no_model_loading):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        construct(tmp_path, Dataset.from_list(GOOD), eval_dataset={"held_out": str(tmp_path / "held_out.jsonl")})


def test_train_dataset_of_the_wrong_type(tmp_path, no_model_loading):
    with pytest.raises(TypeError, match="`train_dataset` must be a Dataset.*got dict"):
        construct(tmp_path, {"text": ["a"]})


def test_formatting_func_returning_a_list(tmp_path, no_model_loading):
    with pytest.raises(DataFormatError, match=r"formatting_func must return one text per row \(str\), got list"):
        construct(tmp_path, Dataset.from_list(GOOD), formatting_func=lambda row: [row["instruction"]])


def test_packing_with_per_token_fields(tmp_path, no_model_loading):
    train = Dataset.from_list([dict(row, weight=1.0) for row in GOOD])
    with pytest.raises(ValueError, match="packing and padding-free batches cannot keep.*Set packing=False"):
        construct(tmp_path, train, WeightedTrainer, packing=True)


# ------------------------------------------------------------------------------------------------ need the tokenizer
@pytest.fixture
def model_and_tokenizer():
    tokenizer = make_tiny_tokenizer()
    return make_tiny_model("llama", tokenizer), tokenizer


def test_quantization_with_a_loaded_model(tmp_path, model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    with pytest.raises(
        ValueError, match="already-loaded full-precision model was passed, which would train unquantized"
    ):
        construct(tmp_path, Dataset.from_list(GOOD), model=model, tokenizer=tokenizer, quantization="4bit")


def test_no_chat_template_for_chat_rows(tmp_path, model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    tokenizer.chat_template = None
    with pytest.raises(DataFormatError, match="the tokenizer has no chat template.*chat_template='chatml'"):
        construct(tmp_path, Dataset.from_list(GOOD), model=model, tokenizer=tokenizer)


def test_template_that_rewrites_earlier_turns(tmp_path, model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    # Marks the last turn: a conversation's beginning renders differently once more turns follow.
    tokenizer.chat_template = (
        "{% for m in messages %}{{ m['role'] + ('*' if loop.last else '') + ': ' + m['content'] + '\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}"
    )
    train = Dataset.from_list([{"messages": [USER, ASSISTANT]}])
    with pytest.raises(
        DataFormatError, match="Row 0: The chat template renders a conversation's beginning differently"
    ):
        construct(tmp_path, train, model=model, tokenizer=tokenizer, assistant_only_loss=True)


def test_template_that_drops_the_assistant_text(tmp_path, model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    tokenizer.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'user' %}{{ 'Q: ' + m['content'] + '\n' }}"
        "{% else %}{{ 'A: ' }}{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{{ 'A: ' }}{% endif %}"
    )
    train = Dataset.from_list([{"messages": [USER, ASSISTANT]}])
    with pytest.raises(DataFormatError, match="does not render an assistant turn's text"):
        construct(tmp_path, train, model=model, tokenizer=tokenizer, assistant_only_loss=True)


def test_max_length_shorter_than_every_prompt(tmp_path, model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    with pytest.raises(DataFormatError, match=r"Every row of the train dataset \(4\) has no trained token left.*"):
        construct(tmp_path, Dataset.from_list(GOOD), model=model, tokenizer=tokenizer, max_length=8)


def test_max_length_shorter_than_some_prompts(tmp_path, model_and_tokenizer, caplog):
    model, tokenizer = model_and_tokenizer
    train = Dataset.from_list([*GOOD, {"instruction": "word " * 100, "output": "Ok."}])
    with caplog.at_level(logging.WARNING, logger="robust_sft.preparation"):
        trainer = construct(tmp_path, train, model=model, tokenizer=tokenizer, max_length=64)
    assert len(trainer.train_dataset) == 4
    assert "1 of 5 rows of the train dataset were dropped" in caplog.text and "Raise max_length" in caplog.text


def test_missing_per_example_column(tmp_path, model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    with pytest.raises(DataFormatError, match=r"needs the per-example column\(s\) \['weight'\].*add_column"):
        construct(tmp_path, Dataset.from_list(GOOD), WeightedTrainer, model=model, tokenizer=tokenizer)


def test_custom_collator_that_drops_the_fields(tmp_path, model_and_tokenizer):
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    model, tokenizer = model_and_tokenizer
    train = Dataset.from_list([dict(row, weight=1.0) for row in GOOD])
    collator = DataCollatorForLanguageModeling(pad_token_id=tokenizer.pad_token_id)
    with pytest.raises(ValueError, match="data_collator drops .*Use `robust_sft.RobustDataCollator"):
        construct(tmp_path, train, WeightedTrainer, model=model, tokenizer=tokenizer, data_collator=collator)


def test_rows_are_checked_once_on_the_main_process_first_and_later_eval_sets_too(
    tmp_path, model_and_tokenizer, monkeypatch
):
    """`check_rows` loops over every row in Python: once per dataset, inside the main-process-first block (every DDP
    rank would otherwise convert at once); a dataset passed to `evaluate` later is still checked."""
    import contextlib

    from robust_sft import preparation
    from robust_sft import trainer as trainer_module

    model, tokenizer = model_and_tokenizer
    calls, inside = [], [False]
    real_check = preparation.check_rows

    def check_rows(dataset, *args, **kwargs):
        calls.append((kwargs["dataset_name"], inside[0]))
        return real_check(dataset, *args, **kwargs)

    @contextlib.contextmanager
    def main_first():
        inside[0] = True
        try:
            yield
        finally:
            inside[0] = False

    monkeypatch.setattr(preparation, "check_rows", check_rows)
    monkeypatch.setattr(trainer_module, "global_then_local_main_first", main_first)
    trainer = construct(
        tmp_path, Dataset.from_list(GOOD), model=model, tokenizer=tokenizer, eval_dataset=Dataset.from_list(GOOD[:2])
    )
    assert calls == [("train", True), ("eval", True)]
    with pytest.raises(DataFormatError, match="eval dataset: Row 0: the conversation starts with an assistant turn"):
        trainer.evaluate(eval_dataset=rows({"messages": [ASSISTANT, USER, ASSISTANT]}))
