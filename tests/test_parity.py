"""Parity with TRL: every case goes through `trl.SFTTrainer` and `RobustSFTTrainer` with the same config, and the
prepared rows (`input_ids`, `labels`, `seq_lengths`) and the collated batches must be identical.

Our extensions (Alpaca rows, assistant-only loss without `{% generation %}` markers, the instruction span) are checked
against hand-built token lists on the same six chat templates.
"""

import copy
import itertools
from functools import cache

import pytest
import torch
from datasets import Dataset, DatasetDict
from trl import SFTConfig, SFTTrainer

from robust_sft import METHODS, RobustSFTTrainer
from robust_sft.testing import CHAT_TEMPLATE_NAMES, make_template_tokenizer, make_tiny_model

COMPARED = ("input_ids", "labels", "seq_lengths")

SYSTEM = {"role": "system", "content": "Be brief."}
TURNS = [
    {"role": "user", "content": "Hi there"},
    {"role": "assistant", "content": "Four."},
    {"role": "user", "content": "Again?"},
    {"role": "assistant", "content": "Two."},
]
QA = [("What is two plus two?", "Four."), ("The capital of France?", "Paris."), ("Add 3 and 7.", "The answer is 10.")]
TOOL = {
    "type": "function",
    "function": {
        "name": "add",
        "description": "Add two numbers",
        "parameters": {"type": "object", "properties": {"a": {"type": "number"}, "b": {"type": "number"}}},
    },
}


def single_turn(question, answer):
    return [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]


ROWS = {
    "text": [{"text": f"{q} {a}"} for q, a in QA],
    "text_field": [{"body": f"{q} {a}", "id": i} for i, (q, a) in enumerate(QA)],
    "prompt_completion_text": [{"prompt": q, "completion": " " + a} for q, a in QA],
    "prompt_completion_chat": [{"prompt": single_turn(q, a)[:1], "completion": single_turn(q, a)[1:]} for q, a in QA],
    "messages_single": [{"messages": single_turn(q, a)} for q, a in QA],
    "messages_multi": [{"messages": TURNS}, {"messages": single_turn(*QA[0]) + single_turn(*QA[1])}],
    "messages_system": [{"messages": [SYSTEM, *TURNS]}, {"messages": [SYSTEM, *single_turn(*QA[2])]}],
    "sharegpt": [{"conversations": [{"from": "human", "value": q}, {"from": "gpt", "value": a}]} for q, a in QA],
    "tools": [
        {"messages": single_turn(q, a), "tools": [TOOL], "chat_template_kwargs": {"date_string": "26 Jul 2024"}}
        for q, a in QA
    ],
    "qa": [{"question": q, "answer": a} for q, a in QA],
}


@cache
def _tokenizer(template, markers=False):
    return make_template_tokenizer(template, generation_markers=markers)


@pytest.fixture(scope="module")
def output_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("parity"))


def config(output_dir, config_class=SFTConfig, **overrides):
    values = dict(
        output_dir=output_dir,
        report_to=[],
        use_cpu=True,
        bf16=False,
        max_length=256,
        per_device_train_batch_size=2,
        gradient_checkpointing=False,
        dataset_num_proc=None,
    )
    values.update(overrides)
    return config_class(**values)


def build(trainer_class, template, args, train, markers=False, **kwargs):
    tokenizer = copy.deepcopy(_tokenizer(template, markers))  # TRL sets the pad token on it
    return trainer_class(
        model=make_tiny_model("llama", tokenizer),
        args=args,
        train_dataset=train,
        processing_class=tokenizer,
        **kwargs,
    )


def rows(dataset, limit=8):
    return [{key: row[key] for key in COMPARED if key in row} for row in itertools.islice(iter(dataset), limit)]


def assert_same_batches(reference, ours):
    batch = rows(reference.train_dataset, 3)
    expected, got = reference.data_collator(copy.deepcopy(batch)), ours.data_collator(copy.deepcopy(batch))
    assert sorted(expected) == sorted(got)
    for key, value in expected.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, got[key]), key
        else:
            assert value == got[key], key


