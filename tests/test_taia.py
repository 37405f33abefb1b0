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


def peft_merge(trainer):
    """PEFT's own merge of the whole trained adapter (the reference for the kept tensors)."""
    return copy.deepcopy(trainer.model).merge_and_unload().state_dict()


def load_state(folder):
    return AutoModelForCausalLM.from_pretrained(folder).state_dict()


def assert_exact(state, base, reference, split, keep):
    """Dropped group == base, kept group == reference, neither == reference; and the kept updates are there."""
    dropped = {"attention": "mlp", "mlp": "attention", "all": None}[keep]
    assert state.keys() == base.keys()
    for name, tensor in state.items():
        group = split.classify(name)
        expected = base[name] if group == dropped and dropped else reference[name]
        assert torch.equal(tensor, expected), f"keep={keep}: {name} ({group})"
    changed = {split.classify(name) for name in state if not torch.equal(state[name], base[name])}
    assert keep in changed or keep == "all"


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


def test_unknown_architecture_names_the_parameters():
    with pytest.raises(UnknownArchitectureError, match=r"OddModel.*blocks\.0\.mixer\.weight.*attention_modules="):
        split_modules(OddModel())


def test_override_split():
    split = split_modules(OddModel(), attention_modules=["mixer"], mlp_modules=["channel", "head"])
    assert split.attention == [f"blocks.{i}.mixer.{p}" for i in (0, 1) for p in ("weight", "bias")]
    assert split.mlp == [f"blocks.{i}.channel.{p}" for i in (0, 1) for p in ("weight", "bias")] + [
        "head.weight",
        "head.bias",
    ]
    assert split.lora_targets("attention") == ["0.mixer", "1.mixer"]
    with pytest.raises(UnknownArchitectureError, match="unmatched weight matrices: head.weight"):
        split_modules(OddModel(), attention_modules=["mixer"], mlp_modules=["channel"])


def test_override_reaches_fused_parameters(tokenizer):
    """Patterns match module prefixes and parameter names: a fused expert tensor can be named on its own, and one
    left out is reported (it is a weight matrix, not an embedding)."""
    model = make_tiny_model("mixtral", tokenizer)
    experts = ["experts.gate_up_proj", "experts.down_proj", "mlp.gate"]
    split = split_modules(model, attention_modules=["self_attn"], mlp_modules=experts)
    expected = {"mlp.experts.gate_up_proj", "mlp.experts.down_proj", "mlp.gate.weight"}
    assert {n.split(".", 3)[-1] for n in split.mlp} == expected
    with pytest.raises(
        UnknownArchitectureError, match=r"unmatched weight matrices: model\.layers\.0\.mlp\.experts\.down"
    ):
        split_modules(model, attention_modules=["self_attn"], mlp_modules=["experts.gate_up_proj", "mlp.gate"])


def test_default_lora_targets_every_linear_but_the_head(tmp_path, tokenizer):
    trainer = TAIATrainer(
        model=make_tiny_model("gpt2", tokenizer),
        args=taia_args(tmp_path),
        train_dataset=Dataset.from_list(ROWS),
        processing_class=tokenizer,
        peft_config=lora(),
    )
    adapted = {name for name, module in trainer.model.named_modules() if hasattr(module, "lora_A")}
    split = trainer.module_split
    expected = {"base_model.model." + name for name in split.linear_modules["attention"] + split.linear_modules["mlp"]}
    assert len(expected) == 8 and adapted == expected  # GPT-2's attn.c_proj and mlp.c_proj both, lm_head not


def test_lora_export_keep_attention_is_exact(tmp_path, tokenizer):
    trainer, base = trained_lora_trainer(tmp_path, tokenizer)
    reference = peft_merge(trainer)
    out = trainer.save_taia_model(tmp_path / "taia")
    assert_exact(load_state(out), base, reference, trainer.module_split, "attention")
    card = (out / "README.md").read_text()
    assert "keep = `attention`" in card and "2405.20192" in card and "NeurIPS 2024" in card
    assert "jiang2024taia" in card and "2406.17245" not in card


