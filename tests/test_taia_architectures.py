"""TAIA per architecture: every parameter classified, and the exact-export property for LoRA and full fine-tuning.

Exact export: with keep="attention" every MLP tensor (experts, routers, shared experts) equals the base model's and
every attention tensor equals PEFT's own `merge_and_unload()` of the whole adapter (LoRA) or the tuned tensor (full
fine-tuning); keep="mlp" is the mirror. Updates are set at random (seeded): the property does not depend on how they
were trained, and the trainer-level tests train for real.
"""

import copy
import re

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

from robust_sft.taia import save_taia, split_modules
from robust_sft.testing import TINY_ARCHITECTURES, make_tiny_model

_LLAMA_ATTENTION = ["self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"]
_LLAMA_ATTENTION += ["self_attn.o_proj.weight"]
_QWEN2_BIASES = ["self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias"]
_QK_NORMS = ["self_attn.q_norm.weight", "self_attn.k_norm.weight"]
_GATED_MLP = ["mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight"]
_FUSED_MOE = ["mlp.gate.weight", "mlp.experts.gate_up_proj", "mlp.experts.down_proj"]

# Per layer: (attention parameters, MLP parameters), names inside the block. Everything else is neither.
EXPECTED_SPLIT = {
    "llama": (_LLAMA_ATTENTION, _GATED_MLP),
    "qwen2": (_LLAMA_ATTENTION + _QWEN2_BIASES, _GATED_MLP),
    "qwen3": (_LLAMA_ATTENTION + _QK_NORMS, _GATED_MLP),
    "mistral": (_LLAMA_ATTENTION, _GATED_MLP),
    "gemma": (_LLAMA_ATTENTION, _GATED_MLP),
    "gemma3": (_LLAMA_ATTENTION + _QK_NORMS, _GATED_MLP),
    "mixtral": (_LLAMA_ATTENTION, _FUSED_MOE),
    "qwen2_moe": (
        _LLAMA_ATTENTION + _QWEN2_BIASES,
        _FUSED_MOE + ["mlp.shared_expert_gate.weight"] + [n.replace("mlp.", "mlp.shared_expert.") for n in _GATED_MLP],
    ),
    "qwen3_moe": (_LLAMA_ATTENTION + _QK_NORMS, _FUSED_MOE),
    "gpt2": (
        ["attn.c_attn.weight", "attn.c_attn.bias", "attn.c_proj.weight", "attn.c_proj.bias"],
        ["mlp.c_fc.weight", "mlp.c_fc.bias", "mlp.c_proj.weight", "mlp.c_proj.bias"],
    ),
    "gpt_neox": (
        ["attention.query_key_value.weight", "attention.query_key_value.bias"]
        + ["attention.dense.weight", "attention.dense.bias"],
        ["mlp.dense_h_to_4h.weight", "mlp.dense_h_to_4h.bias", "mlp.dense_4h_to_h.weight", "mlp.dense_4h_to_h.bias"],
    ),
    "falcon": (
        ["self_attention.query_key_value.weight", "self_attention.dense.weight"],
        ["mlp.dense_h_to_4h.weight", "mlp.dense_4h_to_h.weight"],
    ),
    "phi": (
        [f"self_attn.{m}.{p}" for m in ("q_proj", "k_proj", "v_proj", "dense") for p in ("weight", "bias")],
        ["mlp.fc1.weight", "mlp.fc1.bias", "mlp.fc2.weight", "mlp.fc2.bias"],
    ),
    "phi3": (
        ["self_attn.qkv_proj.weight", "self_attn.o_proj.weight"],
        ["mlp.gate_up_proj.weight", "mlp.down_proj.weight"],
    ),
}


def in_block(name):
    return re.sub(r"^.*?\.(?:layers|h)\.\d+\.", "", name)


def test_every_tiny_architecture_has_an_expected_split():
    assert sorted(EXPECTED_SPLIT) == sorted(TINY_ARCHITECTURES)


