"""DELIA: exact mixing counts, build_cache (batched == one by one, resume after interruption, bad rows), the new
token's embedding (initialised, trained, saved and reloaded), per-source losses and weights."""

import json
import logging

import pytest
import torch
from datasets import Dataset
from peft import LoraConfig

from robust_sft.data import DataFormatError
from robust_sft.delia import (
    DELIAConfig,
    DELIATrainer,
    Query,
    add_special_tokens,
    build_cache,
    load_diverse_dataset,
    load_dsft_model,
    one_shot_messages,
    read_queries,
    render_prompt,
)
from robust_sft.testing import make_tiny_model, make_tiny_tokenizer, save_tiny_model

from .conftest import train_args

TASK = [{"instruction": f"Condense: item {i} is red.", "output": f"item {i} <sep> red"} for i in range(10)]
DIVERSE = [
    {"messages": [{"role": "user", "content": f"Tell me fact {i}."}, {"role": "assistant", "content": f"Fact {i}."}]}
    for i in range(30)
]


def dsft_args(tmp_path, **overrides):
    return train_args(tmp_path, **{"config_class": DELIAConfig, "per_device_train_batch_size": 4, **overrides})


def make_trainer(tmp_path, tokenizer, model=None, diverse=DIVERSE, task=TASK, peft=True, **config):
    return DELIATrainer(
        model=model if model is not None else make_tiny_model("llama", tokenizer),
        args=dsft_args(tmp_path, **config),
        train_dataset=Dataset.from_list(task),
        diverse_dataset=Dataset.from_list(diverse) if diverse is not None else None,
        processing_class=tokenizer,
        peft_config=LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear") if peft else None,
    )


# ---------------------------------------------------------------------------------------------- mixing
@pytest.mark.parametrize(("ratio", "diverse_rows"), [(2.0, 20), (0.5, 5), (5.0, 30), (0.0, 0)])
def test_mixed_set_has_exactly_the_expected_rows(tmp_path, tokenizer, ratio, diverse_rows, caplog):
    with caplog.at_level(logging.WARNING, logger="robust_sft.delia"):
        trainer = make_trainer(tmp_path, tokenizer, diverse_ratio=ratio)
    data = trainer.train_dataset
    assert len(data) == len(TASK) + diverse_rows == len(TASK) + min(len(DIVERSE), int(len(TASK) * ratio))
    assert sum(source == 1 for source in data["source"]) == diverse_rows
    task_texts = sorted(tokenizer.decode(ids) for ids, s in zip(data["input_ids"], data["source"]) if s == 0)
    assert len(task_texts) == len(TASK)
    for row in TASK:  # every task row is present, once
        assert sum(row["instruction"] in text for text in task_texts) == 1
    assert ("no upsampling" in caplog.text or "without upsampling" in caplog.text) == (ratio == 5.0)


def test_rows_dropped_by_truncation_are_counted_and_reported(tmp_path, tokenizer, caplog):
    # `messages` rows train the whole sequence (as in TRL), so only a prompt/completion row (here a task row) can
    # lose every trained token to truncation; TRL's preparation drops it and the base trainer says so.
    long_prompt = {"instruction": "word " * 200, "output": "Ok."}
    with caplog.at_level(logging.WARNING):
        trainer = make_trainer(
            tmp_path, tokenizer, task=[*TASK[:9], long_prompt], diverse=DIVERSE[:5], diverse_ratio=0.5, max_length=64
        )
    assert trainer.mix_counts == {"task": 9, "diverse": 4}  # int(9 trained task rows x 0.5)
    assert len(trainer.train_dataset) == 13
    assert "1 of 10 rows of the train task rows dataset were dropped" in caplog.text
    assert "Raise max_length" in caplog.text


def test_mixing_is_deterministic_for_a_seed(tmp_path, tokenizer):
    first = make_trainer(tmp_path / "a", tokenizer, diverse_ratio=1.0).train_dataset["input_ids"]
    again = make_trainer(tmp_path / "b", tokenizer, diverse_ratio=1.0).train_dataset["input_ids"]
    other = make_trainer(tmp_path / "c", tokenizer, diverse_ratio=1.0, seed=1).train_dataset["input_ids"]
    assert first == again and first != other