def assert_parity(output_dir, template, train, markers=False, eval_dataset=None, **options):
    """SFTTrainer and RobustSFTTrainer on the same rows and the same config object: same prepared rows and batches,
    and the config object is not changed by RobustSFTTrainer."""
    formatting_func = options.pop("formatting_func", None)
    extra = {"formatting_func": formatting_func} if formatting_func else {}
    args = config(output_dir, **options)
    reference = build(SFTTrainer, template, args, train, markers, eval_dataset=eval_dataset, **extra)
    before = args.to_dict()
    ours = build(RobustSFTTrainer, template, args, train, markers, eval_dataset=eval_dataset, **extra)
    assert args.to_dict() == before
    assert rows(reference.train_dataset), "nothing prepared"
    assert rows(ours.train_dataset) == rows(reference.train_dataset)
    if isinstance(reference.eval_dataset, dict):
        assert sorted(ours.eval_dataset) == sorted(reference.eval_dataset)
        for name, dataset in reference.eval_dataset.items():
            assert rows(ours.eval_dataset[name]) == rows(dataset), name
    elif reference.eval_dataset is not None:
        assert rows(ours.eval_dataset) == rows(reference.eval_dataset)
    assert_same_batches(reference, ours)
    return reference, ours


# ------------------------------------------------------------------------------------------------ text formats
@pytest.mark.parametrize("template", CHAT_TEMPLATE_NAMES)
def test_text_rows_get_eos(output_dir, template):
    reference, ours = assert_parity(output_dir, template, Dataset.from_list(ROWS["text"]))
    row = ours.train_dataset[0]
    assert row["input_ids"][-1] == ours.processing_class.eos_token_id
    assert row["labels"] == row["input_ids"]  # language modelling: every token trains


@pytest.mark.parametrize("template", CHAT_TEMPLATE_NAMES)
def test_dataset_text_field(output_dir, template):
    assert_parity(output_dir, template, Dataset.from_list(ROWS["text_field"]), dataset_text_field="body")


@pytest.mark.parametrize("template", CHAT_TEMPLATE_NAMES)
def test_formatting_func(output_dir, template):
    def formatting_func(row):
        return f"Q: {row['question']}\nA: {row['answer']}"

    assert_parity(output_dir, template, Dataset.from_list(ROWS["qa"]), formatting_func=formatting_func)


@pytest.mark.parametrize("template", CHAT_TEMPLATE_NAMES)
@pytest.mark.parametrize("completion_only_loss", [None, False])
def test_prompt_completion_text(output_dir, completion_only_loss, template):
    _, ours = assert_parity(
        output_dir,
        template,
        Dataset.from_list(ROWS["prompt_completion_text"]),
        completion_only_loss=completion_only_loss,
    )
    row = ours.train_dataset[0]
    assert (row["labels"][0] == -100) is (completion_only_loss is None)
    assert row["input_ids"][-1] == ours.processing_class.eos_token_id


# ------------------------------------------------------------------------------------------------ chat formats
CHAT_CASES = {
    "prompt_completion_chat": ("prompt_completion_chat", {}),
    "completion_only_loss_off": ("prompt_completion_chat", {"completion_only_loss": False}),
    "messages_single": ("messages_single", {}),
    "messages_multi": ("messages_multi", {}),
    "messages_system": ("messages_system", {}),
    "sharegpt": ("sharegpt", {}),
    "tools_and_kwargs": ("tools", {}),
    "packing_bfd": ("messages_multi", {"packing": True, "packing_strategy": "bfd", "max_length": 48}),
    "packing_wrapped": ("messages_single", {"packing": True, "packing_strategy": "wrapped", "max_length": 24}),
    "padding_free": ("prompt_completion_chat", {"padding_free": True, "max_length": None}),
    "pad_token": ("messages_single", {"pad_token": "<|endoftext|>"}),
    "truncation_keep_start": ("messages_multi", {"max_length": 20}),
    "truncation_keep_end": ("prompt_completion_chat", {"max_length": 12, "truncation_mode": "keep_end"}),
}


@pytest.mark.parametrize("template", CHAT_TEMPLATE_NAMES)
@pytest.mark.parametrize("case", sorted(CHAT_CASES))
def test_chat_parity(output_dir, case, template):
    rows_name, options = CHAT_CASES[case]
    assert_parity(output_dir, template, Dataset.from_list(ROWS[rows_name]), **options)


@pytest.mark.parametrize("template", CHAT_TEMPLATE_NAMES)
def test_assistant_only_loss_with_generation_markers(output_dir, template):
    """TRL handles templates with markers itself; the trainer must leave it to TRL."""
    _, ours = assert_parity(
        output_dir, template, Dataset.from_list(ROWS["messages_system"]), markers=True, assistant_only_loss=True
    )
    assert -100 in ours.train_dataset[0]["labels"]


