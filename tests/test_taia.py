"""TAIA: exact weights after export (LoRA, full fine-tuning, QLoRA), the module split, TOA, the in-memory view."""

import copy
import logging

import pytest
import torch
from datasets import Dataset
from peft import LoraConfig
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer

from robust_sft.taia import (
    TAIAConfig,
    TAIATrainer,
    UnknownArchitectureError,
    export_taia,
    merge_taia,
    split_modules,
    taia_view,
)
from robust_sft.testing import make_tiny_model, save_tiny_model

from .conftest import train_args

ROWS = [{"instruction": f"Add {i} and {i + 1}.", "output": f"{i} + {i + 1} = {2 * i + 1}"} for i in range(8)]

EXPECTED_SPLIT = {  # per layer: (attention linears, MLP linears)
    "llama": (["q_proj", "k_proj", "v_proj", "o_proj"], ["gate_proj", "up_proj", "down_proj"]),
    "qwen2": (["q_proj", "k_proj", "v_proj", "o_proj"], ["gate_proj", "up_proj", "down_proj"]),
    "mistral": (["q_proj", "k_proj", "v_proj", "o_proj"], ["gate_proj", "up_proj", "down_proj"]),
    "gemma": (["q_proj", "k_proj", "v_proj", "o_proj"], ["gate_proj", "up_proj", "down_proj"]),
    "gpt2": (["c_attn", "c_proj"], ["c_fc", "c_proj"]),
    "gpt_neox": (["query_key_value", "dense"], ["dense_h_to_4h", "dense_4h_to_h"]),
    "phi": (["q_proj", "k_proj", "v_proj", "dense"], ["fc1", "fc2"]),
    "phi3": (["o_proj", "qkv_proj"], ["gate_up_proj", "down_proj"]),
}


def taia_args(tmp_path, **overrides):
    return train_args(tmp_path, **{"config_class": TAIAConfig, "max_steps": 3, "learning_rate": 2e-2, **overrides})


def lora():
    return LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0)


def trained_lora_trainer(tmp_path, tokenizer, architecture="llama", **config):
    model = make_tiny_model(architecture, tokenizer)
    base = {k: v.clone() for k, v in model.state_dict().items()}
    trainer = TAIATrainer(
        model=model,
        args=taia_args(tmp_path / "run", **config),
        train_dataset=Dataset.from_list(ROWS),
        processing_class=tokenizer,
        peft_config=lora(),
    )
    trainer.train()
    return trainer, base


def module_of(name):
    return name.rsplit(".", 1)[0]


@pytest.mark.parametrize("architecture", sorted(EXPECTED_SPLIT))
def test_split_per_architecture(architecture, tokenizer):
    model = make_tiny_model(architecture, tokenizer)
    split = split_modules(model)
    attention, mlp = EXPECTED_SPLIT[architecture]
    assert sorted(name.rsplit(".", 1)[-1] for name in split.attention) == sorted(attention * 2)
    assert sorted(name.rsplit(".", 1)[-1] for name in split.mlp) == sorted(mlp * 2)
    assert not any("lm_head" in name for name in split.attention + split.mlp)


class OddBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.mixer = nn.Linear(8, 8)
        self.channel = nn.Linear(8, 8)


class OddModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([OddBlock(), OddBlock()])
        self.head = nn.Linear(8, 4)


def test_unknown_architecture_names_the_modules():
    with pytest.raises(UnknownArchitectureError, match=r"OddModel.*blocks\.0\.mixer.*attention_modules="):
        split_modules(OddModel())


def test_override_split():
    split = split_modules(OddModel(), attention_modules=["mixer"], mlp_modules=["channel", "head"])
    assert split.attention == ["blocks.0.mixer", "blocks.1.mixer"]
    assert split.mlp == ["blocks.0.channel", "blocks.1.channel", "head"]
    with pytest.raises(UnknownArchitectureError, match="unmatched linear layers: head"):
        split_modules(OddModel(), attention_modules=["mixer"], mlp_modules=["channel"])


def test_default_lora_targets_every_linear_but_the_head(tmp_path, tokenizer):
    trainer = TAIATrainer(
        model=make_tiny_model("gpt2", tokenizer),
        args=taia_args(tmp_path),
        train_dataset=Dataset.from_list(ROWS),
        processing_class=tokenizer,
        peft_config=lora(),
    )
    adapted = {name for name, module in trainer.model.named_modules() if hasattr(module, "lora_A")}
    expected = {"base_model.model." + name for name in trainer.module_split.attention + trainer.module_split.mlp}
    assert adapted == expected  # GPT-2's attn.c_proj and mlp.c_proj both, lm_head not