def test_evaluation_has_task_rows_only(tmp_path, tokenizer):
    trainer = DELIATrainer(
        model=make_tiny_model("llama", tokenizer),
        args=dsft_args(tmp_path, diverse_ratio=3.0),
        train_dataset=Dataset.from_list(TASK),
        eval_dataset=Dataset.from_list(TASK[:4]),
        diverse_dataset=Dataset.from_list(DIVERSE),
        processing_class=tokenizer,
    )
    assert len(trainer.eval_dataset) == 4 and set(trainer.eval_dataset["source"]) == {0}
    metrics = trainer.evaluate()
    assert metrics["eval_task_loss"] == pytest.approx(metrics["eval_loss"], rel=1e-5)
    assert "eval_diverse_loss" not in metrics


def test_missing_diverse_data_is_refused_clearly(tmp_path, tokenizer):
    with pytest.raises(ValueError, match="needs `diverse_dataset`"):
        make_trainer(tmp_path, tokenizer, diverse=None)
    with pytest.raises(FileNotFoundError, match="build-cache"):
        load_diverse_dataset(tmp_path / "no-cache.jsonl")


# ---------------------------------------------------------------------------------------------- losses
def test_per_source_losses_are_logged_and_parameters_change(tmp_path, tokenizer):
    trainer = make_trainer(tmp_path, tokenizer, diverse_ratio=1.0, max_steps=3, learning_rate=5e-2)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    trainer.train()
    after = dict(trainer.model.named_parameters())
    assert all(not torch.equal(after[n].detach(), value) for n, value in before.items() if "lora_B" in n)
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert any("task_loss" in entry for entry in logged) and any("diverse_loss" in entry for entry in logged)


def test_source_weights_reweight_tokens_exactly(tmp_path, tokenizer):
    trainer = make_trainer(tmp_path, tokenizer, diverse_ratio=1.0, diverse_weight=0.0, task_weight=1.0)
    trainer.model.train()
    rows = [trainer.train_dataset[i] for i in range(8)]
    batch = trainer.data_collator(rows)
    assert set(batch["source"].tolist()) == {0, 1}
    items = torch.tensor(int((batch["labels"][:, 1:] != -100).sum()))
    weighted = trainer.compute_loss(trainer.model, dict(batch), num_items_in_batch=items)
    # Reference: the diverse rows' labels masked out, same normaliser, unit weights.
    masked = dict(batch)
    masked["labels"] = batch["labels"].clone()
    masked["labels"][batch["source"] == 1] = -100
    trainer.args.diverse_weight = 1.0
    reference = trainer.compute_loss(trainer.model, masked, num_items_in_batch=items)
    torch.testing.assert_close(weighted, reference)
    with pytest.raises(ValueError, match="must be >= 0"):
        dsft_args(tmp_path, diverse_weight=-1.0)


# ---------------------------------------------------------------------------------------------- new tokens
def test_new_token_row_is_the_mean_embedding_and_the_matrix_is_padded(tokenizer):
    tokenizer = make_tiny_tokenizer()  # a private copy: tokens are added
    model = make_tiny_model("llama", tokenizer)
    old_input = model.get_input_embeddings().weight.detach().clone()
    old_output = model.get_output_embeddings().weight.detach().clone()
    (new_id,) = add_special_tokens(model, tokenizer, ["<sep>"], pad_to_multiple_of=64)
    assert new_id == len(tokenizer) - 1 == old_input.shape[0]
    assert model.get_input_embeddings().weight.shape[0] == 448  # 401 rounded up to a multiple of 64
    assert torch.equal(model.get_input_embeddings().weight[new_id], old_input.mean(0))
    assert torch.equal(model.get_output_embeddings().weight[new_id], old_output.mean(0))  # untied head too
    assert torch.equal(model.get_input_embeddings().weight[:new_id], old_input)
    assert tokenizer.tokenize("a <sep> b").count("<sep>") == 1
    assert add_special_tokens(model, tokenizer, ["<sep>"]) == [new_id]  # idempotent
    assert model.get_input_embeddings().weight.shape[0] == 448