def test_tools_reach_the_template(output_dir):
    _, ours = assert_parity(output_dir, "qwen2.5", Dataset.from_list(ROWS["tools"]))
    assert '"name": "add"' in ours.processing_class.decode(ours.train_dataset[0]["input_ids"])
    _, ours = assert_parity(output_dir, "llama3", Dataset.from_list(ROWS["tools"]))
    assert "Today Date: 26 Jul 2024" in ours.processing_class.decode(ours.train_dataset[0]["input_ids"])


@pytest.mark.parametrize("template", CHAT_TEMPLATE_NAMES)
def test_iterable_dataset(output_dir, template):
    train = Dataset.from_list(ROWS["messages_multi"]).to_iterable_dataset()
    assert_parity(output_dir, template, train, max_steps=1)


@pytest.mark.parametrize("template", CHAT_TEMPLATE_NAMES)
def test_dataset_dict_of_eval_sets(output_dir, template):
    evals = DatasetDict(
        {
            "chat": Dataset.from_list(ROWS["messages_single"]),
            "completion": Dataset.from_list(ROWS["prompt_completion_chat"]),
        }
    )
    assert_parity(output_dir, template, Dataset.from_list(ROWS["messages_system"]), eval_dataset=evals)


# ------------------------------------------------------------------------------------------------ method trainers
# Settings that turn off each method's data change, so that its trainer must prepare what SFTTrainer prepares: ANIT
# without noisy instructions (its adversarial term only changes the loss), DELIA without diverse rows. A method added
# to the registry must be added here (test_every_sft_method_has_neutral_settings).
# ANIT without noise, perturbing every token: its data preparation must still be TRL's. (With the default prompt
# scope, `messages` rows train the whole sequence, leave nothing to perturb, and ANIT refuses them: see test_anit.)
NEUTRAL = {"taia": {}, "anit": {"use_noise": False, "adversarial_scope": "all"}, "delia": {"diverse_ratio": 0.0}}
SFT_METHODS = sorted(
    name for name, method in METHODS.items() if name != "sft" and issubclass(method.trainer_class(), SFTTrainer)
)
METHOD_CASES = {
    "prompt_completion_chat": ("prompt_completion_chat", {}),
    "messages_multi": ("messages_multi", {}),
    "messages_system": ("messages_system", {}),
}


def test_every_sft_method_has_neutral_settings():
    assert set(SFT_METHODS) == set(NEUTRAL)


def collated(trainer, limit=3):
    """The first rows as the trainer's collator batches them (only the columns the model's signature keeps)."""
    trainer._set_signature_columns_if_needed()
    batch = [
        {key: value for key, value in row.items() if key in trainer._signature_columns}
        for row in itertools.islice(iter(trainer.train_dataset), limit)
    ]
    return trainer.data_collator(copy.deepcopy(batch))


@pytest.mark.parametrize("template", ["chatml", "llama3"])
@pytest.mark.parametrize("case", sorted(METHOD_CASES))
@pytest.mark.parametrize("name", SFT_METHODS)
def test_method_trainer_parity(output_dir, name, case, template):
    """Every SFT-based method trainer, with the settings that leave its data alone, prepares the same `input_ids` and
    trains the same tokens as `SFTTrainer` on the same rows and the same config object."""
    method = METHODS[name]
    rows_name, options = METHOD_CASES[case]
    train = Dataset.from_list(ROWS[rows_name])
    args = config(output_dir, method.config_class(), **options, **NEUTRAL[name])
    trainer_class = method.trainer_class()
    before = args.to_dict()
    ours = build(trainer_class, template, args, train)
    assert args.to_dict() == before  # the user's config is never rewritten
    if getattr(trainer_class, "_assistant_only_loss_default", False):
        # Documented difference: a method whose objective needs assistant-only loss trains conversational rows on
        # their assistant turns only (its config doc says so). The reference is then TRL's own assistant-only loss,
        # on the same template with `{% generation %}` markers (which renders the same tokens).
        reference_args = config(output_dir, **options, assistant_only_loss=True)
        reference = build(SFTTrainer, template, reference_args, train, markers=True)
    else:
        reference = build(SFTTrainer, template, args, train)
    assert rows(reference.train_dataset), "nothing prepared"
    assert rows(ours.train_dataset) == rows(reference.train_dataset)
    expected, got = collated(reference), collated(ours)
    for key in ("input_ids", "labels", "attention_mask"):
        assert torch.equal(expected[key], got[key]), key


# ------------------------------------------------------------------------------------------------ extensions
class SpanTrainer(RobustSFTTrainer):
    """A trainer that declares it needs the instruction span."""

    _token_fields = ("instruction_mask",)


