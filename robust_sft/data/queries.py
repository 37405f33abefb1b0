"""Queries for self-sampling: plain strings, rows of any format, or self-instruct seed tasks (DELIA's cache)."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from datasets import Dataset

from .formats import DataFormatError, detect_format, load_examples, to_example


@dataclass
class Query:
    """A query of the self-sampling cache and its reference answer (the one-shot demonstration), if any."""

    text: str
    reference: str | None = None

    @property
    def key(self) -> str:
        """Identifies the query in the cache (a re-run skips the keys already there)."""
        return hashlib.sha256(json.dumps([self.text, self.reference]).encode()).hexdigest()[:24]


def read_queries(
    source: Dataset | str | os.PathLike | Sequence[str] | Sequence[dict[str, Any]],
    query_field: str | None = None,
    answer_field: str | None = None,
) -> list[Query]:
    """Queries from plain strings, rows of any data-layer format, self-instruct seed tasks (`instruction` +
    `instances`), or any rows with `query_field` / `answer_field`.

    Malformed rows raise `DataFormatError` naming the row.
    """
    if isinstance(source, (list, tuple)) and all(isinstance(item, str) for item in source):
        queries = []
        for index, text in enumerate(source):
            if not text.strip():
                raise DataFormatError(f"Query {index} is empty. Drop it or give it a text.")
            queries.append(Query(text))
        return queries
    rows = load_examples(source)
    if query_field is not None:
        queries = []
        for index, row in enumerate(rows):
            text = row.get(query_field)
            if not isinstance(text, str) or not text.strip():
                raise DataFormatError(f"Row {index}: field `{query_field}` is missing or empty (got {text!r}).")
            reference = row.get(answer_field) if answer_field else None
            if answer_field and (not isinstance(reference, str) or not reference.strip()):
                raise DataFormatError(f"Row {index}: field `{answer_field}` is missing or empty (got {reference!r}).")
            queries.append(Query(text, reference))
        return queries
    if {"instruction", "instances"} <= set(rows.column_names):
        return [_self_instruct_query(row, index) for index, row in enumerate(rows)]
    data_format = detect_format(rows.column_names)
    queries = []
    for index, row in enumerate(rows):
        example = to_example(row, data_format, index)
        if example.messages is None:
            queries.append(Query(example.prompt, example.completion or None))
            continue
        if example.instruction_turn is None:
            raise DataFormatError(f"Row {index}: the conversation has no user turn to use as a query.")
        queries.append(Query(example.messages[example.instruction_turn]["content"], example.messages[-1]["content"]))
    return queries


def _self_instruct_query(row: dict[str, Any], index: int) -> Query:
    """A self-instruct seed task: the instruction (+ its first instance's input) and that instance's output."""
    instruction, instances = row.get("instruction"), row.get("instances") or []
    if not isinstance(instruction, str) or not instruction.strip():
        raise DataFormatError(f"Row {index}: field `instruction` is missing or empty (got {instruction!r}).")
    first = instances[0] if instances and isinstance(instances[0], dict) else {}
    extra = first.get("input") or ""
    return Query(instruction + (f"\n\n{extra}" if extra.strip() else ""), first.get("output") or None)