@pytest.mark.parametrize("architecture", sorted(EXPECTED_SPLIT))
def test_split_per_architecture(architecture, tokenizer):
    model = make_tiny_model(architecture, tokenizer)
    split = split_modules(model)
    attention, mlp = EXPECTED_SPLIT[architecture]
    assert sorted(map(in_block, split.attention)) == sorted(attention * 2)  # two layers
    assert sorted(map(in_block, split.mlp)) == sorted(mlp * 2)
    names = {name for name, _ in model.named_parameters()}
    assert set(split.attention) | set(split.mlp) | set(split.other) == names
    for name in split.other:  # embeddings, norms outside attention, the LM head
        assert re.search(r"(embed|wte|wpe|word_embeddings|embed_in|norm|ln_|layernorm|lm_head)", name), name


def random_updates(tensors, seed):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for tensor in tensors:
            tensor.add_(torch.randn(tensor.shape, generator=generator).to(tensor.dtype) * 0.05)


def lora_model(model, split):
    config = LoraConfig(
        r=2,
        lora_alpha=4,
        lora_dropout=0.0,
        target_modules=split.lora_targets(),
        target_parameters=split.lora_target_parameters() or None,
    )
    peft_model = get_peft_model(model, config)
    random_updates([p for n, p in peft_model.named_parameters() if "lora_" in n], seed=1)
    return peft_model


def exported(folder):
    return AutoModelForCausalLM.from_pretrained(folder).state_dict()


@pytest.mark.parametrize("architecture", sorted(EXPECTED_SPLIT))
def test_lora_export_is_exact(architecture, tokenizer, tmp_path):
    model = make_tiny_model(architecture, tokenizer)
    base = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    split = split_modules(model)
    peft_model = lora_model(model, split)
    merged = copy.deepcopy(peft_model).merge_and_unload().state_dict()  # PEFT's merge of the whole adapter
    for keep, dropped in (("attention", "mlp"), ("mlp", "attention")):
        state = exported(save_taia(peft_model, tmp_path / keep, keep))
        assert state.keys() == base.keys()
        for name, tensor in state.items():
            group = split.classify(name)
            expected = base[name] if group in (dropped, None) else merged[name]
            assert torch.equal(tensor, expected), f"{architecture} keep={keep}: {name} ({group})"
        changed = {split.classify(name) for name in state if not torch.equal(state[name], base[name])}
        assert changed == {keep}  # the kept updates are there, and only they
    assert all(not getattr(module, "merged", False) for module in peft_model.modules())  # the model is untouched


@pytest.mark.parametrize("architecture", sorted(EXPECTED_SPLIT))
def test_full_finetune_export_is_exact(architecture, tokenizer, tmp_path):
    model = make_tiny_model(architecture, tokenizer)
    base = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    random_updates(list(model.parameters()), seed=2)
    tuned = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    split = split_modules(model)
    for keep, dropped in (("attention", "mlp"), ("mlp", "attention")):
        state = exported(save_taia(model, tmp_path / keep, keep, pretrained=base))
        assert state.keys() == base.keys()
        for name, tensor in state.items():
            expected = base[name] if split.classify(name) == dropped else tuned[name]
            assert torch.equal(tensor, expected), f"{architecture} keep={keep}: {name}"
            assert not torch.equal(tensor, base[name]) or split.classify(name) == dropped


def test_tied_embeddings_and_sharding_match_save_pretrained(tokenizer, tmp_path):
    """A tied LM head is written once and shards follow `max_shard_size`, as transformers' own save does."""
    from safetensors import safe_open

    model = make_tiny_model("mixtral", tokenizer, tie_word_embeddings=True)
    model.save_pretrained(tmp_path / "reference", max_shard_size="100KB")
    save_taia(model, tmp_path / "ours", "all", max_shard_size="100KB")

    def tensors(folder):
        found = {}
        for path in sorted(folder.glob("*.safetensors")):
            with safe_open(str(path), "pt") as handle:
                found |= {key: handle.get_tensor(key) for key in handle.keys()}
        return found

    reference, ours = tensors(tmp_path / "reference"), tensors(tmp_path / "ours")
    assert len(list((tmp_path / "ours").glob("model-*.safetensors"))) > 1
    assert ours.keys() == reference.keys() and "lm_head.weight" not in ours  # original per-expert layout
    assert all(torch.equal(ours[key], reference[key]) for key in ours)
