"""TAIA artefacts: the output-folder policy, the TAIA adapter (PEFT and vLLM's layout), the evaluation view."""

import json

import pytest
import torch
from datasets import Dataset
from peft import LoraConfig, PeftModel
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from robust_sft import RobustSFTConfig, RobustSFTTrainer
from robust_sft.taia import TAIAConfig, TAIATrainer, export_taia_adapter
from robust_sft.testing import make_tiny_model

from .conftest import train_args

ROWS = [{"instruction": f"Add {i} and {i + 1}.", "output": f"{i} + {i + 1} = {2 * i + 1}"} for i in range(8)]
EVAL_ROWS = [{"instruction": f"Add {i} and {i + 2}.", "output": f"{i} + {i + 2} = {2 * i + 2}"} for i in range(6)]


def make_trainer(tmp_path, tokenizer, architecture="llama", lora=True, **config):
    """A TAIA trainer with seeded random updates in place of training (the artefacts do not depend on how the
    updates were learnt; tests/test_taia.py trains for real)."""
    model = make_tiny_model(architecture, tokenizer)
    base = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    trainer = TAIATrainer(
        model=model,
        args=train_args(tmp_path / "run", config_class=TAIAConfig, per_device_eval_batch_size=3, **config),
        train_dataset=Dataset.from_list(ROWS),
        eval_dataset=Dataset.from_list(EVAL_ROWS),
        processing_class=tokenizer,
        peft_config=LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0) if lora else None,
    )
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for parameter in trainer.model.parameters():
            if parameter.requires_grad:
                parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.05)
    return trainer, base


def state_of(folder):
    return AutoModelForCausalLM.from_pretrained(folder).state_dict()


