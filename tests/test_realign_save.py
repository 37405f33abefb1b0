"""SafetyRealignTrainer's files: `save_model()` / checkpoints write the realigned model under the current export mask
(plain `from_pretrained` loads it, no missing keys) plus the mask logits; resuming a checkpoint continues the same
run; `export()` is atomic and does not overwrite a previous export by accident."""

import json
import os

import pytest
import torch
from datasets import Dataset
from peft import PeftModel
from transformers import AutoModelForCausalLM

from robust_sft.realign import (
    MASKS_FILE,
    SafetyRealignTrainer,
    load_masks,
    task_vector_from_adapters,
    task_vector_from_models,
    zero_adapter,
)
from robust_sft.realign.masks import _parametrized

from .test_realign import PAIRS, make_model_pair, realign_args, tiny_lora
from .test_realign_full import finetune, tied_qwen2
from .test_realign_masks import randomise

INPUT_IDS = torch.tensor([[5, 17, 42, 8, 99, 3]])


def logits_of(model):
    model.eval()
    with torch.no_grad():
        return model(input_ids=INPUT_IDS).logits


def full_pair(tmp_path, tokenizer, kind):
    if kind == "llama":
        return make_model_pair(tmp_path)
    model = tied_qwen2(tokenizer)
    model.save_pretrained(tmp_path / "safe")
    finetune(model).save_pretrained(tmp_path / "tuned")
    return str(tmp_path / "safe"), str(tmp_path / "tuned")


@pytest.mark.parametrize("kind", ["llama", "tied-qwen2"])
def test_save_model_loads_with_plain_from_pretrained(tmp_path, tokenizer, kind):
    safe_dir, tuned_dir = full_pair(tmp_path, tokenizer, kind)
    trainer = SafetyRealignTrainer(
        model=AutoModelForCausalLM.from_pretrained(safe_dir),
        task_vector=task_vector_from_models(safe_dir, tuned_dir),
        args=realign_args(tmp_path, max_steps=1),
        train_dataset=Dataset.from_list(PAIRS),
        processing_class=tokenizer,
    )
    trainer.train()
    randomise(trainer.masks)
    trainer.save_model(str(tmp_path / "saved"))
    assert _parametrized(trainer.model)  # saving does not bake the masks: training can go on
    loaded, info = AutoModelForCausalLM.from_pretrained(tmp_path / "saved", output_loading_info=True)
    assert not any(info[key] for key in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    assert not any("parametrizations" in name for name in loaded.state_dict())
    assert set(load_masks(tmp_path / "saved")) == set(trainer.masks)
    report = json.loads((tmp_path / "saved" / "realign_report.json").read_text())
    assert report["kept_fraction"] == trainer.mask_report()["kept_fraction"]
    trainer.export(tmp_path / "exported")
    assert torch.equal(logits_of(loaded), logits_of(trainer.model))
    assert torch.equal(logits_of(loaded), logits_of(AutoModelForCausalLM.from_pretrained(tmp_path / "exported")))


def test_save_model_in_lora_mode_writes_the_realigned_adapter(tmp_path, tokenizer):
    base_dir, tuned = tiny_lora(tmp_path)
    tuned.save_pretrained(str(tmp_path / "ft-adapter"))
    safe = zero_adapter(
        PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), tmp_path / "ft-adapter")
    )
    trainer = SafetyRealignTrainer(
        model=safe,
        task_vector=task_vector_from_adapters(tmp_path / "ft-adapter"),
        args=realign_args(tmp_path, max_steps=1),
        train_dataset=Dataset.from_list(PAIRS),
        processing_class=tokenizer,
    )
    trainer.train()
    randomise(trainer.masks)
    trainer.save_model(str(tmp_path / "saved"))
    assert {"adapter_config.json", "adapter_model.safetensors", MASKS_FILE} <= set(os.listdir(tmp_path / "saved"))
    with_peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), tmp_path / "saved")
    plain, info = AutoModelForCausalLM.from_pretrained(tmp_path / "saved", output_loading_info=True)
    assert not any(info[key] for key in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    trainer.export(tmp_path / "exported")
    expected = logits_of(trainer.model)
    assert torch.equal(logits_of(with_peft), expected) and torch.equal(logits_of(plain), expected)


def test_resume_from_checkpoint_continues_the_same_run(tmp_path, tokenizer):
    safe_dir, tuned_dir = make_model_pair(tmp_path)
    vector = task_vector_from_models(safe_dir, tuned_dir)

    def run(folder, **overrides):
        trainer = SafetyRealignTrainer(
            model=AutoModelForCausalLM.from_pretrained(safe_dir),
            task_vector=vector,
            args=realign_args(folder, max_steps=3, save_strategy="steps", save_steps=1, **overrides),
            train_dataset=Dataset.from_list(PAIRS * 2),
            processing_class=tokenizer,
        )
        return trainer

    straight = run(tmp_path / "a")
    straight.train()
    resumed = run(tmp_path / "b")
    resumed.train(resume_from_checkpoint=str(tmp_path / "a" / "run" / "checkpoint-1"))
    for name, mask in straight.masks.items():
        assert torch.equal(mask.logits, resumed.masks[name].logits), name
    with pytest.raises(FileNotFoundError, match="not a checkpoint of SafetyRealignTrainer"):
        run(tmp_path / "c").train(resume_from_checkpoint=str(tmp_path / "a" / "run" / "checkpoint-1" / "missing"))


def test_export_is_atomic_and_keeps_a_previous_export(tmp_path, tokenizer):
    safe_dir, tuned_dir = make_model_pair(tmp_path)

    def trainer():
        return SafetyRealignTrainer(
            model=AutoModelForCausalLM.from_pretrained(safe_dir),
            task_vector=task_vector_from_models(safe_dir, tuned_dir),
            args=realign_args(tmp_path),
            train_dataset=Dataset.from_list(PAIRS),
            processing_class=tokenizer,
        )

    out = tmp_path / "out"
    out.mkdir()
    (out / "checkpoint-1").mkdir()
    (out / "notes.txt").write_text("mine")
    trainer().export(out)
    assert {"config.json", "model.safetensors", "realign_report.json", "notes.txt", "checkpoint-1"} <= set(
        os.listdir(out)
    )
    second = trainer()
    with pytest.raises(FileExistsError, match="already holds an exported model; pass overwrite=True"):
        second.export(out)
    assert _parametrized(second.model)  # refused before anything changed
    second.export(out, overwrite=True, export_mode="expected")
    assert json.loads((out / "realign_report.json").read_text())["export_mode"] == "expected"
    second_out = tmp_path / "fresh"
    trainer().export(second_out)
    assert (second_out / "model.safetensors").is_file()
    assert not [entry for entry in os.listdir(tmp_path) if entry.startswith(".")]  # no temporary folder left
