"""SafeLoRA (arXiv 2405.16833) against its formula, hand-computed with torch on a 2-layer model: per LoRA layer,
C = V V^T / ||V||_F with V = W_aligned - W_unaligned; the update B A is replaced by C B A where
cos(C B A, B A) < threshold."""

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from robust_sft.realign import alignment_projection, safe_lora
from robust_sft.testing import save_tiny_model

TARGETS = ("q_proj", "v_proj")


@pytest.fixture
def setting(tmp_path):
    """(unaligned folder, aligned folder, LoRA fine-tune of the aligned model)."""
    unaligned_dir = save_tiny_model(str(tmp_path / "unaligned"))
    aligned = AutoModelForCausalLM.from_pretrained(unaligned_dir)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, parameter in aligned.named_parameters():
            if any(target in name for target in TARGETS):
                parameter.add_(0.05 * torch.randn(parameter.shape, generator=generator))
    aligned.save_pretrained(tmp_path / "aligned")
    config = LoraConfig(r=4, lora_alpha=8, target_modules=list(TARGETS), init_lora_weights=False)
    torch.manual_seed(1)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tmp_path / "aligned"), config)
    model.save_pretrained(tmp_path / "adapter")
    return unaligned_dir, str(tmp_path / "aligned"), model, str(tmp_path / "adapter")


def by_hand(unaligned_dir, aligned_dir, model):
    """Per layer (module name): (C, B A, cosine similarity of C B A and B A)."""
    unaligned, aligned = load_file(f"{unaligned_dir}/model.safetensors"), load_file(f"{aligned_dir}/model.safetensors")
    expected = {}
    for name, module in model.named_modules():
        if hasattr(module, "lora_A") and "default" in module.lora_A:
            key = name.removeprefix("base_model.model.")
            v = aligned[f"{key}.weight"] - unaligned[f"{key}.weight"]
            c = v @ v.T / torch.sqrt((v**2).sum())
            update = module.lora_B["default"].weight.detach() @ module.lora_A["default"].weight.detach()
            projected = c @ update
            cosine = (projected * update).sum() / (projected.norm() * update.norm())
            expected[key] = (c, update, cosine.item())
    return expected


def delta(model, key):
    module = model.get_submodule(f"base_model.model.{key}")
    return module.get_delta_weight("default")


def test_safelora_projects_the_layers_below_the_threshold(setting):
    unaligned_dir, aligned_dir, model, _ = setting
    expected = by_hand(unaligned_dir, aligned_dir, model)
    assert len(expected) == 4  # 2 layers x (q, v)
    cosines = sorted(cosine for _, _, cosine in expected.values())
    threshold = (cosines[1] + cosines[2]) / 2  # two layers below, two above
    scaling = model.get_submodule(f"base_model.model.{next(iter(expected))}").scaling["default"]
    report = safe_lora(model, unaligned_dir, threshold=threshold)
    assert report.threshold == threshold
    assert sorted(report.projected) == sorted(key for key, (_, _, cos) in expected.items() if cos < threshold)
    assert len(report.projected) == 2
    for key, (c, update, cosine) in expected.items():
        assert report.similarities[key] == pytest.approx(cosine, rel=1e-5)
        wanted = scaling * (c @ update if key in report.projected else update)
        torch.testing.assert_close(delta(model, key), wanted, rtol=1e-5, atol=1e-7)


def test_safelora_by_number_of_layers_and_with_an_explicit_aligned_model(setting):
    unaligned_dir, aligned_dir, model, adapter_dir = setting
    expected = by_hand(unaligned_dir, aligned_dir, model)
    lowest = min(expected, key=lambda key: expected[key][2])
    other = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(aligned_dir), adapter_dir)
    unaligned = AutoModelForCausalLM.from_pretrained(unaligned_dir)
    report = safe_lora(other, unaligned, aligned=aligned_dir, num_projected_layers=1)
    assert report.projected == [lowest] and report.threshold is None
    c, update, _ = expected[lowest]
    scaling = other.get_submodule(f"base_model.model.{lowest}").scaling["default"]
    torch.testing.assert_close(delta(other, lowest), scaling * (c @ update), rtol=1e-5, atol=1e-7)
    assert safe_lora(model, unaligned_dir, threshold=-1.0).projected == []  # nothing below -1


def test_safelora_errors(setting, tmp_path):
    unaligned_dir, aligned_dir, model, _ = setting
    with pytest.raises(TypeError, match="needs a PeftModel"):
        safe_lora(AutoModelForCausalLM.from_pretrained(aligned_dir), unaligned_dir)
    with pytest.raises(ValueError, match="equal: no alignment direction"):
        safe_lora(model, aligned_dir)  # unaligned == aligned
    with pytest.raises(KeyError, match="has no weight"):
        safe_lora(model, {"model.embed_tokens.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match="differ in shape"):
        alignment_projection(torch.zeros(2, 3), torch.zeros(3, 2))