def test_new_token_trains_and_survives_save_and_reload(tmp_path, caplog):
    tokenizer = make_tiny_tokenizer()
    base_dir = save_tiny_model(str(tmp_path / "base"))
    from transformers import AutoModelForCausalLM

    with caplog.at_level(logging.WARNING, logger="robust_sft.delia"):
        trainer = DELIATrainer(
            model=AutoModelForCausalLM.from_pretrained(base_dir),
            args=dsft_args(tmp_path / "run", new_special_tokens=["<sep>"], max_steps=3, learning_rate=5e-2),
            train_dataset=Dataset.from_list(TASK),
            diverse_dataset=Dataset.from_list(DIVERSE),
            processing_class=tokenizer,
            peft_config=LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear"),
        )
    assert "reads the new tokens but does not learn to write them" in caplog.text
    (sep,) = trainer.new_token_ids
    embedding = trainer.model.get_input_embeddings()
    start = embedding(torch.tensor([sep])).detach().clone()
    output_row = trainer.model.get_output_embeddings().weight[sep].detach().clone()
    trainer.train()
    trained = embedding(torch.tensor([sep])).detach().clone()
    assert not torch.equal(start, trained)
    # The limitation the warning names: LoRA leaves the output row of the new token where it started.
    assert torch.equal(trainer.model.get_output_embeddings().weight[sep].detach(), output_row)
    seen = {token for ids in trainer.train_dataset["input_ids"] for token in ids}
    unused = torch.tensor([min(set(range(len(tokenizer))) - seen)])  # a token no training row contains
    base_embedding = AutoModelForCausalLM.from_pretrained(base_dir).get_input_embeddings()
    assert torch.equal(embedding(unused).detach(), base_embedding(unused))
    trainer.save_model(str(tmp_path / "adapter"))

    reloaded, reloaded_tokenizer = load_dsft_model(base_dir, tmp_path / "adapter")
    assert reloaded_tokenizer.convert_tokens_to_ids("<sep>") == sep
    torch.testing.assert_close(reloaded.get_input_embeddings()(torch.tensor([sep])), trained)
    ids = torch.tensor([reloaded_tokenizer("item 3 <sep> red")["input_ids"]])
    trainer.model.eval()
    reloaded.eval()
    torch.testing.assert_close(reloaded(input_ids=ids).logits, trainer.model(input_ids=ids).logits)


def test_full_finetuning_trains_the_new_row(tmp_path):
    tokenizer = make_tiny_tokenizer()
    trainer = make_trainer(
        tmp_path, tokenizer, peft=False, new_special_tokens=["<sep>"], max_steps=2, learning_rate=1e-2
    )
    (sep,) = trainer.new_token_ids
    start = trainer.model.get_input_embeddings().weight[sep].detach().clone()
    output_row = trainer.model.get_output_embeddings().weight[sep].detach().clone()
    trainer.train()
    assert not torch.equal(trainer.model.get_input_embeddings().weight[sep].detach(), start)
    assert not torch.equal(trainer.model.get_output_embeddings().weight[sep].detach(), output_row)


# ---------------------------------------------------------------------------------------------- build_cache
QUERIES = [Query(f"Name thing number {i}.", f"Thing {i}.") for i in range(5)]


def sharp_tiny_model(tokenizer):
    """The tiny model with larger weights, so greedy decoding has no near-ties that padding noise could flip."""
    model = make_tiny_model("llama", tokenizer)
    with torch.no_grad():
        model.lm_head.weight.mul_(50)
    return model


def cache_rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_prompt_is_the_papers_one_shot_with_a_generation_prompt(tokenizer):
    query = Query("What is 2+2?", "4")
    messages = one_shot_messages(query, system_prompt="Be brief.")
    assert [turn["role"] for turn in messages] == ["system", "user", "assistant", "user"]
    assert messages[1]["content"] == messages[3]["content"] == "What is 2+2?" and messages[2]["content"] == "4"
    rendered = render_prompt(tokenizer, messages)
    assert rendered.endswith("<|im_start|>assistant\n") and rendered.count("What is 2+2?") == 2
    assert [turn["role"] for turn in one_shot_messages(Query("Hi"))] == ["user"]


def test_templates_without_a_system_role_get_it_folded(tokenizer):
    strict = make_tiny_tokenizer()
    strict.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
        "{% endif %}<{{ m['role'] }}>{{ m['content'] }}</s>{% endfor %}{% if add_generation_prompt %}<assistant>"
        "{% endif %}"
    )
    rendered = render_prompt(strict, one_shot_messages(Query("Q?", "A."), system_prompt="Be brief."))
    assert rendered == "<user>Be brief.\n\nQ?</s><assistant>A.</s><user>Q?</s><assistant>"


def test_batched_cache_equals_one_by_one_greedy_generation(tmp_path, tokenizer):
    model = sharp_tiny_model(tokenizer)
    options = dict(do_sample=False, max_new_tokens=8)
    batched = build_cache(model, tokenizer, QUERIES, tmp_path / "batched.jsonl", batch_size=3, **options)
    single = build_cache(model, tokenizer, QUERIES, tmp_path / "single.jsonl", batch_size=1, **options)
    rows_batched, rows_single = cache_rows(batched), cache_rows(single)
    assert rows_batched == rows_single and len(rows_batched) == 5
    assert [row["messages"][0]["content"] for row in rows_batched] == [q.text for q in QUERIES]
    assert all(row["messages"][1]["role"] == "assistant" for row in rows_batched)
    assert any(row["messages"][1]["content"] for row in rows_batched)
    # what DELIATrainer reads back
    assert load_diverse_dataset(batched).column_names == ["messages"]


