"""ANIT: noisy instructions in the tokenized data, the adversarial step against a manual computation, exact loss
equivalences (weight 0 == plain SFT, gradient accumulation), training and the config's refusals."""

import copy

import pytest
import torch
from datasets import Dataset
from peft import LoraConfig

from robust_sft import RobustSFTTrainer
from robust_sft.anit import ANITConfig, ANITTrainer, nrm_scale
from robust_sft.testing import make_tiny_model

from .conftest import train_args

ROWS = [
    {
        "instruction": f"Classify the sentiment of review {i} as positive or negative.",
        "input": "a great film" if i % 2 else "a dull film",
        "output": "positive" if i % 2 else "negative",
    }
    for i in range(8)
]


def anit_args(tmp_path, **overrides):
    values = {
        "config_class": ANITConfig,
        "distortion_metric": "levenshtein",
        "per_device_train_batch_size": 4,
        **overrides,
    }
    return train_args(tmp_path, **values)


def lora():
    return LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear")


def make_trainer(tmp_path, tokenizer, model=None, rows=ROWS, peft=True, **config):
    return ANITTrainer(
        model=model if model is not None else make_tiny_model("llama", tokenizer),
        args=anit_args(tmp_path, **config),
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
        peft_config=lora() if peft else None,
    )


def first_batch(trainer, size=4):
    return trainer.data_collator([trainer.train_dataset[i] for i in range(size)])