def test_lora_export_keep_mlp_and_all(tmp_path, tokenizer):
    trainer, base = trained_lora_trainer(tmp_path, tokenizer)
    reference = peft_merge(trainer)
    assert_exact(trainer.taia_model("mlp").state_dict(), base, reference, trainer.module_split, "mlp")
    everything = trainer.taia_model("all").state_dict()
    assert all(torch.equal(everything[name], reference[name]) for name in reference)


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


def full_finetune(tmp_path, tokenizer, architecture="llama", **config):
    model = make_tiny_model(architecture, tokenizer)
    base = {k: v.clone() for k, v in model.state_dict().items()}
    trainer = TAIATrainer(
        model=model,
        args=taia_args(tmp_path / "run", **config),
        train_dataset=Dataset.from_list(ROWS),
        processing_class=tokenizer,
    )
    trainer.train()
    return trainer, base


@pytest.mark.parametrize("architecture", ["llama", "mixtral"])
def test_full_finetune_export_is_exact(tmp_path, tokenizer, architecture):
    trainer, base = full_finetune(tmp_path, tokenizer, architecture, eval_keep="mlp")  # snapshot both groups
    tuned = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    split = trainer.module_split
    assert_exact(load_state(trainer.save_taia_model(tmp_path / "taia")), base, tuned, split, "attention")
    assert_exact(trainer.taia_model("mlp").state_dict(), base, tuned, split, "mlp")
    assert all(torch.equal(trainer.model.state_dict()[name], tuned[name]) for name in tuned)  # trainer untouched
    if architecture == "mixtral":  # the tuned experts and router were trained, and the export reset them
        for name in ("model.layers.0.mlp.experts.gate_up_proj", "model.layers.0.mlp.gate.weight"):
            assert not torch.equal(tuned[name], base[name])


def test_full_finetune_snapshots_only_the_dropped_group(tmp_path, tokenizer):
    trainer = TAIATrainer(
        model=make_tiny_model("llama", tokenizer),
        args=taia_args(tmp_path / "run"),
        train_dataset=Dataset.from_list(ROWS),
        processing_class=tokenizer,
    )
    assert set(trainer._base_state) == set(trainer.module_split.mlp)  # keep="attention" restores the MLP only
    with pytest.raises(ValueError, match="No pre-trained weights to restore"):
        trainer.save_taia_model(tmp_path / "taif", keep="mlp")  # an in-memory model has no path to reload from
    assert not (tmp_path / "taif").exists()


def test_toa_trains_attention_adapters_only(tmp_path, tokenizer):
    trainer, _ = trained_lora_trainer(tmp_path, tokenizer, train_modules="attention")
    adapted = {
        name.removeprefix("base_model.model.") for name, m in trainer.model.named_modules() if hasattr(m, "lora_A")
    }
    assert adapted == set(trainer.module_split.linear_modules["attention"])


def test_toa_full_finetune_trains_attention_only(tmp_path, tokenizer):
    """TOA with full fine-tuning: embeddings, norms outside attention, the LM head and the MLP stay frozen; the
    attention projections and Qwen3's q_norm / k_norm train."""
    trainer, base = full_finetune(tmp_path, tokenizer, "qwen3", train_modules="attention")
    state = trainer.model.state_dict()
    split = trainer.module_split
    changed = {name for name in state if not torch.equal(state[name], base[name])}
    assert changed == set(split.attention)
    assert "model.layers.0.self_attn.q_norm.weight" in changed
    assert {name for name, p in trainer.model.named_parameters() if p.requires_grad} == set(split.attention)


