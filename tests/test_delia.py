"""DELIA's trainer: exact mixing counts, per-source losses and weights, the new token's embedding (initialised,
trained, saved and reloaded). The cache (build_cache) is tested in test_delia_cache.py, its sampling engine in
test_delia_sampling.py."""

import logging

import pytest
import torch
from datasets import Dataset
from peft import LoraConfig

from robust_sft.delia import (
    DELIAConfig,
    DELIATrainer,
    add_special_tokens,
    load_diverse_dataset,
    load_dsft_model,
)
from robust_sft.testing import make_tiny_model, make_tiny_tokenizer

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


def test_the_diverse_count_has_no_float_truncation(tmp_path, tokenizer):
    task = [{"instruction": f"Condense: item {i} is red.", "output": f"item {i} red"} for i in range(25)]
    assert int(25 * 1.16) == 28  # what float arithmetic gives
    trainer = make_trainer(tmp_path, tokenizer, task=task, diverse_ratio=1.16)
    assert trainer.mix_counts == {"task": 25, "diverse": 29}


def test_losses_that_bypass_the_source_weights_are_refused(tmp_path, tokenizer):
    with pytest.raises(ValueError, match="label_smoothing_factor=0.1"):
        dsft_args(tmp_path, diverse_weight=0.5, label_smoothing_factor=0.1)
    with pytest.raises(ValueError, match="loss_type='dft'"):
        dsft_args(tmp_path, task_weight=2.0, loss_type="dft")
    with pytest.raises(ValueError, match="compute_loss_func replaces TRL's loss"):
        DELIATrainer(
            model=make_tiny_model("llama", tokenizer),
            args=dsft_args(tmp_path, diverse_weight=0.5),
            train_dataset=Dataset.from_list(TASK),
            diverse_dataset=Dataset.from_list(DIVERSE),
            processing_class=tokenizer,
            compute_loss_func=lambda outputs, labels, num_items_in_batch=None: outputs.logits.sum(),
        )
    dsft_args(tmp_path, label_smoothing_factor=0.1)  # unit weights: nothing to bypass
    with pytest.raises(ValueError, match="new_token_training must be in"):
        dsft_args(tmp_path, new_token_training="lm_head")


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


def tied_tiny_model(tokenizer):
    """The tiny model with its LM head tied to the input embedding (as SmolLM2, Gemma, ...)."""
    model = make_tiny_model("llama", tokenizer)
    model.config.tie_word_embeddings = True
    model.tie_weights()
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    return model


@pytest.mark.parametrize(
    ("new_token_training", "tied"),
    [("trainable_tokens", False), ("trainable_tokens", True), ("lora_embedding", False)],
)
def test_new_token_trains_and_survives_save_and_reload(tmp_path, caplog, new_token_training, tied):
    from transformers import AutoModelForCausalLM

    tokenizer = make_tiny_tokenizer()
    base_dir = str(tmp_path / "base")
    (tied_tiny_model(tokenizer) if tied else make_tiny_model("llama", tokenizer)).save_pretrained(base_dir)
    tokenizer.save_pretrained(base_dir)
    with caplog.at_level(logging.WARNING, logger="robust_sft.delia"):
        trainer = DELIATrainer(
            model=AutoModelForCausalLM.from_pretrained(base_dir),
            args=dsft_args(
                tmp_path / "run",
                new_special_tokens=["<sep>"],
                new_token_training=new_token_training,
                max_steps=3,
                learning_rate=5e-2,
            ),
            train_dataset=Dataset.from_list(TASK),  # answers contain <sep>: its output row gets a gradient
            diverse_dataset=Dataset.from_list(DIVERSE),
            processing_class=tokenizer,
            peft_config=LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear"),
        )
    writes = new_token_training == "trainable_tokens"
    assert ("does not learn to write them" in caplog.text) != writes
    (sep,) = trainer.new_token_ids
    embedding, head = trainer.model.get_input_embeddings(), trainer.model.get_output_embeddings()
    start = embedding(torch.tensor([sep])).detach().clone()
    output_rows = head.weight.detach().clone()
    trainer.train()
    trained = embedding(torch.tensor([sep])).detach().clone()
    assert not torch.equal(start, trained)
    # The output row of the new token: trained by trainable tokens, left at its start by LoRA on the embedding.
    assert torch.equal(head.weight[sep].detach(), output_rows[sep]) != writes
    others = [row for row in range(len(tokenizer)) if row != sep]
    if writes:  # and no other output row moved
        assert torch.equal(head.weight[others].detach(), output_rows[others])
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


def test_a_tokenizer_that_already_has_the_token_still_gets_rows():
    tokenizer = make_tiny_tokenizer()
    add_special_tokens(make_tiny_model("llama", make_tiny_tokenizer()), tokenizer, ["<sep>"])  # an earlier run's
    model = make_tiny_model("llama", make_tiny_tokenizer())  # a fresh base model: 400 rows, <sep> is id 400
    old = model.get_input_embeddings().weight.detach().clone()
    (sep,) = add_special_tokens(model, tokenizer, ["<sep>"])
    assert sep == 400 and model.get_input_embeddings().weight.shape[0] == 448
    assert torch.equal(model.get_input_embeddings().weight[sep], old.mean(0))
    logits = model(input_ids=torch.tensor([[5, sep]])).logits  # in range
    assert logits.shape[-1] == 448


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