# ---------------------------------------------------------------------------------------------- config
@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"neftune_noise_alpha": 5.0}, "neftune_noise_alpha cannot be combined"),
        ({"use_noise": False, "use_adversarial": False}, "plain SFT"),
        ({"noise_operators": ["typo"]}, "Unknown noise operators"),
        ({"gradient_checkpointing_kwargs": {"use_reentrant": True}}, "use_reentrant"),
        ({"noise_rate": 1.5}, r"noise_rate must be in \[0, 1\]"),
        ({"adversarial_scope": "answer"}, "adversarial_scope must be one of"),
        ({"nrm_map": "log"}, "nrm_map must be one of"),
    ],
)
def test_config_refuses_incompatible_options(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        anit_args(tmp_path, **overrides)


def test_neftune_with_noise_only_is_allowed(tmp_path):
    assert anit_args(tmp_path, neftune_noise_alpha=5.0, use_adversarial=False).neftune_noise_alpha == 5.0


def test_nrm_maps():
    d = torch.tensor([0.0, 0.5, 1.0])
    assert nrm_scale(d, "linear", 2.0).tolist() == [1.0, 2.0, 3.0]
    assert nrm_scale(d, "exp", 1.0).tolist() == pytest.approx([1.0, 1.6487213, 2.7182818])
    assert nrm_scale(d, "constant").tolist() == [1.0, 1.0, 1.0]


# ---------------------------------------------------------------------------------------------- noisy data
def test_noisy_instructions_are_what_the_model_reads(tmp_path, tokenizer):
    trainer = make_trainer(tmp_path, tokenizer, noise_rate=1.0, noise_operators=["cut"], noise_strength=0.5)
    log = trainer.noise_log
    assert log["operator"] == ["cut"] * len(ROWS)
    for index, row in enumerate(ROWS):
        words = row["instruction"].split()
        expected = " ".join(words[: len(words) - round(len(words) / 2)])
        assert log[index]["noisy_instruction"] == expected
        text = tokenizer.decode(trainer.train_dataset[index]["input_ids"])
        assert expected + "\n\n" + row["input"] in text and row["instruction"] not in text
        assert trainer.train_dataset[index]["distortion"] == pytest.approx(log[index]["distortion"])
        assert 0.0 < log[index]["distortion"] <= 1.0
        # the instruction mask covers the noisy instruction exactly
        ids, mask = trainer.train_dataset[index]["input_ids"], trainer.train_dataset[index]["instruction_mask"]
        assert tokenizer.decode([t for t, m in zip(ids, mask) if m]).strip() == expected


def test_noise_rate_and_seed(tmp_path, tokenizer):
    clean = make_trainer(tmp_path / "a", tokenizer, noise_rate=0.0)
    assert clean.noise_log["operator"] == [""] * 8 and clean.noise_log["distortion"] == [0.0] * 8
    half = make_trainer(tmp_path / "b", tokenizer, noise_rate=0.5)
    again = make_trainer(tmp_path / "c", tokenizer, noise_rate=0.5)
    other_seed = make_trainer(tmp_path / "d", tokenizer, noise_rate=0.5, seed=1)
    assert half.noise_log.to_list() == again.noise_log.to_list()
    assert half.noise_log["noisy_instruction"] != other_seed.noise_log["noisy_instruction"]
    noisy = [row for row in half.noise_log if row["operator"]]
    assert 0 < len(noisy) < 8
    assert all(row["noisy_instruction"] != row["instruction"] for row in noisy)
    assert all(row["distortion"] == 0.0 for row in half.noise_log if not row["operator"])


def test_evaluation_data_stays_clean(tmp_path, tokenizer):
    trainer = ANITTrainer(
        model=make_tiny_model("llama", tokenizer),
        args=anit_args(tmp_path, noise_rate=1.0, eval_strategy="no"),
        train_dataset=Dataset.from_list(ROWS),
        eval_dataset=Dataset.from_list(ROWS[:2]),
        processing_class=tokenizer,
        peft_config=lora(),
    )
    for index in range(2):
        assert ROWS[index]["instruction"] in tokenizer.decode(trainer.eval_dataset[index]["input_ids"])
        assert trainer.eval_dataset[index]["distortion"] == 0.0
    metrics = trainer.evaluate()
    assert metrics["eval_loss"] > 0 and "eval_adversarial_loss" not in metrics


# ---------------------------------------------------------------------------------------------- adversarial step
def manual_gradient(model, embeds, batch):
    """d loss / d delta at delta = 0 with the model's own (logits) loss: a different normalisation, same direction."""
    delta = torch.zeros_like(embeds, requires_grad=True)
    loss = model(
        inputs_embeds=embeds + delta, attention_mask=batch["attention_mask"], labels=batch["labels"], use_cache=False
    ).loss
    return torch.autograd.grad(loss, delta)[0]


def test_adversarial_step_is_the_normalised_gradient_on_prompt_tokens(tmp_path, tokenizer):
    trainer = make_trainer(tmp_path, tokenizer, use_noise=False, adversarial_init_alpha=0.0, adversarial_eta=0.01)
    model = trainer.model
    model.train()
    batch = first_batch(trainer)
    model_inputs, extras = trainer._split_extras(batch)
    extras["distortion"] = torch.tensor([0.0, 0.5, 1.0, 0.25])
    embeds = model.get_input_embeddings()(batch["input_ids"]).detach()

    delta0, delta1 = trainer.adversarial_deltas(model, embeds, model_inputs, extras)

    prompt = (batch["labels"] == -100) & batch["attention_mask"].bool()
    assert torch.equal(trainer.perturbation_mask(batch), prompt.float())
    assert torch.count_nonzero(delta0) == 0
    gradient = manual_gradient(model, embeds, batch) * prompt.unsqueeze(-1)
    eta = 0.01 * (1 + extras["distortion"])
    expected = eta.view(-1, 1, 1) * gradient / gradient.flatten(1).norm(dim=1).view(-1, 1, 1)
    torch.testing.assert_close(delta1, expected, rtol=1e-4, atol=1e-9)
    assert torch.count_nonzero(delta1[~prompt]) == 0  # answer and padding tokens never move
    # every prompt token that precedes a trained token moves (one after the last answer token cannot matter)
    positions = torch.arange(batch["labels"].shape[1])
    last_trained = torch.stack([positions[row != -100].max() for row in batch["labels"]])
    upstream = prompt & (positions < last_trained.unsqueeze(1))
    assert (delta1[upstream].abs().sum(-1) > 0).all()
    torch.testing.assert_close(delta1.flatten(1).norm(dim=1), eta)


def test_random_start_is_bounded_and_scoped_to_the_instruction(tmp_path, tokenizer):
    trainer = make_trainer(
        tmp_path, tokenizer, use_noise=False, adversarial_init_alpha=5.0, adversarial_scope="instruction"
    )
    batch = first_batch(trainer)
    model_inputs, extras = trainer._split_extras(batch)
    embeds = trainer.model.get_input_embeddings()(batch["input_ids"]).detach()
    delta0, delta1 = trainer.adversarial_deltas(trainer.model, embeds, model_inputs, extras)
    instruction = batch["instruction_mask"].bool() & batch["attention_mask"].bool()
    assert torch.equal(trainer.perturbation_mask(batch), instruction.float())
    bound = 5.0 / torch.sqrt(instruction.sum(1) * embeds.shape[-1])
    assert (delta0.abs() <= bound.view(-1, 1, 1)).all()
    assert torch.count_nonzero(delta0[~instruction]) == 0 and torch.count_nonzero(delta1[~instruction]) == 0
    assert (delta0[instruction] != 0).any(-1).all()
    step = (delta1 - delta0).flatten(1).norm(dim=1)
    torch.testing.assert_close(step, torch.full_like(step, 1e-3))  # clean rows: h(0) = 1


def test_non_finite_adversarial_gradient_skips_the_term_and_is_counted(tmp_path, tokenizer):
    # An infinite random start makes the ascent gradient NaN: the term must be dropped, the clean loss kept.
    trainer = make_trainer(tmp_path, tokenizer, use_noise=False, adversarial_init_alpha=float("inf"))
    reference = RobustSFTTrainer(
        model=copy.deepcopy(trainer.model),
        args=train_args(tmp_path / "ref", per_device_train_batch_size=4),
        train_dataset=Dataset.from_list(ROWS),
        processing_class=tokenizer,
    )
    trainer.model.train()
    batch = first_batch(trainer)
    loss = trainer.compute_loss(trainer.model, dict(batch), num_items_in_batch=None)
    assert torch.isfinite(loss)
    assert trainer.adversarial_skipped == 1
    assert trainer._metrics["train"]["adversarial_skipped"] == [1.0]
    assert "adversarial_loss" not in trainer._metrics["train"]
    expected = reference.compute_loss(reference.model, first_batch(reference), num_items_in_batch=None)
    torch.testing.assert_close(loss, expected)


# ---------------------------------------------------------------------------------------------- loss identities
def test_weight_zero_equals_plain_sft_exactly(tmp_path, tokenizer):
    base = make_tiny_model("llama", tokenizer)
    anit = make_trainer(
        tmp_path / "anit", tokenizer, model=copy.deepcopy(base), use_noise=False, adversarial_weight=0.0
    )
    plain = RobustSFTTrainer(
        model=copy.deepcopy(base),
        args=train_args(tmp_path / "plain", per_device_train_batch_size=4),
        train_dataset=Dataset.from_list(ROWS),
        processing_class=tokenizer,
        peft_config=lora(),
    )
    losses, grads = [], []
    for trainer in (anit, plain):
        trainer.model.train()
        batch = first_batch(trainer)
        items = int((batch["labels"][:, 1:] != -100).sum())
        loss = trainer.compute_loss(trainer.model, batch, num_items_in_batch=torch.tensor(items))
        loss.backward()
        losses.append(loss.detach())
        grads.append({n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.requires_grad})
    assert "adversarial_loss" in anit._metrics["train"]  # the term was computed, with weight 0
    assert torch.equal(losses[0], losses[1])
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 0
    for name in grads[0]:
        assert torch.equal(grads[0][name], grads[1][name]), name


def train_one_step(tmp_path, tokenizer, batch_size, accumulation):
    torch.manual_seed(0)
    trainer = make_trainer(
        tmp_path,
        tokenizer,
        rows=ROWS[:4],
        noise_rate=0.5,
        adversarial_init_alpha=0.0,  # no random start: the two splits would draw different noise
        adversarial_eta=0.05,
        max_steps=1,
        per_device_train_batch_size=batch_size,
        gradient_accumulation_steps=accumulation,
        optim="sgd",
        learning_rate=0.5,
        lr_scheduler_type="constant",
        max_grad_norm=0.0,
    )
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    trainer.train()
    after = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    return before, after, trainer.state.log_history[0]


def test_loss_is_invariant_to_the_gradient_accumulation_split(tmp_path, tokenizer):
    before, one_batch, log_one = train_one_step(tmp_path / "4x1", tokenizer, 4, 1)
    _, accumulated, log_two = train_one_step(tmp_path / "2x2", tokenizer, 2, 2)
    assert log_one["loss"] == pytest.approx(log_two["loss"], rel=1e-5)
    for metric in ("clean_loss", "adversarial_loss"):  # logged as the step's loss, not a micro-batch's share
        assert log_one[metric] == pytest.approx(log_two[metric], rel=1e-5)
    assert any(not torch.equal(before[n], one_batch[n]) for n in before)
    for name in one_batch:
        torch.testing.assert_close(one_batch[name], accumulated[name], rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------- training
def test_training_changes_lora_only_and_logs_the_adversarial_metric(tmp_path, tokenizer):
    trainer = make_trainer(tmp_path, tokenizer, noise_rate=0.5, max_steps=2, learning_rate=5e-2)
    trainable = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    frozen = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if not p.requires_grad}
    trainer.train()
    params = dict(trainer.model.named_parameters())
    assert all("lora_" in n for n in trainable)
    assert all(not torch.equal(params[n].detach(), value) for n, value in trainable.items() if "lora_B" in n)
    assert all(torch.equal(params[n].detach(), value) for n, value in frozen.items())
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logged) == 2
    for entry in logged:
        assert entry["adversarial_loss"] > 0 and entry["clean_loss"] > 0 and entry["adversarial_skipped"] == 0
        # one micro-batch per step: loss = clean + 1.0 * adversarial
        assert entry["loss"] == pytest.approx(entry["clean_loss"] + entry["adversarial_loss"], rel=1e-4)


