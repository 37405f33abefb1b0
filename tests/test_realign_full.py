"""Safety realignment in full mode: every changed tensor (biases, norms, embeddings, LM head) is in the task vector,
masked or carried over unmasked; an all-ones mask gives the fine-tune back bit for bit; tied embeddings share one
mask."""

import os

import pytest
import torch
from datasets import Dataset
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM

from robust_sft.realign import (
    SafetyRealignTrainer,
    attach_masks,
    remove_masks,
    task_vector_from_models,
)
from robust_sft.testing import make_tiny_model

from .test_realign import PAIRS, realign_args


def finetune(model, steps=3, seed=0):
    """A real full fine-tune: a few AdamW steps on random tokens move every parameter (biases and norms too)."""
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(steps):
        input_ids = torch.randint(0, model.config.vocab_size, (2, 12), generator=generator)
        model(input_ids=input_ids, labels=input_ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return model


def tied_qwen2(tokenizer):
    config = AutoConfig.for_model(
        "qwen2",
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config)


@pytest.fixture(params=["untied", "tied"])
def qwen2_pair(request, tmp_path, tokenizer):
    """(safe folder, fine-tuned folder) of a tiny Qwen2 (q/k/v biases) and a full fine-tune of it."""
    model = make_tiny_model("qwen2", tokenizer) if request.param == "untied" else tied_qwen2(tokenizer)
    model.save_pretrained(tmp_path / "safe")
    tokenizer.save_pretrained(tmp_path / "safe")
    finetune(model).save_pretrained(tmp_path / "tuned")
    return str(tmp_path / "safe"), str(tmp_path / "tuned"), request.param


def weights(folder):
    return load_file(os.path.join(folder, "model.safetensors"))


def test_task_vector_covers_every_changed_tensor(qwen2_pair):
    safe_dir, tuned_dir, _ = qwen2_pair
    vector = task_vector_from_models(safe_dir, tuned_dir)
    safe, tuned = weights(safe_dir), weights(tuned_dir)
    assert set(vector) == {name for name in tuned if not torch.equal(tuned[name], safe[name])} == set(tuned)
    kinds = (
        "self_attn.q_proj.bias",
        "self_attn.k_proj.bias",
        "self_attn.v_proj.bias",
        "input_layernorm",
        "norm.weight",
    )
    assert all(any(kind in name for name in vector) for kind in kinds)
    assert "model.embed_tokens.weight" in vector
    assert all(torch.equal(vector[name], tuned[name] - safe[name]) for name in vector)
    blocks = task_vector_from_models(safe_dir, tuned_dir, include=r"\.layers\.\d+\.")
    assert set(blocks) == {name for name in vector if ".layers." in name}


def test_all_ones_reproduces_the_full_finetune_including_biases_and_norms(qwen2_pair, tmp_path, tokenizer):
    safe_dir, tuned_dir, tying = qwen2_pair
    vector = task_vector_from_models(safe_dir, tuned_dir)
    safe, tuned = weights(safe_dir), weights(tuned_dir)
    # W_safe + (W_ft - W_safe) is not W_ft in float32 for many elements: the masks keep W_ft itself
    inexact = sum(int((safe[n] + vector[n] != tuned[n]).sum()) for n in vector)
    assert inexact > 0
    for logit, expected in ((20.0, tuned), (-20.0, safe)):
        model = AutoModelForCausalLM.from_pretrained(safe_dir)
        remove_masks(model, attach_masks(model, vector, init_logit=logit))
        state = model.state_dict()
        assert all(torch.equal(state[name], expected[name]) for name in expected), logit
        if tying == "tied":
            assert model.lm_head.weight is model.model.embed_tokens.weight
    # the trainer's reference (masks forced to 1) is the fine-tuned model, logit for logit
    model = AutoModelForCausalLM.from_pretrained(safe_dir)
    trainer = SafetyRealignTrainer(
        model=model,
        task_vector=vector,
        args=realign_args(tmp_path, max_steps=1),
        train_dataset=Dataset.from_list(PAIRS),
        processing_class=tokenizer,
    )
    reference = AutoModelForCausalLM.from_pretrained(tuned_dir)
    input_ids = torch.tensor([[3, 50, 7, 120, 9, 31]])
    with torch.no_grad():
        assert torch.equal(trainer.ref_model(input_ids=input_ids).logits, reference(input_ids=input_ids).logits)


def test_tied_embeddings_share_one_mask(tmp_path, tokenizer):
    model = tied_qwen2(tokenizer)
    model.save_pretrained(tmp_path / "safe")
    finetune(model).save_pretrained(tmp_path / "tuned")
    vector = task_vector_from_models(tmp_path / "safe", tmp_path / "tuned")
    assert "lm_head.weight" not in vector  # tied: one tensor in the checkpoint
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "safe")
    masks = attach_masks(model, vector)
    embedding, head = model.model.embed_tokens, model.lm_head
    assert (
        embedding.parametrizations.weight[0] is head.parametrizations.weight[0] is masks["model.embed_tokens.weight"]
    )
    model(input_ids=torch.tensor([[1, 2, 3]]))  # the hook draws this forward's sample
    assert torch.equal(embedding.weight, head.weight)  # one sample, read twice
    assert len(list(model.parameters())) == len(
        list(AutoModelForCausalLM.from_pretrained(tmp_path / "safe").parameters())
    ) + len(masks)


def test_unmasked_parameters_are_carried_over_whole(qwen2_pair, tmp_path, tokenizer):
    safe_dir, tuned_dir, _ = qwen2_pair
    vector = task_vector_from_models(safe_dir, tuned_dir)
    model = AutoModelForCausalLM.from_pretrained(safe_dir)
    trainer = SafetyRealignTrainer(
        model=model,
        task_vector=vector,
        args=realign_args(tmp_path, max_steps=1, unmasked_parameters=r"norm|bias", mask_init_logit=-20.0),
        train_dataset=Dataset.from_list(PAIRS),
        processing_class=tokenizer,
    )
    carried = {name for name in vector if "norm" in name or "bias" in name}
    assert set(trainer.masks.carried) == carried and set(trainer.masks) == set(vector) - carried
    assert set(trainer.mask_report()["carried_unmasked"]) == carried
    trainer.export(tmp_path / "realigned")
    state = weights(tmp_path / "realigned")
    safe, tuned = weights(safe_dir), weights(tuned_dir)
    for name in vector:  # all-zero masks: masked tensors are the safe ones, carried ones the fine-tune's
        assert torch.equal(state[name], tuned[name] if name in carried else safe[name]), name
    with pytest.raises(ValueError, match="matches every task-vector tensor"):
        SafetyRealignTrainer(
            model=AutoModelForCausalLM.from_pretrained(safe_dir),
            task_vector=vector,
            args=realign_args(tmp_path, unmasked_parameters="."),
            train_dataset=Dataset.from_list(PAIRS),
            processing_class=tokenizer,
        )
