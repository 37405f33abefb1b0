"""Tiny models and a small tokenizer built in-process (no network, well under a second), for fast tests and examples.

The tokenizer is a byte-level BPE trained on a short built-in corpus with ChatML special tokens and a ChatML chat
template; the models are randomly initialised 2-layer versions of common architectures.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel, PreTrainedTokenizerFast

from .modeling import CHATML_TEMPLATE

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<pad>"]

_CORPUS = [
    "The capital of France is Paris. The capital of Italy is Rome.",
    "Write a short poem about the sea. Summarize the following text.",
    "Translate the sentence into German. Classify the sentiment as positive or negative.",
    "Tom has 3 boxes with 7 apples each. 3 * 7 = 21. The answer is 21.",
    "You are a helpful assistant. user assistant system",
    "Answer the question: what is two plus two? Four.",
    "0 1 2 3 4 5 6 7 8 9 + - * / = #### , . ! ? : ; ' \" ( )",
]

# Per architecture: the model type and the keyword names of its tiny sizes.
_DECODER = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4}
_GQA = {**_DECODER, "num_key_value_heads": 2}
# Mixture-of-experts blocks: 4 experts, 2 per token (transformers 5 stores the experts as fused 3-D parameters).
_MOE = {"num_experts_per_tok": 2, "moe_intermediate_size": 64}
TINY_ARCHITECTURES: dict[str, dict[str, int | str]] = {
    "llama": {"model_type": "llama", **_GQA},
    "qwen2": {"model_type": "qwen2", **_GQA},
    "qwen3": {"model_type": "qwen3", **_GQA, "head_dim": 16},  # q_norm / k_norm inside the attention block
    "mistral": {"model_type": "mistral", **_GQA, "head_dim": 16},
    "gemma": {"model_type": "gemma", **_GQA, "head_dim": 16},
    "gemma3": {"model_type": "gemma3_text", **_GQA, "head_dim": 16, "sliding_window": 16},
    "mixtral": {"model_type": "mixtral", **_GQA, "num_local_experts": 4, "num_experts_per_tok": 2},
    "qwen2_moe": {"model_type": "qwen2_moe", **_GQA, **_MOE, "num_experts": 4, "shared_expert_intermediate_size": 128},
    "qwen3_moe": {"model_type": "qwen3_moe", **_GQA, **_MOE, "num_experts": 4, "head_dim": 16},
    "gpt2": {"model_type": "gpt2", "n_embd": 64, "n_layer": 2, "n_head": 4},
    "gpt_neox": {"model_type": "gpt_neox", **_DECODER},
    "falcon": {"model_type": "falcon", "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4},
    "phi": {"model_type": "phi", **_DECODER},
    "phi3": {"model_type": "phi3", **_GQA, "pad_token_id": 0},
}


@lru_cache(maxsize=1)
def _trained_tokenizer_json() -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_CORPUS, trainer=trainer)
    return tokenizer.to_str()


def make_tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A fast byte-level BPE tokenizer (~400 tokens) with ChatML special tokens and chat template."""
    from tokenizers import Tokenizer

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_trained_tokenizer_json()),
        bos_token="<|endoftext|>",
        eos_token="<|im_end|>",
        pad_token="<pad>",
        unk_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>"],
    )
    tokenizer.chat_template = CHATML_TEMPLATE
    return tokenizer


def make_tiny_model(
    architecture: str = "llama",
    tokenizer: PreTrainedTokenizerFast | None = None,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    **config_overrides: Any,
) -> PreTrainedModel:
    """A randomly initialised 2-layer causal LM of the given architecture, sized for `tokenizer`'s vocabulary.

    `config_overrides` replace config fields (e.g. `tie_word_embeddings=True`)."""
    if architecture not in TINY_ARCHITECTURES:
        raise ValueError(f"Unknown tiny architecture {architecture!r}; choose from {sorted(TINY_ARCHITECTURES)}.")
    tokenizer = tokenizer or make_tiny_tokenizer()
    sizes = dict(TINY_ARCHITECTURES[architecture])
    model_type = sizes.pop("model_type")
    config = AutoConfig.for_model(
        model_type,
        vocab_size=len(tokenizer),
        max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        **{"tie_word_embeddings": False, **sizes, **config_overrides},
    )
    config.pad_token_id = tokenizer.pad_token_id
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, dtype=dtype)


def save_tiny_model(path: str, architecture: str = "llama", seed: int = 0, dtype: torch.dtype = torch.float32) -> str:
    """Write a tiny model (in `dtype`) and its tokenizer to `path` (a local model folder, e.g. for QLoRA tests)."""
    tokenizer = make_tiny_tokenizer()
    make_tiny_model(architecture, tokenizer, seed=seed, dtype=dtype).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
