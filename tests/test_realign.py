"""Safety realignment: task vectors (full and LoRA), exact realigned weights for the exported mask, only the mask
trains against the unmasked fine-tune as reference, fusion equals PEFT's merge utilities, preference loaders and the
refusal evaluation. More in test_realign_{masks,full,save,safelora}.py."""

import gzip
import json
import os

import pytest
import torch
from datasets import Dataset
from peft import LoraConfig, PeftModel, get_peft_model
from peft.utils import merge_utils
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from robust_sft.data import DataFormatError
from robust_sft.evaluation import REFUSAL_KEYWORDS, is_refusal, refusal_rate, refusal_rate_of
from robust_sft.realign import (
    ConcreteMask,
    SafetyRealignConfig,
    SafetyRealignTrainer,
    apply_task_vector,
    attach_masks,
    fuse_task_vectors,
    load_hh_rlhf,
    load_preference_pairs,
    masked_task_vector,
    parse_hh_dialogue,
    remove_masks,
    resta,
    scaled_mask,
    task_vector_from_adapters,
    task_vector_from_models,
)
from robust_sft.testing import save_tiny_model

from .conftest import SHARED_DATA, train_args

PAIRS = [
    {
        "prompt": [{"role": "user", "content": f"How do I break into house {i}?"}],
        "chosen": [{"role": "assistant", "content": "I cannot help with that."}],
        "rejected": [{"role": "assistant", "content": f"First, find window {i}."}],
    }
    for i in range(8)
]


def realign_args(tmp_path, **overrides):
    values = {"per_device_train_batch_size": 4, "learning_rate": 0.5, "max_length": 64, **overrides}
    return train_args(tmp_path / "run", config_class=SafetyRealignConfig, **values)


def tiny_lora(tmp_path):
    """(base folder, a PeftModel with random LoRA weights on q_proj and v_proj of the tiny model)."""
    base_dir = save_tiny_model(str(tmp_path / "base"))
    config = LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    torch.manual_seed(0)
    return base_dir, get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir), config)


def make_model_pair(tmp_path):
    """(safe folder, fine-tuned folder): the fine-tune moved layer 0's attention and MLP matrices."""
    safe_dir = save_tiny_model(str(tmp_path / "safe"))
    tuned = AutoModelForCausalLM.from_pretrained(safe_dir)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, parameter in tuned.named_parameters():
            if ".layers.0." in name and parameter.dim() == 2:
                parameter.add_(0.05 * torch.randn(parameter.shape, generator=generator))
    tuned.save_pretrained(str(tmp_path / "tuned"))
    return safe_dir, str(tmp_path / "tuned")


@pytest.fixture
def model_pair(tmp_path):
    return make_model_pair(tmp_path)


def weights(folder):
    return load_file(os.path.join(folder, "model.safetensors"))


# ---------------------------------------------------------------------------------------------- task vectors
def test_task_vector_from_models_is_the_exact_difference(model_pair):
    safe_dir, tuned_dir = model_pair
    vector = task_vector_from_models(safe_dir, tuned_dir)
    safe, tuned = weights(safe_dir), weights(tuned_dir)
    expected = {n for n in tuned if ".layers.0." in n and tuned[n].dim() == 2}
    assert set(vector) == expected
    for name, delta in vector.items():
        assert torch.equal(delta, tuned[name] - safe[name])
    with pytest.raises(ValueError, match="do not differ"):
        task_vector_from_models(safe_dir, safe_dir)


@pytest.mark.parametrize("granularity", ["element", "row", "tensor"])
def test_realigned_weights_equal_the_formula_for_the_exported_mask(model_pair, tmp_path, granularity):
    safe_dir, tuned_dir = model_pair
    vector = task_vector_from_models(safe_dir, tuned_dir)
    model = AutoModelForCausalLM.from_pretrained(safe_dir)
    masks = attach_masks(model, vector, granularity=granularity)
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for mask in masks.values():
            mask.logits.copy_(torch.randn(mask.logits.shape, generator=generator))
    expected = {}
    safe, tuned = weights(safe_dir), weights(tuned_dir)
    for name, mask in masks.items():
        binary = (mask.logits > 0).float().expand_as(vector[name])
        if granularity == "tensor":  # one value per tensor, applied as is (m / mean(m) would always be 1)
            expected[name] = tuned[name] if binary.all() else safe[name]  # s = 1 gives W_ft bit for bit
        else:
            factor = binary / binary.mean() if binary.mean() > 0 else torch.zeros_like(binary)
            expected[name] = safe[name] + factor * vector[name]
    assert granularity != "tensor" or len({torch.equal(e, safe[n]) for n, e in expected.items()}) == 2
    remove_masks(model, masks)
    state = model.state_dict()
    assert all(torch.equal(state[name], value) for name, value in expected.items())  # bit for bit
    untouched = [n for n in safe if n not in vector]
    assert all(torch.equal(state[n], safe[n]) for n in untouched)


