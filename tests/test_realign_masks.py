"""Safety realignment masks: every granularity trains, one mask sample per forward, masks saved and loaded as
safetensors and used in fusion, a shared mask over several task vectors, seeded DARE, LoRA compatibility checks,
the mask dtype, and clear errors."""

import pytest
import torch
from datasets import Dataset
from peft import LoraConfig, PeftModel, get_peft_model
from peft.utils import merge_utils
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

from robust_sft.realign import (
    ConcreteMask,
    SafetyRealignConfig,
    SafetyRealignTrainer,
    apply_task_vector,
    attach_masks,
    check_lora_compatibility,
    combine_task_vectors,
    fuse_task_vectors,
    load_masks,
    mask_values,
    masked_task_vector,
    save_masks,
    scaled_mask,
    task_vector_from_adapters,
    task_vector_from_models,
    zero_adapter,
)
from robust_sft.testing import save_tiny_model

from .test_realign import PAIRS, make_model_pair, realign_args, tiny_lora, weights


@pytest.fixture
def model_pair(tmp_path):
    return make_model_pair(tmp_path)


def make_trainer(safe_dir, vector, tmp_path, tokenizer, **overrides):
    return SafetyRealignTrainer(
        model=AutoModelForCausalLM.from_pretrained(safe_dir),
        task_vector=vector,
        args=realign_args(tmp_path, **overrides),
        train_dataset=Dataset.from_list(PAIRS),
        processing_class=tokenizer,
    )


def randomise(masks, seed=3):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for mask in masks.values():
            mask.logits.copy_(torch.randn(mask.logits.shape, generator=generator))


# ---------------------------------------------------------------------------------------------- granularities
@pytest.mark.parametrize("granularity", ["element", "row", "tensor"])
def test_every_granularity_trains(model_pair, tmp_path, tokenizer, granularity):
    """Plain SGD (Adam would turn even rounding noise into lr-sized moves): 3 DPO steps at lr 20 move every mask's
    logits by more than 1e-3 (a mean-normalised per-tensor mask got gradients of rounding size, ~1e-8 here)."""
    safe_dir, tuned_dir = model_pair
    vector = task_vector_from_models(safe_dir, tuned_dir)
    trainer = make_trainer(
        safe_dir,
        vector,
        tmp_path,
        tokenizer,
        mask_granularity=granularity,
        optim="sgd",
        learning_rate=20.0,
        lr_scheduler_type="constant",
        max_steps=3,
    )
    shapes = {"element": lambda s: s, "row": lambda s: (s[0], 1), "tensor": lambda s: (1, 1)}[granularity]
    assert all(tuple(m.logits.shape) == shapes(tuple(vector[n].shape)) for n, m in trainer.masks.items())
    before = {name: mask.logits.detach().clone() for name, mask in trainer.masks.items()}
    trainer.train()
    moved = {name: (mask.logits.detach() - before[name]).abs().max().item() for name, mask in trainer.masks.items()}
    assert min(moved.values()) > 1e-3, moved


def test_a_tensor_mask_has_a_real_gradient():
    """d lerp(W_safe, W_ft, m) / d logit = sigmoid'(logit) * (W_ft - W_safe) for one logit per tensor; divided by
    its own mean, the same mask is constant 1 and its gradient is rounding noise."""
    generator = torch.Generator().manual_seed(0)
    safe, tuned, upstream = (torch.randn(6, 5, generator=generator) for _ in range(3))
    mask = ConcreteMask(tuned, granularity="tensor", init_logit=0.3, export_mode="expected").eval()
    (mask(safe) * upstream).sum().backward()
    sigmoid = torch.sigmoid(torch.tensor(0.3))
    expected = sigmoid * (1 - sigmoid) * (upstream * (tuned - safe)).sum()
    torch.testing.assert_close(mask.logits.grad.reshape(()), expected, rtol=1e-5, atol=0)
    logit = torch.full((1, 1), 0.3, requires_grad=True)
    normalised = safe + scaled_mask(torch.sigmoid(logit).expand(6, 5)) * (tuned - safe)
    (normalised * upstream).sum().backward()
    assert logit.grad.abs().item() < 1e-6 * expected.abs().item()