def test_lora_export_keep_attention_is_exact(tmp_path, tokenizer):
    trainer, base = trained_lora_trainer(tmp_path, tokenizer)
    split = trainer.module_split
    vanilla = trainer.taia_model("all").state_dict()
    out = trainer.save_taia_model(tmp_path / "taia")
    exported = AutoModelForCausalLM.from_pretrained(out).state_dict()
    assert exported.keys() == base.keys()
    for name, tensor in exported.items():
        if module_of(name) in split.mlp:
            assert torch.equal(tensor, base[name]), f"MLP weight {name} differs from the base model"
        elif module_of(name) in split.attention:
            assert torch.equal(tensor, vanilla[name]), f"attention weight {name} differs from the merged model"
            assert not torch.equal(tensor, base[name]), f"attention weight {name} did not train"
        else:
            assert torch.equal(tensor, base[name])  # LoRA never touched embeddings or norms
    card = (out / "README.md").read_text()
    assert "keep = `attention`" in card and "2405.20192" in card


def test_lora_export_keep_mlp_and_all(tmp_path, tokenizer):
    trainer, base = trained_lora_trainer(tmp_path, tokenizer)
    split = trainer.module_split
    vanilla = trainer.taia_model("all").state_dict()
    plain = copy.deepcopy(trainer.model).merge_and_unload().state_dict()  # PEFT's own merge, for keep="all"
    taif = trainer.taia_model("mlp").state_dict()
    for name, tensor in taif.items():
        if module_of(name) in split.attention:
            assert torch.equal(tensor, base[name])
        elif module_of(name) in split.mlp:
            assert torch.equal(tensor, vanilla[name]) and not torch.equal(tensor, base[name])
    everything = trainer.taia_model("all").state_dict()
    assert all(torch.equal(everything[name], plain[name]) for name in plain)