def test_incompatible_options_are_refused(tmp_path, tokenizer):
    with pytest.raises(ValueError, match="keep must be one of"):
        TAIAConfig(output_dir=str(tmp_path), keep="ffn")
    with pytest.raises(ValueError, match="eval_keep must be one of"):
        TAIAConfig(output_dir=str(tmp_path), eval_keep="ffn")
    with pytest.raises(ValueError, match="keep='mlp' would export the base model"):
        TAIAConfig(output_dir=str(tmp_path), train_modules="attention", keep="mlp")
    with pytest.raises(ValueError, match="reach MLP parameters"):
        TAIATrainer(
            model=make_tiny_model("llama", tokenizer),
            args=taia_args(tmp_path, train_modules="attention"),
            train_dataset=Dataset.from_list(ROWS),
            processing_class=tokenizer,
            peft_config=LoraConfig(r=2, target_modules="all-linear"),
        )


def test_moe_lora_needs_no_dropout(tmp_path, tokenizer):
    with pytest.raises(ValueError, match=r"mlp\.experts\.gate_up_proj.*lora_dropout=0\.0"):
        TAIATrainer(
            model=make_tiny_model("mixtral", tokenizer),
            args=taia_args(tmp_path),
            train_dataset=Dataset.from_list(ROWS),
            processing_class=tokenizer,
            peft_config=LoraConfig(r=2, lora_dropout=0.05),
        )


def test_moe_lora_trains_experts_and_exports_exactly(tmp_path, tokenizer):
    """Qwen2-MoE: LoRA on attention, shared expert (nn.Linear) and the fused experts and router (target_parameters);
    keep="attention" resets all of the MLP."""
    trainer, base = trained_lora_trainer(tmp_path, tokenizer, "qwen2_moe", max_steps=2)
    trained = {n for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert any("mlp.experts.lora_A" in n for n in trained) and any("mlp.gate.lora_A" in n for n in trained)
    reference = peft_merge(trainer)
    expert = "model.layers.0.mlp.experts.down_proj"
    assert not torch.equal(reference[expert], base[expert])  # the experts did train
    assert_exact(
        load_state(trainer.save_taia_model(tmp_path / "taia")), base, reference, trainer.module_split, "attention"
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
    from_trainer = load_state(trainer.save_taia_model(tmp_path / "a"))
    from_folder = load_state(export_taia(base_dir, tmp_path / "adapter", tmp_path / "b", keep="attention"))
    assert all(torch.equal(from_trainer[name], from_folder[name]) for name in from_trainer)
    assert (tmp_path / "b" / "tokenizer_config.json").is_file()
    with pytest.raises(ValueError, match="Refusing to export into"):
        export_taia(base_dir, tmp_path / "adapter", tmp_path / "adapter", overwrite=True)


def test_qlora_exports_in_the_base_dtype(tmp_path, caplog):
    """A bf16 base trained with QLoRA exports in bf16: MLP == the bf16 base, attention == PEFT's merge of the
    saved adapter into the bf16 base (no fp32 reload, nothing merged into 4-bit weights)."""
    from peft import PeftModel

    base_dir = save_tiny_model(str(tmp_path / "base"), dtype=torch.bfloat16)
    base = AutoModelForCausalLM.from_pretrained(base_dir).state_dict()
    assert base["model.norm.weight"].dtype == torch.bfloat16
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
    trainer.save_model(str(tmp_path / "adapter"))
    reference = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), str(tmp_path / "adapter"))
    reference = reference.merge_and_unload().state_dict()
    with caplog.at_level(logging.WARNING, logger="robust_sft.taia"):
        out = trainer.save_taia_model(tmp_path / "export")
    assert "reloading" in caplog.text and "own dtype" in caplog.text
    exported = load_state(out)
    assert all(tensor.dtype == torch.bfloat16 for tensor in exported.values())
    assert_exact(exported, base, reference, trainer.module_split, "attention")
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
    a = load_state(out / "taia-model")
    b = load_state(tmp_path / "x")
    assert all(torch.equal(a[name], b[name]) for name in a)