ALPACA = {"instruction": "Add 2 and 3.", "input": "Be quick.", "output": "5"}

# Hand-built renderings, as (text, trained, instruction) pieces: the Alpaca row above as a prompt/completion row
# (TRL trains the completion from the end of the generation prompt on) ...
ALPACA_PIECES = {
    "chatml": [
        (
            "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
            "<|im_start|>user\n",
            0,
            0,
        ),
        ("Add 2 and 3.", 0, 1),
        ("\n\nBe quick.<|im_end|>\n<|im_start|>assistant\n", 0, 0),
        ("5<|im_end|>\n", 1, 0),
    ],
    "llama3": [
        ("<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n", 0, 0),
        ("Add 2 and 3.", 0, 1),
        ("\n\nBe quick.<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n", 0, 0),
        ("5<|eot_id|>", 1, 0),
    ],
    "qwen2.5": [
        (
            "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"
            "<|im_start|>user\n",
            0,
            0,
        ),
        ("Add 2 and 3.", 0, 1),
        ("\n\nBe quick.<|im_end|>\n<|im_start|>assistant\n", 0, 0),
        ("5<|im_end|>\n", 1, 0),
    ],
    "phi3": [
        ("<|user|>\n", 0, 0),
        ("Add 2 and 3.", 0, 1),
        ("\n\nBe quick.<|end|>\n<|assistant|>\n", 0, 0),
        ("5<|end|>\n<|endoftext|>", 1, 0),
    ],
    "gemma": [
        ("<bos><start_of_turn>user\n", 0, 0),
        ("Add 2 and 3.", 0, 1),
        ("\n\nBe quick.<end_of_turn>\n<start_of_turn>model\n", 0, 0),
        ("5<end_of_turn>\n", 1, 0),
    ],
    "mistral": [
        ("<s>[INST] ", 0, 0),
        ("Add 2 and 3.", 0, 1),
        ("\n\nBe quick. [/INST]", 0, 0),
        ("5</s>", 1, 0),
    ],
}

# ... and the system + two-turn conversation under assistant-only loss (content and end-of-turn token train; the
# instruction is the last user turn).
CONVERSATION = [SYSTEM, *TURNS]
CONVERSATION_PIECES = {
    "chatml": [
        (
            "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n",
            0,
            0,
        ),
        ("Four.<|im_end|>", 1, 0),
        ("\n<|im_start|>user\n", 0, 0),
        ("Again?", 0, 1),
        ("<|im_end|>\n<|im_start|>assistant\n", 0, 0),
        ("Two.<|im_end|>", 1, 0),
        ("\n", 0, 0),
    ],
    "llama3": [
        (
            "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
            "<|start_header_id|>user<|end_header_id|>\n\nHi there<|eot_id|>"
            "<|start_header_id|>assistant<|end_header_id|>\n\n",
            0,
            0,
        ),
        ("Four.<|eot_id|>", 1, 0),
        ("<|start_header_id|>user<|end_header_id|>\n\n", 0, 0),
        ("Again?", 0, 1),
        ("<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n", 0, 0),
        ("Two.<|eot_id|>", 1, 0),
    ],
    "phi3": [
        ("<|system|>\nBe brief.<|end|>\n<|user|>\nHi there<|end|>\n<|assistant|>\n", 0, 0),
        ("Four.<|end|>", 1, 0),
        ("\n<|user|>\n", 0, 0),
        ("Again?", 0, 1),
        ("<|end|>\n<|assistant|>\n", 0, 0),
        ("Two.<|end|>\n<|endoftext|>", 1, 0),  # the EOS that closes the conversation trains
    ],
    "gemma": [
        ("<bos><start_of_turn>user\nBe brief.\n\nHi there<end_of_turn>\n<start_of_turn>model\n", 0, 0),
        ("Four.<end_of_turn>", 1, 0),
        ("\n<start_of_turn>user\n", 0, 0),
        ("Again?", 0, 1),
        ("<end_of_turn>\n<start_of_turn>model\n", 0, 0),
        ("Two.<end_of_turn>", 1, 0),
        ("\n", 0, 0),
    ],
    "mistral": [
        ("<s>[INST] Be brief.\n\nHi there [/INST]", 0, 0),
        ("Four.</s>", 1, 0),
        ("[INST] ", 0, 0),
        ("Again?", 0, 1),
        (" [/INST]", 0, 0),
        ("Two.</s>", 1, 0),
    ],
}
CONVERSATION_PIECES["qwen2.5"] = CONVERSATION_PIECES["chatml"]


