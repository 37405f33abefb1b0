"""The loading layer: the embedded default, QLoRA on CPU, and clear errors."""

import sys

import pytest
import torch
from datasets import Dataset
from peft import LoraConfig

from robust_sft import RobustSFTTrainer, is_quantized, load_model_and_tokenizer, modeling
from robust_sft.testing import save_tiny_model

from .conftest import train_args


def test_embedded_default_is_smollm2_and_converted_once(embedded, monkeypatch):
    model, tokenizer = embedded
    assert model.config.model_type == "llama"
    assert model.config.num_hidden_layers == 30
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert tokenizer.chat_template and "<|im_start|>" in tokenizer.chat_template
    assert tokenizer.pad_token is not None and model.config.pad_token_id == tokenizer.pad_token_id
    assert getattr(model, "hf_quantizer", None) is None  # trainable: no GGUF quantizer left
    folder = modeling.embedded_model_dir()
    weights = folder / "model.safetensors"
    stamp = weights.stat().st_mtime_ns

    def no_second_conversion():
        raise AssertionError("the embedded model was converted a second time")

    monkeypatch.setattr(modeling, "_embedded_gguf_path", no_second_conversion)
    again, _ = load_model_and_tokenizer(None)
    assert weights.stat().st_mtime_ns == stamp
    assert torch.equal(again.model.embed_tokens.weight, model.model.embed_tokens.weight)
    assert not any(p.name.startswith(".SmolLM2") for p in folder.parent.iterdir())  # no temp folder left behind


def test_local_folder_loads_with_pad_token(tmp_path):
    folder = save_tiny_model(str(tmp_path / "tiny"))
    model, tokenizer = load_model_and_tokenizer(folder)
    assert model.config.num_hidden_layers == 2
    assert tokenizer.pad_token == "<pad>"
    assert model.dtype == torch.float32


def test_missing_local_folder_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_model_and_tokenizer(str(tmp_path / "nope" / "model"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        load_model_and_tokenizer(str(tmp_path / "empty"))


def test_unreachable_hub_id_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(OSError, match="neither a local model folder nor a model id reachable"):
        load_model_and_tokenizer("robust-sft-tests/no-such-model")


def test_quantization_without_bitsandbytes(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # as if it were not installed
    with pytest.raises(ImportError, match=r"needs bitsandbytes.*robust_sft\[qlora\]"):
        load_model_and_tokenizer(save_tiny_model(str(tmp_path / "tiny")), quantization="4bit")


def test_unknown_quantization(tmp_path):
    with pytest.raises(ValueError, match="quantization must be None, '4bit' or '8bit'"):
        load_model_and_tokenizer(save_tiny_model(str(tmp_path / "tiny")), quantization="3bit")


def test_chat_template_option(tmp_path):
    folder = save_tiny_model(str(tmp_path / "tiny"))
    _, tokenizer = load_model_and_tokenizer(folder, chat_template="{{ messages[0]['content'] }}")
    assert tokenizer.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False) == "x"


def test_qlora_4bit_trains_on_cpu(tmp_path):
    import bitsandbytes as bnb

    folder = save_tiny_model(str(tmp_path / "tiny"))
    model, tokenizer = load_model_and_tokenizer(folder, quantization="4bit")
    assert is_quantized(model)
    assert isinstance(model.model.layers[0].mlp.down_proj, bnb.nn.Linear4bit)
    frozen = model.model.layers[0].self_attn.q_proj.weight.detach().clone()
    rows = [{"instruction": f"Add {i} and 1.", "output": str(i + 1)} for i in range(8)]
    trainer = RobustSFTTrainer(
        model=model,
        args=train_args(tmp_path / "out", max_steps=2),
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
        peft_config=LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"),
    )
    lora_before = {n: p.detach().float().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert lora_before and all("lora_" in n for n in lora_before)
    trainer.train()
    assert trainer.state.global_step == 2
    lora_after = dict(trainer.model.named_parameters())
    changed = [n for n, before in lora_before.items() if not torch.equal(before, lora_after[n].detach().float())]
    assert any("lora_B" in n for n in changed)
    base = trainer.model.get_base_model().model.layers[0].self_attn.q_proj.base_layer.weight
    assert torch.equal(base, frozen)  # the 4-bit base weights never change


def test_trainer_loads_quantized_model_from_config(tmp_path):
    folder = save_tiny_model(str(tmp_path / "tiny"))
    trainer = RobustSFTTrainer(
        model=folder,
        args=train_args(tmp_path / "out", max_steps=1, quantization="8bit"),
        train_dataset=Dataset.from_list([{"text": "one two three"}] * 4),
        peft_config=LoraConfig(r=2, target_modules="all-linear"),
    )
    assert is_quantized(trainer.model)
    trainer.train()
    assert trainer.state.global_step == 1


def test_embedded_conversion_is_locked_to_one_process(tmp_path, monkeypatch):
    """Several workers asking for the embedded model at once: one converts, the others wait and reuse it."""
    import threading
    import time

    monkeypatch.setenv("ROBUST_SFT_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(modeling, "_embedded_gguf_path", lambda: tmp_path / "model.gguf")
    conversions = []

    def fake_convert(gguf_path, folder):
        conversions.append(folder)
        time.sleep(0.3)  # long enough for the other workers to arrive while it converts
        (folder / "config.json").write_text("{}")
        (folder / "model.safetensors").write_bytes(b"")

    monkeypatch.setattr(modeling, "_convert_gguf", fake_convert)
    results = []
    workers = [threading.Thread(target=lambda: results.append(modeling.ensure_embedded_model())) for _ in range(3)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    assert len(conversions) == 1
    assert len(set(results)) == 1 and modeling.is_embedded_model_converted()
