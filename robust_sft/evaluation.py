"""Evaluation helpers shared by the demo, the examples and the benchmarks.

- `answer_loss`: mean negative log-likelihood per completion token on held-out rows (any data-layer format);
- `multiple_choice_accuracy`: pick the option with the highest (length-normalised) log-likelihood;
- `generate_answers`: batched greedy generation from chat prompts.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from datasets import Dataset
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from .data import prepare_dataset


def _model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def _pad_batch(rows: Sequence[dict[str, list[int]]], pad_token_id: int) -> dict[str, torch.Tensor]:
    width = max(len(row["input_ids"]) for row in rows)
    input_ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for index, row in enumerate(rows):
        length = len(row["input_ids"])
        input_ids[index, :length] = torch.tensor(row["input_ids"])
        labels[index, :length] = torch.tensor(row["labels"])
        attention_mask[index, :length] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}


@torch.no_grad()
def _token_log_probs(model: PreTrainedModel, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row sum of label log-probabilities and number of label tokens."""
    device = _model_device(model)
    batch = {key: value.to(device) for key, value in batch.items()}
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
    targets = batch["labels"][:, 1:]
    mask = targets != -100
    log_probs = torch.log_softmax(logits[:, :-1], dim=-1)
    picked = log_probs.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1) * mask
    return picked.sum(-1).cpu(), mask.sum(-1).cpu()


def answer_loss(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    dataset: Dataset,
    batch_size: int = 16,
    max_length: int | None = 1024,
    desc: str = "answer loss",
) -> float:
    """Mean negative log-likelihood per completion token over `dataset` (any format of the data layer)."""
    prepared = prepare_dataset(dataset, tokenizer, max_length=max_length, desc="Tokenizing eval rows")
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for start in tqdm(range(0, len(prepared), batch_size), desc=desc, leave=False):
        rows = prepared.select(range(start, min(start + batch_size, len(prepared))))
        log_prob, tokens = _token_log_probs(model, _pad_batch(list(rows), tokenizer.pad_token_id))
        total -= log_prob.sum().item()
        count += tokens.sum().item()
    model.train(was_training)
    return total / max(count, 1)


@dataclass
class MultipleChoiceQuestion:
    """A question with its options; `answer` is the index of the right option."""

    question: str
    options: list[str]
    answer: int


def multiple_choice_accuracy(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    questions: Sequence[MultipleChoiceQuestion],
    length_normalized: bool = True,
    batch_size: int = 32,
    desc: str = "multiple choice",
) -> float:
    """Fraction of questions whose right option has the highest log-likelihood as the assistant's answer."""
    rows, owners = [], []
    for number, item in enumerate(questions):
        for option in item.options:
            rows.append(
                {"messages": [{"role": "user", "content": item.question}, {"role": "assistant", "content": option}]}
            )
            owners.append(number)
    prepared = prepare_dataset(Dataset.from_list(rows), tokenizer, desc="Tokenizing options")
    was_training = model.training
    model.eval()
    scores = []
    for start in tqdm(range(0, len(prepared), batch_size), desc=desc, leave=False):
        batch = list(prepared.select(range(start, min(start + batch_size, len(prepared)))))
        log_prob, tokens = _token_log_probs(model, _pad_batch(batch, tokenizer.pad_token_id))
        scores.extend((log_prob / tokens.clamp(min=1) if length_normalized else log_prob).tolist())
    model.train(was_training)
    correct, cursor = 0, 0
    for item in questions:
        option_scores = scores[cursor : cursor + len(item.options)]
        cursor += len(item.options)
        correct += int(max(range(len(option_scores)), key=option_scores.__getitem__) == item.answer)
    return correct / max(len(questions), 1)


@torch.no_grad()
def generate_answers(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    max_new_tokens: int = 64,
    batch_size: int = 16,
    desc: str = "generating",
) -> list[str]:
    """Greedy answers to user prompts, batched with left padding."""
    padding_side, tokenizer.padding_side = tokenizer.padding_side, "left"
    was_training = model.training
    model.eval()
    answers = []
    try:
        for start in tqdm(range(0, len(prompts), batch_size), desc=desc, leave=False):
            chats = [[{"role": "user", "content": prompt}] for prompt in prompts[start : start + batch_size]]
            texts = [tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True) for chat in chats]
            batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(
                _model_device(model)
            )
            output = model.generate(
                **batch, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id
            )
            new_tokens = output[:, batch["input_ids"].shape[1] :]
            answers.extend(tokenizer.batch_decode(new_tokens, skip_special_tokens=True))
    finally:
        tokenizer.padding_side = padding_side
        model.train(was_training)
    return [answer.strip() for answer in answers]