def expected(tokenizer, pieces):
    input_ids, labels, instruction = [], [], []
    for text, trained, is_instruction in pieces:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        input_ids += ids
        labels += ids if trained else [-100] * len(ids)
        instruction += [is_instruction] * len(ids)
    return input_ids, labels, instruction


@pytest.mark.parametrize("template", CHAT_TEMPLATE_NAMES)
def test_alpaca_rows_and_instruction_span(output_dir, template):
    trainer = build(SpanTrainer, template, config(output_dir), Dataset.from_list([ALPACA]))
    input_ids, labels, instruction = expected(trainer.processing_class, ALPACA_PIECES[template])
    row = trainer.train_dataset[0]
    assert row["input_ids"] == input_ids
    assert row["labels"] == labels
    assert row["instruction_mask"] == instruction
    # The same as TRL on the equivalent conversational prompt/completion row.
    converted = {"prompt": single_turn(ALPACA["instruction"] + "\n\nBe quick.", "5")[:1]}
    converted["completion"] = [{"role": "assistant", "content": "5"}]
    reference = build(SFTTrainer, template, config(output_dir), Dataset.from_list([converted]))
    assert rows(trainer.train_dataset) == rows(reference.train_dataset)


@pytest.mark.parametrize("template", CHAT_TEMPLATE_NAMES)
def test_assistant_only_loss_without_markers(output_dir, template):
    args = config(output_dir, assistant_only_loss=True)
    trainer = build(SpanTrainer, template, args, Dataset.from_list([{"messages": CONVERSATION}]))
    assert args.assistant_only_loss is True  # the user's config is left as given
    input_ids, labels, instruction = expected(trainer.processing_class, CONVERSATION_PIECES[template])
    row = trainer.train_dataset[0]
    assert row["input_ids"] == input_ids
    assert row["labels"] == labels
    assert row["instruction_mask"] == instruction
    # TRL on the same template with `{% generation %}` markers around the same text agrees.
    reference = build(SFTTrainer, template, args, Dataset.from_list([{"messages": CONVERSATION}]), markers=True)
    assert rows(trainer.train_dataset) == rows(reference.train_dataset)


@pytest.mark.parametrize("template", ["chatml", "phi3", "mistral"])
def test_assistant_only_loss_without_markers_on_chat_prompt_completion(output_dir, template):
    train = Dataset.from_list([{"prompt": [SYSTEM, *TURNS[:3]], "completion": TURNS[3:]}])
    args = config(output_dir, assistant_only_loss=True)
    ours = build(RobustSFTTrainer, template, args, train)
    reference = build(SFTTrainer, template, args, train, markers=True)
    assert rows(ours.train_dataset) == rows(reference.train_dataset)


def test_instruction_span_follows_truncation(output_dir):
    train = Dataset.from_list([dict(ALPACA, output="Five, since two plus three is five.")])
    full = build(SpanTrainer, "llama3", config(output_dir), train).train_dataset[0]
    cut = len(full["input_ids"]) - 4  # inside the completion, so keep_start still trains a token
    for mode, window in (("keep_start", slice(None, cut)), ("keep_end", slice(-cut, None))):
        args = config(output_dir, max_length=cut, truncation_mode=mode)
        row = build(SpanTrainer, "llama3", args, train).train_dataset[0]
        assert row["input_ids"] == full["input_ids"][window]
        assert row["instruction_mask"] == full["instruction_mask"][window]
        assert sum(row["instruction_mask"]) == sum(full["instruction_mask"])


def test_method_default_assistant_only_loss(output_dir, caplog):
    class AssistantOnly(RobustSFTTrainer):
        _assistant_only_loss_default = True

    args = config(output_dir)
    trainer = build(AssistantOnly, "gemma", args, Dataset.from_list([{"messages": CONVERSATION}]))
    assert args.assistant_only_loss is False
    _, labels, _ = expected(trainer.processing_class, CONVERSATION_PIECES["gemma"])
    assert trainer.train_dataset[0]["labels"] == labels
    assert "assistant turns only" in caplog.text


def test_alpaca_rows_in_an_iterable_dataset(output_dir):
    rows_list = [ALPACA, dict(ALPACA, instruction="Add 4 and 4.", output="8")]
    listed = build(RobustSFTTrainer, "qwen2.5", config(output_dir), Dataset.from_list(rows_list))
    stream = Dataset.from_list(rows_list).to_iterable_dataset()
    streamed = build(RobustSFTTrainer, "qwen2.5", config(output_dir, max_steps=1), stream)
    assert rows(streamed.train_dataset) == rows(listed.train_dataset)