def test_interrupted_cache_resumes_without_duplicates_or_losses(tmp_path, tokenizer):
    model = sharp_tiny_model(tokenizer)
    options = dict(do_sample=False, max_new_tokens=6, batch_size=2)
    reference = cache_rows(build_cache(model, tokenizer, QUERIES, tmp_path / "reference.jsonl", **options))

    path = tmp_path / "cache.jsonl"
    generate, calls = model.generate, []

    def failing_generate(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt  # the run is stopped while its second batch is in flight
        return generate(*args, **kwargs)

    model.generate = failing_generate
    with pytest.raises(KeyboardInterrupt):
        build_cache(model, tokenizer, QUERIES, path, **options)
    model.generate = generate
    assert len(cache_rows(path)) == 2
    with open(path, "a") as handle:  # and a row cut off mid-write
        handle.write('{"messages": [{"role": "user", "con')
    build_cache(model, tokenizer, QUERIES, path, **options)
    rows = cache_rows(path)
    assert rows == reference
    build_cache(model, tokenizer, QUERIES + QUERIES[:2], path, **options)  # nothing new to do
    assert cache_rows(path) == reference


def test_malformed_queries_name_the_row(tmp_path):
    with pytest.raises(DataFormatError, match="Query 1 is empty"):
        read_queries(["fine", "  "])
    rows = [{"question": "q0", "answer": "a0"}, {"question": "q1", "answer": "a1"}, {"question": None, "answer": "a"}]
    with pytest.raises(DataFormatError, match="Row 2: field `question` is missing"):
        read_queries(rows, query_field="question", answer_field="answer")
    assert read_queries(rows[:2], query_field="question", answer_field="answer")[1] == Query("q1", "a1")
    bad_chat = [DIVERSE[0], {"messages": [{"role": "user", "content": "hi"}]}]
    with pytest.raises(DataFormatError, match="Row 1"):
        read_queries(bad_chat)
    alpaca = read_queries(TASK[:2])
    assert alpaca[0] == Query(TASK[0]["instruction"], TASK[0]["output"])


# ---------------------------------------------------------------------------------------------- command line
def test_cli_build_cache_then_train_delia(tmp_path, capsys):
    from robust_sft.cli import main

    base_dir = save_tiny_model(str(tmp_path / "base"))
    queries = tmp_path / "queries.jsonl"
    queries.write_text("\n".join(json.dumps({"question": q.text, "answer": q.reference}) for q in QUERIES))
    cache = tmp_path / "cache.jsonl"
    command = ["build-cache", "--queries", str(queries), "--output", str(cache), "--model", base_dir, "--limit", "4",
               "--query-field", "question", "--answer-field", "answer", "--max-new-tokens", "4"]  # fmt: skip
    assert main(command) == 0
    assert f"{cache}: 4 rows." in capsys.readouterr().out
    data = tmp_path / "task.jsonl"
    data.write_text("\n".join(json.dumps(row) for row in TASK))
    out = tmp_path / "run"
    command = ["train", "delia", "--dataset_name", str(data), "--model_name_or_path", base_dir,
               "--output_dir", str(out),
               "--max_steps", "1", "--per_device_train_batch_size", "4", "--use_peft", "--lora_r", "4",
               "--diverse_dataset", str(cache), "--diverse_ratio", "0.3", "--new_special_tokens", "<sep>",
               "--report_to", "none", "--save_strategy", "no", "--gradient_checkpointing", "false"]  # fmt: skip
    assert main(command) == 0
    assert (out / "adapter_config.json").is_file()
    assert "<sep>" in (out / "tokenizer.json").read_text()
    adapter = json.loads((out / "adapter_config.json").read_text())
    assert "model.embed_tokens" in adapter["target_modules"]


def test_self_instruct_seed_tasks_are_queries():
    from .conftest import SHARED_DATA

    queries = read_queries(f"{SHARED_DATA}/self_instruct/seed_tasks.jsonl")
    assert len(queries) == 175
    first = json.loads(open(f"{SHARED_DATA}/self_instruct/seed_tasks.jsonl").readline())
    assert queries[0] == Query(first["instruction"], first["instances"][0]["output"])
    with_input = next(q for q in queries if "\n\n" in q.text)
    assert with_input.reference
    with pytest.raises(DataFormatError, match="Row 1: field `instruction`"):
        read_queries([{"instruction": "a", "instances": []}, {"instruction": "", "instances": []}])