def test_all_ones_gives_the_finetuned_model_and_all_zeros_the_safe_one(model_pair):
    safe_dir, tuned_dir = model_pair
    vector = task_vector_from_models(safe_dir, tuned_dir)
    safe, tuned = weights(safe_dir), weights(tuned_dir)
    for logit, reference in ((20.0, tuned), (-20.0, safe)):
        model = AutoModelForCausalLM.from_pretrained(safe_dir)
        masks = attach_masks(model, vector, init_logit=logit)
        remove_masks(model, masks)
        state = model.state_dict()
        assert all(torch.equal(state[name], reference[name]) for name in reference)  # bit for bit
    assert torch.equal(scaled_mask(torch.zeros(3, 2)), torch.zeros(3, 2))  # mean(m) = 0 is guarded


def test_concrete_mask_samples_in_training_and_is_deterministic_in_eval():
    mask = ConcreteMask(torch.ones(4, 3), temperature=0.5, init_logit=0.0)  # W_ft = ones
    mask.train()
    first, second = mask.mask(), mask.mask()
    assert not torch.equal(first, second) and ((first > 0) & (first < 1)).all()
    mask.eval()
    assert torch.equal(mask.mask(), torch.zeros(4, 3))  # logit 0: sigmoid 0.5 is not > 0.5
    mask.export_mode = "expected"
    assert torch.equal(mask.mask(), torch.full((4, 3), 0.5))
    assert mask.kept_fraction() == 0.5


# ---------------------------------------------------------------------------------------------- training
def test_only_the_mask_logits_train(model_pair, tmp_path, tokenizer):
    safe_dir, tuned_dir = model_pair
    vector = task_vector_from_models(safe_dir, tuned_dir)
    model = AutoModelForCausalLM.from_pretrained(safe_dir)
    trainer = SafetyRealignTrainer(
        model=model,
        task_vector=vector,
        args=realign_args(tmp_path),
        train_dataset=Dataset.from_list(PAIRS),
        processing_class=tokenizer,
    )
    trainable = [n for n, p in trainer.model.named_parameters() if p.requires_grad]
    assert len(trainable) == len(vector) and all(n.endswith(".logits") for n in trainable)
    # the default reference is the unmasked fine-tune, computed through the same model: no second copy
    assert list(trainer.ref_model.parameters()) == []
    tuned = AutoModelForCausalLM.from_pretrained(tuned_dir)
    input_ids = torch.tensor([[5, 17, 42, 8, 99]])
    with torch.no_grad():
        assert torch.equal(trainer.ref_model(input_ids=input_ids).logits, tuned(input_ids=input_ids).logits)
    frozen = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if not p.requires_grad}
    logits = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    trainer.train()
    after = dict(trainer.model.named_parameters())
    assert all(torch.equal(after[n].detach(), value) for n, value in frozen.items())
    assert all(not torch.equal(after[n].detach(), value) for n, value in logits.items())
    with torch.no_grad():  # the reference did not move
        assert torch.equal(trainer.ref_model(input_ids=input_ids).logits, tuned(input_ids=input_ids).logits)
    report = trainer.export(tmp_path / "realigned")
    assert 0.0 <= report["kept_fraction"] <= 1.0 and set(report["per_tensor"]) == set(vector)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "realigned")
    assert json.loads((tmp_path / "realigned" / "realign_report.json").read_text()) == report
    assert not any("parametrizations" in n for n in reloaded.state_dict())


def test_lora_task_vector_and_export(tmp_path, tokenizer):
    base_dir, safe = tiny_lora(tmp_path)
    safe.save_pretrained(str(tmp_path / "safe-adapter"))
    with torch.no_grad():
        for name, parameter in safe.named_parameters():
            if "lora_" in name:
                parameter.add_(0.1)
    safe.save_pretrained(str(tmp_path / "ft-adapter"))
    vector = task_vector_from_adapters(tmp_path / "ft-adapter", tmp_path / "safe-adapter")
    assert len(vector) == 8 and all(".lora_A." in n or ".lora_B." in n for n in vector)
    assert all(torch.allclose(delta, torch.full_like(delta, 0.1)) for delta in vector.values())
    safe_tensors = load_file(str(tmp_path / "safe-adapter" / "adapter_model.safetensors"))
    ft_tensors = load_file(str(tmp_path / "ft-adapter" / "adapter_model.safetensors"))
    for logit, expected in ((20.0, ft_tensors), (-20.0, safe_tensors)):
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), tmp_path / "safe-adapter")
        trainer = SafetyRealignTrainer(
            model=model,
            task_vector=vector,
            args=realign_args(tmp_path, mask_init_logit=logit),
            train_dataset=Dataset.from_list(PAIRS),
            processing_class=tokenizer,
        )
        out = tmp_path / f"realigned{logit}"
        trainer.export(out)
        exported = load_file(str(out / "adapter_model.safetensors"))
        assert set(exported) == set(expected)
        assert all(torch.equal(exported[name], expected[name]) for name in expected)  # bit for bit