def test_noise_only_ablation_has_no_adversarial_term(tmp_path, tokenizer):
    trainer = make_trainer(tmp_path, tokenizer, use_adversarial=False, noise_rate=1.0, max_steps=1)
    trainer.train()
    entry = trainer.state.log_history[0]
    assert "adversarial_loss" not in entry and entry["loss"] > 0
    assert all(trainer.noise_log["operator"])


def test_model_encoder_distortion(tmp_path, tokenizer):
    trainer = make_trainer(
        tmp_path, tokenizer, noise_rate=1.0, distortion_metric="mean", distortion_encoder="model", max_steps=1
    )
    log = trainer.noise_log
    assert all(0.0 < d <= 1.0 for d in log["distortion"])
    from robust_sft.anit import levenshtein_distortion

    rule = [levenshtein_distortion(a, b) for a, b in zip(log["instruction"], log["noisy_instruction"])]
    assert log["distortion"] != pytest.approx(rule)  # the model half contributes


# ---------------------------------------------------------------------------------------------- command line
def test_cli_train_anit_and_perturb(tmp_path, capsys):
    import json

    from robust_sft.cli import main
    from robust_sft.testing import save_tiny_model

    base_dir = save_tiny_model(str(tmp_path / "base"))
    data = tmp_path / "rows.jsonl"
    data.write_text("\n".join(json.dumps(row) for row in ROWS))
    out = tmp_path / "run"
    command = ["train", "anit", "--dataset_name", str(data), "--model_name_or_path", base_dir,
               "--output_dir", str(out),
               "--max_steps", "1", "--per_device_train_batch_size", "4", "--use_peft", "--lora_r", "4",
               "--noise_rate", "1.0", "--noise_operators", "cut", "opposite", "--distortion_metric", "levenshtein",
               "--report_to", "none", "--save_strategy", "no", "--gradient_checkpointing", "false"]  # fmt: skip
    assert main(command) == 0
    assert (out / "adapter_config.json").is_file()
    capsys.readouterr()

    assert main(["perturb", "Is the review positive?", "--operators", "opposite,cut", "--rate", "0.5", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [row["operator"] for row in rows] == ["opposite", "cut"]
    assert rows[0]["noisy"] == "Is the review negative?"
    assert rows[1]["noisy"] == "Is the"
    assert rows[1]["levenshtein"] == pytest.approx(round(len(" review positive?") / len("Is the review positive?"), 4))
    assert main(["perturb", "Sort the list.", "--operators", "cut"]) == 0
    assert "cut" in capsys.readouterr().out
