"""Batched greedy (or sampled) generation from chat prompts, shared by the trainers and the evaluation."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase


def _model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def generate_batch(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    texts: Sequence[str],
    keep_special_tokens: Sequence[str] = (),
    **generation: Any,
) -> list[str]:
    """Continue already-rendered prompts in one left-padded batch; return only the new text of each row.

    Special tokens are dropped from the answers except `keep_special_tokens` (e.g. a new `<sep>` the answers use).
    `generation` goes to `model.generate` (e.g. `max_new_tokens`, `do_sample`, `temperature`).
    """
    padding_side, tokenizer.padding_side = tokenizer.padding_side, "left"  # every row continues from its last token
    try:
        batch = tokenizer(list(texts), return_tensors="pt", padding=True, add_special_tokens=False)
    finally:
        tokenizer.padding_side = padding_side
    batch = batch.to(_model_device(model))
    output = model.generate(**batch, pad_token_id=tokenizer.pad_token_id, **generation)
    new_tokens = output[:, batch["input_ids"].shape[1] :].tolist()  # after the prompt, whatever the template
    dropped = set(tokenizer.all_special_ids) - set(tokenizer.convert_tokens_to_ids(list(keep_special_tokens)))
    rows = [[token for token in row if token not in dropped] for row in new_tokens]
    return [text.strip() for text in tokenizer.batch_decode(rows, skip_special_tokens=False)]


def generate_answers(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    max_new_tokens: int = 64,
    batch_size: int = 16,
    desc: str = "generating",
    keep_special_tokens: Sequence[str] = (),
) -> list[str]:
    """Greedy answers to user prompts (each rendered as one user turn with the chat template), batched."""
    was_training = model.training
    model.eval()
    answers = []
    try:
        for start in tqdm(range(0, len(prompts), batch_size), desc=desc, leave=False):
            chats = [[{"role": "user", "content": prompt}] for prompt in prompts[start : start + batch_size]]
            texts = [tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True) for chat in chats]
            answers += generate_batch(
                model, tokenizer, texts, keep_special_tokens, max_new_tokens=max_new_tokens, do_sample=False
            )
    finally:
        model.train(was_training)
    return answers
