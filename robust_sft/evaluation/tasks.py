"""Task loaders over local files: GSM8K, PIQA, SST-2 and AG News."""

from __future__ import annotations

import json
import os
import random
from collections.abc import Sequence
from pathlib import Path

from datasets import Dataset

from ..data import load_examples
from .scoring import MultipleChoiceQuestion


def load_gsm8k(path: str | os.PathLike, limit: int | None = None) -> Dataset:
    """GSM8K rows (`question`, `answer` ending in `#### N`) as Alpaca rows (`instruction`, `output`)."""
    rows = load_examples(path)
    rows = rows.select(range(min(limit, len(rows)))) if limit is not None else rows
    return rows.map(
        lambda row: {"instruction": row["question"], "input": "", "output": row["answer"]},
        remove_columns=rows.column_names,
    )


def load_piqa(folder: str | os.PathLike, limit: int | None = None) -> list[MultipleChoiceQuestion]:
    """PIQA validation (`valid.jsonl` + `valid-labels.lst`) as two-option questions."""
    folder = Path(folder)
    goals = [json.loads(line) for line in (folder / "valid.jsonl").read_text(encoding="utf-8").splitlines() if line]
    labels = [int(line) for line in (folder / "valid-labels.lst").read_text().split()]
    if len(goals) != len(labels):
        raise ValueError(f"{folder}: {len(goals)} questions but {len(labels)} labels.")
    questions = [MultipleChoiceQuestion(g["goal"], [g["sol1"], g["sol2"]], label) for g, label in zip(goals, labels)]
    return questions[:limit] if limit is not None else questions


SST2_LABELS = ("negative", "positive")


AGNEWS_LABELS = ("World", "Sports", "Business", "Sci/Tech")


SST2_INSTRUCTION = "Classify the sentiment of the review as positive or negative."


AGNEWS_INSTRUCTION = "Classify the topic of the news article as World, Sports, Business or Sci/Tech."


def _classification_rows(texts: Sequence[str], answers: Sequence[str], instruction: str) -> Dataset:
    return Dataset.from_list(
        [{"instruction": instruction, "input": text.strip(), "output": answer} for text, answer in zip(texts, answers)]
    )


def load_sst2(
    path: str | os.PathLike,
    limit: int | None = None,
    instruction: str = SST2_INSTRUCTION,
    seed: int | None = None,
    min_words: int = 0,
) -> Dataset:
    """SST-2 (`sentence<TAB>label`, 1 = positive) as instruction-classification rows answering with a label word.

    `seed` shuffles before `limit` (the files are ordered); `None` keeps the file order. `min_words` drops the short
    phrases of the phrase-level training file.
    """
    rows = load_examples(path)
    if min_words:
        rows = rows.filter(lambda row: len(str(row["sentence"]).split()) >= min_words)
    if seed is not None:
        rows = rows.shuffle(seed=seed)
    rows = rows.select(range(min(limit, len(rows)))) if limit is not None else rows
    return _classification_rows(rows["sentence"], [SST2_LABELS[int(label)] for label in rows["label"]], instruction)


def load_agnews(
    path: str | os.PathLike, limit: int | None = None, instruction: str = AGNEWS_INSTRUCTION, seed: int | None = None
) -> Dataset:
    """AG News (`text<TAB>label-name`, no header) as instruction-classification rows answering with the label."""
    lines = [line.rsplit("\t", 1) for line in Path(path).read_text(encoding="utf-8").splitlines() if "\t" in line]
    unknown = {label for _, label in lines} - set(AGNEWS_LABELS)
    if unknown:
        raise ValueError(f"{path}: unknown labels {sorted(unknown)}; expected {AGNEWS_LABELS}.")
    if seed is not None:
        random.Random(seed).shuffle(lines)
    lines = lines[:limit] if limit is not None else lines
    return _classification_rows([text for text, _ in lines], [label for _, label in lines], instruction)
