"""Log-likelihood scoring: answer loss, multiple choice and label classification."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from datasets import Dataset
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ..data import detect_format, prepare_dataset, to_example
from ..generation import _model_device


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
    targets = batch["labels"][:, 1:]
    mask = targets != -100
    # Only the positions from the batch's first answer token on are projected through the LM head (the head over a
    # 50k vocabulary dominates the cost of scoring short answers).
    first = int(mask.any(0).nonzero()[0]) if mask.any() else targets.shape[1] - 1
    keep = batch["input_ids"].shape[1] - first
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    try:
        logits = model(**inputs, logits_to_keep=keep).logits
    except TypeError:  # a model without `logits_to_keep`
        logits = model(**inputs).logits
    logits = logits[:, -keep:-1].float()
    targets, mask = targets[:, first:], mask[:, first:]
    picked = logits.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)
    picked = picked * mask
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
    predicted = multiple_choice_predictions(model, tokenizer, questions, length_normalized, batch_size, desc)
    return sum(p == q.answer for p, q in zip(predicted, questions)) / max(len(questions), 1)


def multiple_choice_predictions(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    questions: Sequence[MultipleChoiceQuestion],
    length_normalized: bool = True,
    batch_size: int = 32,
    desc: str = "multiple choice",
) -> list[int]:
    """The index of the option each question's answer is most likely to be (mean or summed log-likelihood)."""
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
    predicted, cursor = [], 0
    for item in questions:
        option_scores = scores[cursor : cursor + len(item.options)]
        cursor += len(item.options)
        predicted.append(max(range(len(option_scores)), key=option_scores.__getitem__))
    return predicted


def _classification_questions(
    rows: Dataset, labels: Sequence[str], transform: Callable[[str, int], str] | None = None
) -> list[MultipleChoiceQuestion]:
    """One question per single-turn row: the user turn (instruction possibly transformed), the labels as options."""
    data_format = detect_format(rows.column_names)
    questions = []
    for index, row in enumerate(rows):
        example = to_example(row, data_format, index)
        if transform is not None and example.instruction:
            example = example.with_instruction(transform(example.instruction, index))
        if example.messages is None:
            prompt, answer = example.prompt, example.completion
        else:
            prompt, answer = example.messages[example.instruction_turn]["content"], example.messages[-1]["content"]
        if answer.strip() not in labels:
            raise ValueError(f"Row {index}: the answer {answer!r} is not one of the labels {list(labels)}.")
        questions.append(MultipleChoiceQuestion(prompt, list(labels), list(labels).index(answer.strip())))
    return questions


def label_accuracy(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    rows: Dataset,
    labels: Sequence[str],
    instruction_transform: Callable[[str, int], str] | None = None,
    batch_size: int = 32,
    desc: str = "label accuracy",
) -> float:
    """Accuracy of single-turn classification rows when the model picks the most likely label word.

    `rows` are in any data-layer format whose answer is one of `labels`; `instruction_transform(instruction, index)`
    rewrites the instruction (not the input) first, e.g. with a noise operator.
    """
    correct = label_correctness(model, tokenizer, rows, labels, instruction_transform, batch_size, desc)
    return sum(correct) / max(len(correct), 1)


def label_correctness(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    rows: Dataset,
    labels: Sequence[str],
    instruction_transform: Callable[[str, int], str] | None = None,
    batch_size: int = 32,
    desc: str = "label accuracy",
) -> list[bool]:
    """Per row, whether the most likely label word is the row's answer (see `label_accuracy`)."""
    questions = _classification_questions(rows, labels, instruction_transform)
    predicted = multiple_choice_predictions(model, tokenizer, questions, False, batch_size, desc)
    return [p == q.answer for p, q in zip(predicted, questions)]
