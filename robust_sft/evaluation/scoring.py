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
    groups: list[list[dict]] = [[] for _ in questions]
    for owner, row in zip(owners, prepared):
        groups[owner].append(row)
    # Longest first, so the questions of one batch have nearly one length: little padding, memory errors come early.
    order = sorted(range(len(groups)), key=lambda number: -max(len(row["input_ids"]) for row in groups[number]))
    per_batch = max(1, batch_size // max(len(item.options) for item in questions)) if questions else 1
    was_training = model.training
    model.eval()
    scores: list[list[float]] = [[] for _ in questions]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    for start in tqdm(range(0, len(order), per_batch), desc=desc, leave=False):
        numbers = order[start : start + per_batch]
        for number, options in zip(numbers, shared_prefix_log_probs(model, [groups[i] for i in numbers], pad_id)):
            scores[number] = [
                log_prob / max(tokens, 1) if length_normalized else log_prob for log_prob, tokens in options
            ]
    model.train(was_training)
    return [max(range(len(option_scores)), key=option_scores.__getitem__) for option_scores in scores]


def _shared_length(rows: Sequence[dict[str, list[int]]]) -> int:
    """How many leading tokens every row shares, ending before the first answer token of any row (at least 1)."""
    first_answer = min(next(i for i, label in enumerate(row["labels"]) if label != -100) for row in rows)
    shared = 0
    for tokens in zip(*(row["input_ids"] for row in rows)):
        if shared >= first_answer or any(token != tokens[0] for token in tokens):
            break
        shared += 1
    return max(shared, 1)


@torch.no_grad()
def shared_prefix_log_probs(
    model: PreTrainedModel, groups: Sequence[Sequence[dict[str, list[int]]]], pad_token_id: int
) -> list[list[tuple[float, int]]]:
    """For each group (one question's options, tokenized rows with `labels`), each option's summed answer log-prob and
    answer token count. The tokens a group's options share (the prompt) run once; each option runs only its own tail
    on that prompt's KV cache, so two-label classification costs about one forward instead of two."""
    device = _model_device(model)
    shared = [_shared_length(rows) for rows in groups]
    prefixes = [rows[0]["input_ids"][:length] for rows, length in zip(groups, shared)]
    owners = [number for number, rows in enumerate(groups) for _ in rows]
    tails = [
        (row["input_ids"][length:], row["labels"][length:]) for rows, length in zip(groups, shared) for row in rows
    ]
    width = max(map(len, prefixes))  # prompts padded on the left, so every row's last prompt token is the last column
    prompt_ids = torch.full((len(groups), width), pad_token_id, dtype=torch.long)
    prompt_mask = torch.zeros((len(groups), width), dtype=torch.long)
    for row, ids in enumerate(prefixes):
        prompt_ids[row, width - len(ids) :] = torch.tensor(ids)
        prompt_mask[row, width - len(ids) :] = 1
    positions = (prompt_mask.cumsum(-1) - 1).clamp(min=0)
    inputs = dict(input_ids=prompt_ids.to(device), attention_mask=prompt_mask.to(device), use_cache=True)
    try:
        prompt = model(**inputs, position_ids=positions.to(device), logits_to_keep=1)
        cache = getattr(prompt, "past_key_values", None)
    except TypeError:  # a model that takes no `position_ids` / `logits_to_keep`
        cache = None
    if cache is None:  # a model without a KV cache (or the arguments above): every option scored whole, on its own
        rows = [row for group in groups for row in group]
        log_probs, counts = _token_log_probs(model, _pad_batch(rows, pad_token_id))
        return _by_owner(len(groups), owners, log_probs.tolist(), counts.tolist())
    index = torch.tensor(owners)
    cache.batch_select_indices(index.to(device))
    tail_width = max(len(ids) for ids, _ in tails)
    tail_ids = torch.full((len(tails), tail_width), pad_token_id, dtype=torch.long)
    targets = torch.full((len(tails), tail_width), -100, dtype=torch.long)
    tail_mask = torch.zeros((len(tails), tail_width), dtype=torch.long)
    for row, (ids, labels) in enumerate(tails):
        tail_ids[row, : len(ids)] = torch.tensor(ids)
        targets[row, : len(ids)] = torch.tensor(labels)
        tail_mask[row, : len(ids)] = 1
    tail_positions = torch.tensor([len(prefixes[owner]) for owner in owners])[:, None] + torch.arange(tail_width)
    logits = model(
        input_ids=tail_ids.to(device),
        attention_mask=torch.cat([prompt_mask[index], tail_mask], dim=1).to(device),
        position_ids=tail_positions.to(device),
        past_key_values=cache,
        use_cache=True,
    ).logits
    # A tail's first token is predicted by its prompt's last position, each next one by the tail's previous position.
    logits = torch.cat([prompt.logits[:, -1:][index.to(device)], logits[:, :-1]], dim=1).float()
    targets = targets.to(device)
    mask = targets != -100
    picked = logits.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)
    return _by_owner(len(groups), owners, (picked * mask).sum(-1).tolist(), mask.sum(-1).tolist())


def _by_owner(size: int, owners: list[int], sums: list[float], counts: list[int]) -> list[list[tuple[float, int]]]:
    results: list[list[tuple[float, int]]] = [[] for _ in range(size)]
    for owner, log_prob, tokens in zip(owners, sums, counts):
        results[owner].append((log_prob, int(tokens)))
    return results


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
