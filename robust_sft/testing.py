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


# Chat templates of six families, written here (no hub) in the shape of the real ones. "@@GEN@@"/"@@ENDGEN@@" mark
# the assistant text that trains under assistant-only loss (the content and the end-of-turn token, not the newline
# after it); `chat_template(name, generation_markers=True)` turns them into `{% generation %}` blocks.
_ASSISTANT_END = "{% set last = loop.last and not add_generation_prompt %}"
_TEMPLATES: dict[str, str] = {
    # SmolLM2-Instruct (ChatML with a default system turn)
    "chatml": (
        "{% for message in messages %}"
        "{% if loop.first and messages[0]['role'] != 'system' %}"
        "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
        "{% endif %}"
        "{% if message['role'] == 'assistant' %}{{ '<|im_start|>assistant\n' }}"
        "@@GEN@@{{ message['content'] + '<|im_end|>' }}@@ENDGEN@@{{ '\n' }}"
        "{% else %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}{% endif %}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    ),
    # Llama-3 Instruct (a `date_string` keyword fills a system header, as Llama-3.1's does)
    "llama3": (
        "{{ bos_token }}"
        "{% if date_string is defined %}"
        "{{ '<|start_header_id|>system<|end_header_id|>\n\nToday Date: ' + date_string + '<|eot_id|>' }}"
        "{% endif %}"
        "{% for message in messages %}"
        "{% if message['role'] == 'assistant' %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
        "@@GEN@@{{ message['content'] | trim + '<|eot_id|>' }}@@ENDGEN@@"
        "{% else %}"
        "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim }}"
        "{{ '<|eot_id|>' }}{% endif %}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
    ),
    # Qwen2.5 Instruct (default system turn; tools listed in the system turn)
    "qwen2.5": (
        "{% if tools %}{{ '<|im_start|>system\n' }}"
        "{% if messages[0]['role'] == 'system' %}{{ messages[0]['content'] }}"
        "{% else %}{{ 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}{% endif %}"
        "{{ '\n\n# Tools\n\n<tools>' }}{% for tool in tools %}{{ '\n' }}{{ tool | tojson }}{% endfor %}"
        "{{ '\n</tools><|im_end|>\n' }}"
        "{% elif messages[0]['role'] == 'system' %}"
        "{{ '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}"
        "{% else %}{{ '<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}"
        "{{ '<|im_end|>\n' }}{% endif %}"
        "{% for message in messages %}"
        "{% if message['role'] == 'user' or (message['role'] == 'system' and not loop.first) %}"
        "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
        "{% elif message['role'] == 'assistant' %}{{ '<|im_start|>assistant\n' }}"
        "@@GEN@@{{ message['content'] + '<|im_end|>' }}@@ENDGEN@@{{ '\n' }}{% endif %}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    ),
    # Phi-3 (EOS closes a conversation rendered without a generation prompt)
    "phi3": (
        "{% for message in messages %}"
        "{% if message['role'] == 'system' %}{{ '<|system|>\n' + message['content'] + '<|end|>\n' }}"
        "{% elif message['role'] == 'user' %}{{ '<|user|>\n' + message['content'] + '<|end|>\n' }}"
        "{% elif message['role'] == 'assistant' %}" + _ASSISTANT_END + "{{ '<|assistant|>\n' }}"
        "@@GEN@@{{ message['content'] + '<|end|>' }}{% if last %}{{ '\n' + eos_token }}{% endif %}@@ENDGEN@@"
        "{% if not last %}{{ '\n' }}{% endif %}{% endif %}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}"
        "{% elif messages[-1]['role'] != 'assistant' %}{{ eos_token }}{% endif %}"
    ),
    # Gemma (no system role: the system text opens the first user turn; the assistant is `model`)
    "gemma": (
        "{{ bos_token }}"
        "{% if messages[0]['role'] == 'system' %}{% set prefix = messages[0]['content'] + '\n\n' %}"
        "{% set turns = messages[1:] %}{% else %}{% set prefix = '' %}{% set turns = messages %}{% endif %}"
        "{% for message in turns %}"
        "{% if message['role'] == 'assistant' %}{{ '<start_of_turn>model\n' }}"
        "@@GEN@@{{ message['content'] | trim + '<end_of_turn>' }}@@ENDGEN@@{{ '\n' }}"
        "{% else %}{{ '<start_of_turn>' + message['role'] + '\n' + (prefix if loop.first else '') }}"
        "{{ message['content'] | trim + '<end_of_turn>\n' }}{% endif %}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
    ),
    # Mistral Instruct v0.1 (system text opens the first user turn; no generation prompt)
    "mistral": (
        "{{ bos_token }}"
        "{% if messages[0]['role'] == 'system' %}{% set prefix = messages[0]['content'] + '\n\n' %}"
        "{% set turns = messages[1:] %}{% else %}{% set prefix = '' %}{% set turns = messages %}{% endif %}"
        "{% for message in turns %}"
        "{% if message['role'] == 'user' %}{{ '[INST] ' + (prefix if loop.first else '') + message['content'] }}"
        "{{ ' [/INST]' }}{% elif message['role'] == 'assistant' %}"
        "@@GEN@@{{ message['content'] + eos_token }}@@ENDGEN@@{% endif %}"
        "{% endfor %}"
    ),
}
CHAT_TEMPLATE_NAMES = tuple(_TEMPLATES)

# Per template: special tokens, BOS, EOS (as the real tokenizers of the family set them).
_TEMPLATE_TOKENS: dict[str, tuple[list[str], str | None, str]] = {
    "chatml": (["<|im_start|>", "<|im_end|>"], None, "<|im_end|>"),
    "llama3": (
        ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
        "<|begin_of_text|>",
        "<|eot_id|>",
    ),
    "qwen2.5": (["<|im_start|>", "<|im_end|>"], None, "<|im_end|>"),
    "phi3": (["<|system|>", "<|user|>", "<|assistant|>", "<|end|>"], None, "<|endoftext|>"),
    "gemma": (["<bos>", "<eos>", "<start_of_turn>", "<end_of_turn>"], "<bos>", "<eos>"),
    "mistral": (["<s>", "</s>", "[INST]", "[/INST]"], "<s>", "</s>"),
}


def chat_template(name: str, generation_markers: bool = False) -> str:
    """One of `CHAT_TEMPLATE_NAMES` as a Jinja string, optionally with `{% generation %}` markers around the
    assistant text that trains (its content and end-of-turn token)."""
    if name not in _TEMPLATES:
        raise ValueError(f"Unknown chat template {name!r}; choose from {CHAT_TEMPLATE_NAMES}.")
    start, end = ("{% generation %}", "{% endgeneration %}") if generation_markers else ("", "")
    return _TEMPLATES[name].replace("@@GEN@@", start).replace("@@ENDGEN@@", end)


def make_template_tokenizer(name: str, generation_markers: bool = False) -> PreTrainedTokenizerFast:
    """The tiny tokenizer with one family's chat template, special tokens, BOS and EOS (see `chat_template`)."""
    tokenizer = make_tiny_tokenizer()
    special, bos, eos = _TEMPLATE_TOKENS[name]
    tokenizer.add_special_tokens({"additional_special_tokens": special})
    if bos is not None:
        tokenizer.bos_token = bos
    tokenizer.eos_token = eos
    tokenizer.chat_template = chat_template(name, generation_markers)
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