def test_exported_folder_generates_with_plain_transformers(tmp_path, tokenizer):
    trainer, _ = trained_lora_trainer(tmp_path, tokenizer)
    out = trainer.save_taia_model(tmp_path / "export")
    model = AutoModelForCausalLM.from_pretrained(out)
    loaded_tokenizer = AutoTokenizer.from_pretrained(out)
    assert not hasattr(model, "peft_config")
    prompt = loaded_tokenizer.apply_chat_template(
        [{"role": "user", "content": "Add 1 and 2."}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    output = model.generate(**prompt, max_new_tokens=5, do_sample=False)
    assert output.shape[1] == prompt["input_ids"].shape[1] + 5 or output[0, -1] == loaded_tokenizer.eos_token_id


def test_taia_view_matches_the_merged_model(tmp_path, tokenizer):
    trainer, _ = trained_lora_trainer(tmp_path, tokenizer)
    model = trainer.model.eval()
    inputs = torch.tensor([[5, 6, 7, 8, 9]])
    with torch.no_grad():
        full = model(inputs).logits
        with trainer.taia_view():
            viewed = model(inputs).logits
        after = model(inputs).logits
        merged = trainer.taia_model("attention")(inputs).logits
    assert torch.allclose(viewed, merged, atol=1e-5)  # a copy runs its own weights (TRL patches forward)
    assert not torch.allclose(viewed, full, atol=1e-4)
    assert torch.equal(after, full)  # adapters back on
    assert all(p.requires_grad for n, p in model.named_parameters() if "lora_" in n)


def test_full_finetune_export_is_exact(tmp_path, tokenizer):
    model = make_tiny_model("llama", tokenizer)
    base = {k: v.clone() for k, v in model.state_dict().items()}
    trainer = TAIATrainer(
        model=model, args=taia_args(tmp_path), train_dataset=Dataset.from_list(ROWS), processing_class=tokenizer
    )
    trainer.train()
    tuned = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    split = trainer.module_split
    exported = AutoModelForCausalLM.from_pretrained(trainer.save_taia_model(tmp_path / "taia")).state_dict()
    mirrored = trainer.taia_model("mlp").state_dict()
    for name in base:
        if module_of(name) in split.mlp:
            assert torch.equal(exported[name], base[name]) and torch.equal(mirrored[name], tuned[name])
        elif module_of(name) in split.attention:
            assert torch.equal(exported[name], tuned[name]) and torch.equal(mirrored[name], base[name])
            assert not torch.equal(tuned[name], base[name])
        else:  # embeddings, norms, LM head come from the tuned model
            assert torch.equal(exported[name], tuned[name]) and torch.equal(mirrored[name], tuned[name])
    assert torch.equal(trainer.model.state_dict()["lm_head.weight"], tuned["lm_head.weight"])  # trainer untouched


def test_toa_trains_attention_adapters_only(tmp_path, tokenizer):
    trainer, _ = trained_lora_trainer(tmp_path, tokenizer, train_modules="attention")
    adapted = {
        name.removeprefix("base_model.model.") for name, m in trainer.model.named_modules() if hasattr(m, "lora_A")
    }
    assert adapted == set(trainer.module_split.attention)
    assert not any(name in adapted for name in trainer.module_split.mlp)


def test_toa_full_finetune_freezes_mlp(tmp_path, tokenizer):
    model = make_tiny_model("llama", tokenizer)
    base = {k: v.clone() for k, v in model.state_dict().items()}
    trainer = TAIATrainer(
        model=model,
        args=taia_args(tmp_path, train_modules="attention"),
        train_dataset=Dataset.from_list(ROWS),
        processing_class=tokenizer,
    )
    trainer.train()
    state = trainer.model.state_dict()
    for name in state:
        if module_of(name) in trainer.module_split.mlp:
            assert torch.equal(state[name], base[name])
        elif module_of(name) in trainer.module_split.attention:
            assert not torch.equal(state[name], base[name])


def test_incompatible_options_are_refused(tmp_path, tokenizer):
    with pytest.raises(ValueError, match="keep must be one of"):
        TAIAConfig(output_dir=str(tmp_path), keep="ffn")
    with pytest.raises(ValueError, match="keep='mlp' would export the base model"):
        TAIAConfig(output_dir=str(tmp_path), train_modules="attention", keep="mlp")
    with pytest.raises(ValueError, match="reaches MLP layers"):
        TAIATrainer(
            model=make_tiny_model("llama", tokenizer),
            args=taia_args(tmp_path, train_modules="attention"),
            train_dataset=Dataset.from_list(ROWS),
            processing_class=tokenizer,
            peft_config=LoraConfig(r=2, target_modules="all-linear"),
        )


def test_export_from_adapter_folder_matches_trainer(tmp_path, tokenizer):
    base_dir = save_tiny_model(str(tmp_path / "base"))
    trainer = TAIATrainer(
        model=base_dir,
        args=taia_args(tmp_path / "run"),
        train_dataset=Dataset.from_list(ROWS),
        peft_config=lora(),
    )
    trainer.train()
    trainer.save_model(str(tmp_path / "adapter"))
    from_trainer = AutoModelForCausalLM.from_pretrained(trainer.save_taia_model(tmp_path / "a")).state_dict()
    from_folder = AutoModelForCausalLM.from_pretrained(
        export_taia(base_dir, tmp_path / "adapter", tmp_path / "b", keep="attention")
    ).state_dict()
    assert all(torch.equal(from_trainer[name], from_folder[name]) for name in from_trainer)
    assert (tmp_path / "b" / "tokenizer_config.json").is_file()


def test_qlora_base_trains_and_exports_from_full_precision(tmp_path, caplog):
    base_dir = save_tiny_model(str(tmp_path / "base"))
    base = AutoModelForCausalLM.from_pretrained(base_dir).state_dict()
    trainer = TAIATrainer(
        model=base_dir,
        args=taia_args(tmp_path / "run", max_steps=2, quantization="4bit"),
        train_dataset=Dataset.from_list(ROWS),
        peft_config=lora(),
    )
    trainer.train()
    assert trainer.state.global_step == 2
    with pytest.raises(ValueError, match="Refusing to merge LoRA updates into 4/8-bit"):
        merge_taia(trainer.model, "attention")
    with caplog.at_level(logging.WARNING, logger="robust_sft.taia"):
        out = trainer.save_taia_model(tmp_path / "export")
    assert "reloading" in caplog.text and "full precision" in caplog.text
    exported = AutoModelForCausalLM.from_pretrained(out).state_dict()
    split = trainer.module_split
    for name, tensor in exported.items():
        assert tensor.dtype == torch.float32
        if module_of(name) in split.mlp:
            assert torch.equal(tensor, base[name])
        elif module_of(name) in split.attention and name.endswith("weight"):
            assert not torch.equal(tensor, base[name])
    assert "QLoRA" in (out / "taia.json").read_text()


def test_taia_view_function_on_a_plain_peft_model(tokenizer):
    from peft import get_peft_model

    model = get_peft_model(make_tiny_model("phi3", tokenizer), LoraConfig(r=2, target_modules="all-linear"))
    with taia_view(model, "attention") as viewed:
        off = [name for name, m in viewed.named_modules() if hasattr(m, "lora_A") and m.disable_adapters]
    assert sorted(name.rsplit(".", 1)[-1] for name in off) == [
        "down_proj",
        "down_proj",
        "gate_up_proj",
        "gate_up_proj",
    ]


def test_cli_train_and_export(tmp_path):
    import json

    from robust_sft.cli import main

    base_dir = save_tiny_model(str(tmp_path / "base"))
    data = tmp_path / "rows.jsonl"
    data.write_text("\n".join(json.dumps(row) for row in ROWS))
    out = tmp_path / "run"
    command = ["train", "taia", "--dataset_name", str(data), "--model_name_or_path", base_dir,
               "--output_dir", str(out),
               "--max_steps", "2", "--per_device_train_batch_size", "4", "--use_peft", "--lora_r", "4",
               "--learning_rate", ".01", "--save_taia_model", "--report_to", "none", "--save_strategy", "no",
               "--gradient_checkpointing", "false"]  # fmt: skip
    assert main(command) == 0
    assert (out / "adapter_config.json").is_file() and (out / "taia-model" / "model.safetensors").is_file()
    assert main(["export-taia", "--base", base_dir, "--adapter", str(out), "--output", str(tmp_path / "x")]) == 0
    a = AutoModelForCausalLM.from_pretrained(out / "taia-model").state_dict()
    b = AutoModelForCausalLM.from_pretrained(tmp_path / "x").state_dict()
    assert all(torch.equal(a[name], b[name]) for name in a)