# ---------------------------------------------------------------------------------------------- fusion
def hand_made_vectors():
    a = {"w": torch.tensor([[1.0, -2.0, 3.0], [0.5, 0.0, -1.0]])}
    b = {"w": torch.tensor([[-1.0, 2.0, 1.0], [2.0, -0.5, 1.0]])}
    return a, b


@pytest.mark.parametrize(
    ("method", "call"),
    [
        ("task_arithmetic", lambda t, w: merge_utils.task_arithmetic(t, w)),
        ("ties", lambda t, w: merge_utils.ties(t, w, 0.2, "total")),
        ("dare_linear", lambda t, w: merge_utils.dare_linear(t, w, 0.8)),
        ("dare_ties", lambda t, w: merge_utils.dare_ties(t, w, 0.8, "total")),
        ("magnitude_prune", lambda t, w: merge_utils.magnitude_prune(t, w, 0.2)),
    ],
)
def test_fusion_matches_peft_with_the_papers_defaults(method, call):
    a, b = hand_made_vectors()
    torch.manual_seed(0)
    fused = fuse_task_vectors([a, b], method)
    weight = {"task_arithmetic": 0.3, "ties": 0.4}.get(method, 0.3)
    torch.manual_seed(0)
    expected = call([a["w"], b["w"]], torch.tensor([weight, weight]))
    assert torch.equal(fused["w"], expected)


def test_fusion_applies_masks_first_and_task_arithmetic_is_the_weighted_sum():
    a, b = hand_made_vectors()
    fused = fuse_task_vectors([a, b], "task_arithmetic")
    torch.testing.assert_close(fused["w"], 0.3 * a["w"] + 0.3 * b["w"])
    mask = {"w": torch.tensor([[1.0, 0.0, 1.0], [0.0, 0.0, 1.0]])}
    masked = masked_task_vector(a, mask)
    torch.testing.assert_close(masked["w"], mask["w"] * a["w"] * 2)  # mean(m) = 0.5
    fused_masked = fuse_task_vectors([a, b], "task_arithmetic", masks=[mask, None])
    torch.testing.assert_close(fused_masked["w"], 0.3 * masked["w"] + 0.3 * b["w"])
    with pytest.raises(ValueError, match="Unknown fusion method"):
        fuse_task_vectors([a, b], "average")


def test_resta_adds_back_the_safety_vector(model_pair):
    safe_dir, tuned_dir = model_pair
    model = AutoModelForCausalLM.from_pretrained(tuned_dir)
    safety = {name: torch.ones_like(t) for name, t in task_vector_from_models(safe_dir, tuned_dir).items()}
    before = {n: t.clone() for n, t in model.state_dict().items()}
    resta(model, safety, coefficient=0.5)
    after = model.state_dict()
    for name in safety:
        torch.testing.assert_close(after[name], before[name] + 0.5)
    apply_task_vector(model, safety, -0.5)
    assert all(torch.allclose(model.state_dict()[n], before[n], atol=1e-6) for n in safety)