# ---------------------------------------------------------------------------------------------- sampling
def test_one_mask_sample_per_forward_and_checkpointing_replays_it(tmp_path):
    _, model = tiny_lora(tmp_path)
    vector = {n.replace(".default", ""): p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}
    zero_adapter(model)
    masks = attach_masks(model, {n.removeprefix("base_model.model."): t for n, t in vector.items()})
    model.train()
    reads = {name: [] for name in masks}
    for name, mask in masks.items():
        mask.register_forward_hook(lambda module, args, output, name=name: reads[name].append(output.detach().clone()))
    input_ids = torch.tensor([[4, 8, 15, 16, 23, 42]])
    model(input_ids=input_ids)
    first = {name: list(outputs) for name, outputs in reads.items()}
    assert max(len(outputs) for outputs in first.values()) >= 2  # PEFT reads lora_A twice per forward
    assert all(torch.equal(outputs[0], output) for outputs in first.values() for output in outputs)
    model(input_ids=input_ids)
    assert all(not torch.equal(first[name][0], reads[name][len(first[name])]) for name in masks)

    def gradients(checkpointing):
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_disable()
        model.zero_grad()
        torch.manual_seed(7)
        model(input_ids=input_ids, labels=input_ids).loss.backward()
        return {name: mask.logits.grad.clone() for name, mask in masks.items()}

    plain, checkpointed = gradients(False), gradients(True)
    assert all(torch.allclose(plain[name], checkpointed[name], rtol=1e-5, atol=1e-8) for name in masks)
    assert any(plain[name].abs().sum() > 0 for name in masks)