# --------------------------------------------------------------------------------------------------- output folders
def test_non_empty_folder_is_refused_unless_overwrite(tmp_path, tokenizer):
    trainer, _ = make_trainer(tmp_path, tokenizer)
    target = tmp_path / "export"
    target.mkdir()
    (target / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not empty.*overwrite=True"):
        trainer.save_taia_model(target)
    with pytest.raises(FileExistsError, match="not empty"):
        trainer.save_taia_adapter(target)
    assert [p.name for p in target.iterdir()] == ["notes.txt"]
    trainer.save_taia_model(target, overwrite=True)
    assert not (target / "notes.txt").exists() and (target / "model.safetensors").is_file()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary folder left


def test_the_runs_own_output_dir_is_never_replaced(tmp_path, tokenizer):
    trainer, _ = make_trainer(tmp_path, tokenizer)
    trainer.save_model()  # the run's adapter, in args.output_dir
    before = sorted(p.name for p in (tmp_path / "run").iterdir())
    for folder in (trainer.args.output_dir, tmp_path):  # the folder itself, or one holding it
        with pytest.raises(ValueError, match="Refusing to export into"):
            trainer.save_taia_model(folder, overwrite=True)
        with pytest.raises(ValueError, match="Refusing to export into"):
            trainer.save_taia_adapter(folder, overwrite=True)
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == before
    assert (trainer.save_taia_model(tmp_path / "run" / "taia-model") / "config.json").is_file()  # inside is fine


def test_export_keeps_the_model_dtype(tmp_path, tokenizer):
    model = make_tiny_model("qwen3", tokenizer, dtype=torch.bfloat16)
    trainer = TAIATrainer(
        model=model,
        args=train_args(tmp_path / "run", config_class=TAIAConfig, bf16=False),
        train_dataset=Dataset.from_list(ROWS),
        processing_class=tokenizer,
    )
    out = trainer.save_taia_model(tmp_path / "export")
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    assert {tensor.dtype for tensor in state_of(out).values()} == {torch.bfloat16}
    assert all(tensor.dtype == torch.bfloat16 for tensor in trainer._base_state.values())  # snapshot too


# --------------------------------------------------------------------------------------------------- the TAIA adapter
def adapter_keys(folder):
    with safe_open(str(folder / "adapter_model.safetensors"), "pt") as handle:
        return list(handle.keys())


@pytest.mark.parametrize("architecture", ["llama", "qwen2_moe"])
def test_taia_adapter_loads_with_peft_and_merges_into_the_taia_model(tmp_path, tokenizer, architecture):
    trainer, _ = make_trainer(tmp_path, tokenizer, architecture)
    adapter = trainer.save_taia_adapter(tmp_path / "taia-adapter")
    exported = state_of(trainer.save_taia_model(tmp_path / "taia-model"))
    loaded = PeftModel.from_pretrained(make_tiny_model(architecture, tokenizer), str(adapter))
    merged = loaded.merge_and_unload().state_dict()
    assert merged.keys() == exported.keys()
    assert all(torch.equal(merged[name], exported[name]) for name in merged), "adapter merge != TAIA export"

    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["target_modules"] == sorted(f"self_attn.{m}_proj" for m in "qkvo")
    assert config["target_parameters"] is None  # the MoE experts and routers are gone
    assert (adapter / "tokenizer_config.json").is_file() and "2405.20192" in (adapter / "README.md").read_text()


def test_taia_adapter_has_the_layout_vllm_reads(tmp_path, tokenizer):
    """vLLM's LoRA loader (vllm/lora/lora_model.py, peft_helper.py; not run here): adapter_model.safetensors whose
    keys are `base_model.model.<module>.lora_A.weight` / `lora_B.weight` with a supported module name last;
    adapter_config.json with r, lora_alpha, target_modules, no modules_to_save, no DoRA."""
    trainer, _ = make_trainer(tmp_path, tokenizer, "qwen2_moe")
    adapter = trainer.save_taia_adapter(tmp_path / "taia-adapter")
    keys = adapter_keys(adapter)
    assert len(keys) == 2 * 4 * 2  # two layers, q/k/v/o, A and B
    for key in keys:
        prefix, module, kind = key[:17], key[17:].rsplit(".", 2)[0], key.rsplit(".", 2)[1:]
        assert prefix == "base_model.model." and kind in (["lora_A", "weight"], ["lora_B", "weight"]), key
        assert module.rsplit(".", 1)[-1] in {"q_proj", "k_proj", "v_proj", "o_proj"}, key
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["lora_alpha"] == 8 and config["target_modules"]
    assert not config.get("modules_to_save") and not config["use_dora"] and config["bias"] == "none"


def test_targets_shared_by_attention_and_mlp_become_full_names(tmp_path, tokenizer):
    """GPT-2 names both attn.c_proj and mlp.c_proj `c_proj`: the TAIA adapter keeps only the attention ones."""
    from peft import get_peft_model

    model = get_peft_model(make_tiny_model("gpt2", tokenizer), LoraConfig(r=2, target_modules=["c_attn", "c_proj"]))
    model.save_pretrained(tmp_path / "adapter")
    out = export_taia_adapter(tmp_path / "adapter", tmp_path / "taia")
    targets = json.loads((out / "adapter_config.json").read_text())["target_modules"]
    assert targets == ["c_attn", "transformer.h.0.attn.c_proj", "transformer.h.1.attn.c_proj"]
    assert not any(".mlp." in key for key in adapter_keys(out)) and len(adapter_keys(out)) == 8
    reloaded = PeftModel.from_pretrained(make_tiny_model("gpt2", tokenizer), str(out))
    assert not any(".mlp." in name for name, _ in reloaded.named_modules() if name.endswith("lora_A"))


# --------------------------------------------------------------------------------------------------- evaluation view
def eval_loss_of_folder(tmp_path, folder, tokenizer):
    trainer = RobustSFTTrainer(
        model=AutoModelForCausalLM.from_pretrained(folder),
        args=train_args(tmp_path / "plain", config_class=RobustSFTConfig, per_device_eval_batch_size=3),
        train_dataset=Dataset.from_list(ROWS),
        eval_dataset=Dataset.from_list(EVAL_ROWS),
        processing_class=tokenizer,
    )
    return trainer.evaluate()["eval_loss"]


@pytest.mark.parametrize("lora", [True, False], ids=["lora", "full"])
def test_eval_keep_scores_the_exported_taia_model(tmp_path, tokenizer, lora):
    trainer, _ = make_trainer(tmp_path, tokenizer, lora=lora, eval_keep="attention")
    before = {name: tensor.clone() for name, tensor in trainer.model.state_dict().items()}
    viewed = trainer.evaluate()["eval_loss"]
    after = trainer.model.state_dict()
    assert all(torch.equal(after[name], tensor) for name, tensor in before.items())  # restored after the view
    exported = eval_loss_of_folder(tmp_path, trainer.save_taia_model(tmp_path / "taia"), tokenizer)
    # LoRA: base(x) + B(A(x)) against the merged weight, equal up to float rounding; full fine-tuning: same weights
    assert viewed == pytest.approx(exported, rel=1e-5) if lora else viewed == exported
    trainer.args.eval_keep = None
    assert trainer.evaluate()["eval_loss"] != pytest.approx(viewed, abs=1e-4)  # the view did change the model


def test_trl_model_card_cites_taia(tmp_path, tokenizer):
    trainer, _ = make_trainer(tmp_path, tokenizer)
    trainer.create_model_card(model_name="taia-run")
    card = (tmp_path / "run" / "README.md").read_text()
    assert "2405.20192" in card and "2406.17245" not in card


def test_a_peft_model_passed_in_is_a_lora_run(tmp_path, tokenizer):
    from peft import get_peft_model

    from robust_sft.taia import split_modules

    model = make_tiny_model("llama", tokenizer)
    peft_model = get_peft_model(model, LoraConfig(r=2, target_modules=split_modules(model).lora_targets()))
    trainer = TAIATrainer(
        model=peft_model,
        args=train_args(tmp_path / "run", config_class=TAIAConfig),
        train_dataset=Dataset.from_list(ROWS),
        processing_class=tokenizer,
    )
    assert trainer.is_lora and trainer._base_state is None
    trainable = {n for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in name for name in trainable)