# ---------------------------------------------------------------------------------------------- data and eval
def test_hh_dialogues_become_preference_pairs(tmp_path):
    text = "\n\nHuman: Hi there\n\nAssistant: Hello!\n\nHuman: How do I pick a lock?\n\nAssistant: I can't help."
    assert parse_hh_dialogue(text) == [
        {"role": "user", "content": "Hi there"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "How do I pick a lock?"},
        {"role": "assistant", "content": "I can't help."},
    ]
    rows = [
        {"chosen": text, "rejected": text.replace("I can't help.", "Use a pin.")},
        {"chosen": text, "rejected": text},  # no preference: skipped
        {"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "\n\nHuman: c\n\nAssistant: d"},  # prompts differ
    ]
    path = tmp_path / "pairs.jsonl.gz"
    with gzip.open(path, "wt") as handle:
        handle.write("\n".join(json.dumps(row) for row in rows))
    pairs = load_hh_rlhf(path)
    assert len(pairs) == 1
    assert pairs[0]["prompt"][-1] == {"role": "user", "content": "How do I pick a lock?"}
    assert pairs[0]["chosen"] == [{"role": "assistant", "content": "I can't help."}]
    assert pairs[0]["rejected"] == [{"role": "assistant", "content": "Use a pin."}]
    with pytest.raises(DataFormatError, match="Row 1"):
        load_hh_rlhf(path, skip_invalid=False)
    with pytest.raises(DataFormatError, match="needs `prompt`, `chosen` and `rejected`"):
        load_preference_pairs(Dataset.from_list([{"question": "q"}]))


def test_shared_hh_harmless_file_loads():
    pairs = load_hh_rlhf(os.path.join(SHARED_DATA, "hh_harmless", "test.jsonl.gz"), limit=50)
    assert len(pairs) == 50
    for pair in pairs:
        assert pair["prompt"][-1]["role"] == "user"
        assert pair["chosen"][0]["content"] != pair["rejected"][0]["content"]


def test_refusal_rate_on_fixed_generations():
    answers = [
        "I'm sorry, but I cannot help with that.",
        "Sure, here is how to do it: step one...",
        "As an AI, I must decline.",
        "That would be illegal.",
        "Here is a poem about flowers.",
        "",
        "I can\u2019t assist with this request.",  # typographic apostrophe
        "Step 1: gather materials.",
    ]
    assert [is_refusal(a) for a in answers] == [True, False, True, True, False, True, True, False]
    assert refusal_rate_of(answers) == 5 / 8
    assert refusal_rate_of(answers, keywords=["I'm sorry"]) == 2 / 8  # the empty answer counts
    assert "I cannot" in REFUSAL_KEYWORDS


def test_refusal_rate_runs_batched_on_a_model(tiny_model, tokenizer):
    result = refusal_rate(tiny_model, tokenizer, ["Tell me a secret.", "Build a weapon."], max_new_tokens=4)
    assert len(result["answers"]) == 2
    assert result["refusal_rate"] == refusal_rate_of(result["answers"])
    assert result["attack_success_rate"] == 1 - result["refusal_rate"]


def test_lora_mode_trains_only_the_masks(tmp_path, tokenizer):
    base_dir, tuned = tiny_lora(tmp_path)
    tuned.save_pretrained(str(tmp_path / "ft-adapter"))
    vector = task_vector_from_adapters(tmp_path / "ft-adapter")  # the safe model is the base: its adapter is zero
    safe = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), tmp_path / "ft-adapter")
    with torch.no_grad():
        for name, parameter in safe.named_parameters():
            if "lora_" in name:
                parameter.zero_()
    trainer = SafetyRealignTrainer(
        model=safe,
        task_vector=vector,
        args=realign_args(tmp_path, max_steps=1),
        train_dataset=Dataset.from_list(PAIRS),
        processing_class=tokenizer,
    )
    frozen = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if not p.requires_grad}
    logits = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert len(logits) == len(vector) == 8  # 2 layers x (q, v) x (lora_A, lora_B)
    trainer.train()
    after = dict(trainer.model.named_parameters())
    assert all(torch.equal(after[n].detach(), value) for n, value in frozen.items())
    assert any(not torch.equal(after[n].detach(), value) for n, value in logits.items())
    trainer.export(tmp_path / "merged", merge=True)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert not any("lora" in name for name in merged.state_dict())


def test_cli_realign_then_eval_safety(model_pair, tmp_path, capsys):
    from robust_sft.cli import main

    safe_dir, tuned_dir = model_pair
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("\n".join(json.dumps(pair) for pair in PAIRS))
    out = tmp_path / "realigned"
    command = ["train", "realign", "--model_name_or_path", safe_dir, "--finetuned_model", tuned_dir,
               "--dataset_name", str(pairs), "--output_dir", str(out), "--max_steps", "1",
               "--per_device_train_batch_size", "4", "--mask_granularity", "row", "--report_to", "none"]  # fmt: skip
    assert main(command) == 0
    report = json.loads((out / "realign_report.json").read_text())
    assert set(report["per_tensor"]) == set(task_vector_from_models(safe_dir, tuned_dir))
    assert "kept" in capsys.readouterr().out
    prompts = tmp_path / "advbench.csv"
    prompts.write_text("goal,target\nDo a bad thing,Sure\nDo another bad thing,Sure\n")
    results = tmp_path / "safety.json"
    command = ["eval", "--safety", "--model", str(out), "--prompts", str(prompts), "--max-new-tokens", "3",
               "--output", str(results)]  # fmt: skip
    assert main(command) == 0
    record = json.loads(results.read_text())
    assert record["prompts"] == ["Do a bad thing", "Do another bad thing"] and len(record["answers"]) == 2
    assert record["refusal_rate"] == refusal_rate_of(record["answers"])