# ---------------------------------------------------------------------------------------------- masks as files
def test_masks_are_saved_loaded_and_continue_training(model_pair, tmp_path, tokenizer):
    safe_dir, tuned_dir = model_pair
    vector = task_vector_from_models(safe_dir, tuned_dir)
    trainer = make_trainer(safe_dir, vector, tmp_path, tokenizer, max_steps=1)
    randomise(trainer.masks)
    path = save_masks(trainer.masks, tmp_path / "masks")
    assert path.name == "realign_masks.safetensors" and not list(path.parent.glob(".*tmp"))
    logits = load_masks(path)
    assert all(torch.equal(logits[name], mask.logits.detach()) for name, mask in trainer.masks.items())
    resumed = SafetyRealignTrainer(
        model=AutoModelForCausalLM.from_pretrained(safe_dir),
        task_vector=vector,
        args=realign_args(tmp_path, max_steps=1),
        train_dataset=Dataset.from_list(PAIRS),
        processing_class=tokenizer,
        masks=path,
    )
    assert all(torch.equal(resumed.masks[name].logits, logits[name]) for name in logits)
    resumed.train()  # continues from the loaded logits
    rows = make_trainer(safe_dir, vector, tmp_path, tokenizer, mask_granularity="row")
    with pytest.raises(ValueError, match="another mask granularity"):
        load_masks(path, into=rows.masks)
    save_file({"w": torch.ones(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="not a masks file"):
        load_masks(tmp_path / "other.safetensors")
    with pytest.raises(FileNotFoundError, match="No masks file"):
        load_masks(tmp_path / "missing")


def test_fusion_takes_trained_masks_files_and_values(model_pair, tmp_path, tokenizer):
    safe_dir, tuned_dir = model_pair
    vector = task_vector_from_models(safe_dir, tuned_dir)
    trainer = make_trainer(safe_dir, vector, tmp_path, tokenizer)
    randomise(trainer.masks)
    path = save_masks(trainer.masks, tmp_path / "masks.safetensors")
    fused = [
        fuse_task_vectors([vector], "task_arithmetic", weights=[1.0], masks=[source])
        for source in (trainer.masks, path, mask_values(trainer.masks))
    ]
    assert all(torch.equal(fused[0][name], other[name]) for other in fused[1:] for name in vector)
    realigned = apply_task_vector(AutoModelForCausalLM.from_pretrained(safe_dir), fused[0]).state_dict()
    trainer.export(tmp_path / "exported")
    exported = weights(tmp_path / "exported")
    for name in vector:  # the trainer's export and the task-vector route (fusion, then add) agree
        torch.testing.assert_close(realigned[name], exported[name], rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match="masks cover tensors the task vector lacks"):
        masked_task_vector({"other.weight": torch.ones(2, 2)}, path)
    with pytest.raises(ValueError, match="1 masks for 2 task vectors"):
        fuse_task_vectors([vector, vector], masks=[path])


def test_a_shared_mask_over_several_task_vectors(model_pair, tmp_path, tokenizer):
    safe_dir, tuned_dir = model_pair
    first = task_vector_from_models(safe_dir, tuned_dir)
    generator = torch.Generator().manual_seed(5)
    second = {name: 0.05 * torch.randn(delta.shape, generator=generator) for name, delta in first.items()}
    for weights_ in (None, [0.3, 0.7]):
        trainer = make_trainer(
            safe_dir, [first, second], tmp_path, tokenizer, max_steps=1, task_vector_weights=weights_
        )
        trainer.train()
        randomise(trainer.masks)
        path = save_masks(trainer.masks, tmp_path / "shared.safetensors")
        used = weights_ or [0.5, 0.5]
        fused = fuse_task_vectors([first, second], "task_arithmetic", weights=used, masks=[path, path])
        expected = apply_task_vector(AutoModelForCausalLM.from_pretrained(safe_dir), fused).state_dict()
        trainer.export(tmp_path / f"shared-{used[0]}")
        exported = weights(tmp_path / f"shared-{used[0]}")
        for name in first:
            torch.testing.assert_close(exported[name], expected[name], rtol=1e-6, atol=1e-7)
    combined = combine_task_vectors([first, second])
    assert all(torch.allclose(combined[n], (first[n] + second[n]) / 2, rtol=0, atol=1e-8) for n in first)
    with pytest.raises(ValueError, match="does not cover the same tensors"):
        combine_task_vectors([first, dict(list(second.items())[:1])])
    with pytest.raises(ValueError, match="1 weights for 2 task vectors"):
        make_trainer(safe_dir, [first, second], tmp_path, tokenizer, task_vector_weights=[1.0])


def test_dare_fusion_is_seeded():
    generator = torch.Generator().manual_seed(0)
    a, b = ({"w": torch.randn(16, 8, generator=generator)} for _ in range(2))
    state = torch.random.get_rng_state()
    first = fuse_task_vectors([a, b], "dare_linear", seed=11)
    assert torch.equal(torch.random.get_rng_state(), state)  # the global RNG is left as it was
    assert torch.equal(first["w"], fuse_task_vectors([a, b], "dare_linear", seed=11)["w"])
    assert not torch.equal(first["w"], fuse_task_vectors([a, b], "dare_linear", seed=12)["w"])
    torch.manual_seed(11)
    assert torch.equal(first["w"], merge_utils.dare_linear([a["w"], b["w"]], torch.tensor([0.3, 0.3]), 0.8))


# ---------------------------------------------------------------------------------------------- LoRA settings
def lora_adapter(base_dir, folder, seed=0, **settings):
    config = LoraConfig(
        **{"r": 2, "lora_alpha": 4, "target_modules": ["q_proj", "v_proj"], "init_lora_weights": False, **settings}
    )
    torch.manual_seed(seed)
    get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir), config).save_pretrained(str(folder))
    return folder


def test_lora_settings_are_checked_before_adapters_are_combined(tmp_path, tokenizer):
    base_dir = save_tiny_model(str(tmp_path / "base"))
    reference = lora_adapter(base_dir, tmp_path / "a")
    for name, settings in (
        ("lora_alpha", {"lora_alpha": 8}),
        ("r", {"r": 4}),
        ("target_modules", {"target_modules": ["q_proj", "k_proj"]}),
    ):
        other = lora_adapter(base_dir, tmp_path / name, seed=1, **settings)
        with pytest.raises(ValueError, match=f"not compatible.*{name}"):
            task_vector_from_adapters(other, reference)
        with pytest.raises(ValueError, match=f"not compatible.*{name}"):
            check_lora_compatibility(reference, other)
    same = lora_adapter(base_dir, tmp_path / "same", seed=1)
    vector = task_vector_from_adapters(same, reference)
    assert vector.lora_config["r"] == 2 and vector.lora_config["lora_alpha"] == 4
    alpha_8 = task_vector_from_adapters(tmp_path / "lora_alpha")
    with pytest.raises(ValueError, match="not compatible.*lora_alpha"):
        fuse_task_vectors([vector, alpha_8])
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), tmp_path / "a")
    with pytest.raises(ValueError, match="the task vector and the model's adapter are not compatible.*lora_alpha"):
        SafetyRealignTrainer(
            model=model,
            task_vector=alpha_8,
            args=realign_args(tmp_path),
            train_dataset=Dataset.from_list(PAIRS),
            processing_class=tokenizer,
        )
    with pytest.raises(ValueError, match="not a PeftModel"):
        make_trainer(base_dir, vector, tmp_path, tokenizer)


# ---------------------------------------------------------------------------------------------- options and errors
def test_a_given_reference_is_frozen_and_mask_dtype_is_configurable(model_pair, tmp_path, tokenizer):
    safe_dir, tuned_dir = model_pair
    vector = task_vector_from_models(safe_dir, tuned_dir)
    reference = AutoModelForCausalLM.from_pretrained(tuned_dir)
    trainer = SafetyRealignTrainer(
        model=AutoModelForCausalLM.from_pretrained(safe_dir),
        task_vector=vector,
        ref_model=reference,
        args=realign_args(tmp_path, max_steps=1, mask_dtype="bfloat16"),
        train_dataset=Dataset.from_list(PAIRS),
        processing_class=tokenizer,
    )
    assert not any(parameter.requires_grad for parameter in reference.parameters())
    assert all(mask.logits.dtype == torch.bfloat16 for mask in trainer.masks.values())
    assert all(mask.finetuned.dtype == torch.float32 for mask in trainer.masks.values())  # the model's dtype
    before = {name: mask.logits.detach().clone() for name, mask in trainer.masks.items()}
    trainer.train()
    assert all(not torch.equal(mask.logits, before[name]) for name, mask in trainer.masks.items())


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"mask_dtype": "float64"}, "mask_dtype must be one of"),
        ({"mask_granularity": "column"}, "mask_granularity must be one of"),
        ({"unmasked_parameters": "norm("}, "not a valid regular expression"),
        ({"sync_ref_model": True}, "sync_ref_model=True does not apply"),
        ({"mask_temperature": 0.0}, "mask_temperature must be > 0"),
    ],
)
def test_bad_config_values_raise_clear_errors(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        SafetyRealignConfig(output_dir=str(tmp_path), **overrides)


def test_precomputed_reference_log_probs_are_the_finetunes(model_pair, tmp_path, tokenizer):
    """precompute_ref_log_probs=True through the masks forced to 1 gives the log-probs TRL computes with the
    fine-tuned model itself as ref_model."""
    safe_dir, tuned_dir = model_pair
    vector = task_vector_from_models(safe_dir, tuned_dir)
    columns = {}
    for name, reference in (("self", None), ("given", AutoModelForCausalLM.from_pretrained(tuned_dir))):
        trainer = SafetyRealignTrainer(
            model=AutoModelForCausalLM.from_pretrained(safe_dir),
            task_vector=vector,
            ref_model=reference,
            args=realign_args(tmp_path / name, max_steps=1, precompute_ref_log_probs=True),
            train_dataset=Dataset.from_list(PAIRS),
            processing_class=tokenizer,
        )
        columns[name] = trainer.train_dataset["ref_chosen_logps"], trainer.train_dataset["ref_rejected_logps"]
        trainer.train()
    assert columns["self"] == columns["given"]
