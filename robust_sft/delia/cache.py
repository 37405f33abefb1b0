"""build_cache: the model's own answers to a broad set of queries, the diverse rows DELIA mixes in."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ..data import DataFormatError, detect_format, load_examples, to_example
from ..generation import generate_batch

logger = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------------ build_cache
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


def one_shot_messages(query: Query, system_prompt: str | None = None) -> list[dict[str, str]]:
    """The paper's prompt: [system], user = query, assistant = reference, user = query (zero-shot without one)."""
    messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
    if query.reference:
        messages += [{"role": "user", "content": query.text}, {"role": "assistant", "content": query.reference}]
    return messages + [{"role": "user", "content": query.text}]


def render_prompt(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]]) -> str:
    """Render with the generation prompt; a template that rejects the system role gets it folded into the user turn."""
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    except Exception as error:  # jinja2's TemplateError: "System role not supported" (Gemma and others)
        if messages[0]["role"] != "system":
            raise
        folded = [dict(turn) for turn in messages[1:]]
        folded[0]["content"] = f"{messages[0]['content']}\n\n{folded[0]['content']}"
        logger.info("The chat template rejects the system role (%s); it is folded into the first user turn.", error)
        return tokenizer.apply_chat_template(folded, tokenize=False, add_generation_prompt=True)


def _read_cache(path: Path) -> set[str]:
    """Keys already cached. A last line cut off by an interruption is dropped (the file is rewritten atomically)."""
    if not path.is_file():
        return set()
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    keys, good = set(), []
    for number, line in enumerate(lines):
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            if number == len(lines) - 1:  # the interrupted write
                break
            raise ValueError(f"{path}: line {number + 1} is not JSON; the cache is damaged.") from None
        if not line.endswith("\n"):
            break
        keys.add(row["query_key"])
        good.append(line)
    if len(good) < len(lines):
        temporary = path.with_suffix(path.suffix + ".tmp")
        temporary.write_text("".join(good), encoding="utf-8")
        os.replace(temporary, path)
        logger.warning("%s: dropped an incomplete last row left by an interrupted run.", path)
    return keys


def _generate_vllm(model_path: str, prompts: list[str], generation: dict[str, Any], seed: int) -> list[str]:
    from vllm import LLM, SamplingParams  # optional dependency: `pip install robust_sft[vllm]`

    llm = LLM(model=model_path, seed=seed)
    params = SamplingParams(
        temperature=generation.get("temperature", 0.0) if generation.get("do_sample") else 0.0,
        top_p=generation.get("top_p", 1.0) if generation.get("do_sample") else 1.0,
        max_tokens=generation["max_new_tokens"],
        seed=seed,
    )
    return [result.outputs[0].text.strip() for result in llm.generate(prompts, params)]


def build_cache(
    model: PreTrainedModel | str | os.PathLike | None,
    tokenizer: PreTrainedTokenizerBase | None,
    queries: Dataset | str | os.PathLike | Sequence[str] | Sequence[dict[str, Any]] | Sequence[Query],
    output_path: str | os.PathLike,
    *,
    query_field: str | None = None,
    answer_field: str | None = None,
    system_prompt: str | None = None,
    batch_size: int = 16,
    temperature: float = 0.7,
    top_p: float = 0.95,
    max_new_tokens: int = 512,
    do_sample: bool = True,
    seed: int = 0,
    backend: str = "transformers",
) -> Path:
    """Self-sample the diverse data of DELIA: the model's own answers to `queries`, appended to a JSONL cache.

    Each query is asked with the paper's one-shot prompt (query, its reference answer as the demonstration, the query
    again; `add_generation_prompt` always) and one answer is sampled (temperature 0.7, top_p 0.95, up to 512 new
    tokens by default; `do_sample=False` for greedy). Rows are `{"messages": [user = query, assistant = answer],
    "query_key": ...}`, which [`DELIATrainer`] reads back. Rows are appended batch by batch as they finish, so an
    interrupted run loses at most the batch in flight; a re-run skips the queries already in the cache.

    Args:
        model: A model, or a hub id / folder / `None` (embedded default) loaded with `load_model_and_tokenizer`.
        queries: Plain strings, `Query` objects, or rows in any data-layer format (a Dataset or a file), where the
            user turn is the query and the answer its reference; or name the fields with `query_field` /
            `answer_field` (e.g. GSM8K's `question` / `answer`).
        backend: `transformers` (batched, left-padded `generate`) or `vllm` (needs vllm installed and a model path).
    """
    if backend not in ("transformers", "vllm"):
        raise ValueError(f"backend must be 'transformers' or 'vllm', got {backend!r}.")
    output_path = Path(output_path)
    output_path.parent.mkdir(parents=True, exist_ok=True)
    model_path = None
    if model is None or isinstance(model, (str, os.PathLike)):
        from ..modeling import ensure_embedded_model, load_model_and_tokenizer

        model_path = str(model) if model is not None else None
        if backend == "vllm":
            model_path = model_path or str(ensure_embedded_model())
            from ..modeling import load_tokenizer

            tokenizer = tokenizer or load_tokenizer(model_path)
        else:
            model, loaded_tokenizer = load_model_and_tokenizer(model_path)
            tokenizer = tokenizer or loaded_tokenizer
    elif backend == "vllm":
        raise ValueError("The vllm backend loads the model itself: pass a hub id or a folder, not a model object.")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if queries and isinstance(queries, (list, tuple)) and isinstance(queries[0], Query):
        items = list(queries)
    else:
        items = read_queries(queries, query_field, answer_field)
    seen = _read_cache(output_path)
    pending = []
    for query in items:  # each query once, and none that is already cached
        if query.key not in seen:
            seen.add(query.key)
            pending.append(query)
    if not pending:
        logger.info("%s already holds all %d queries.", output_path, len(items))
        return output_path
    logger.info(
        "Sampling %d queries (%d already cached) into %s.", len(pending), len(items) - len(pending), output_path
    )
    generation = {"max_new_tokens": max_new_tokens, "do_sample": do_sample}
    if do_sample:
        generation.update(temperature=temperature, top_p=top_p)
    was_training = None if backend == "vllm" else model.training
    if was_training is not None:
        model.eval()
    try:
        with open(output_path, "a", encoding="utf-8") as cache:
            if backend == "vllm":
                prompts = [render_prompt(tokenizer, one_shot_messages(query, system_prompt)) for query in pending]
                answers = _generate_vllm(model_path, prompts, generation, seed)
                _append(cache, pending, answers)
            else:
                for start in tqdm(range(0, len(pending), batch_size), desc="build_cache", unit="batch"):
                    chunk = pending[start : start + batch_size]
                    torch.manual_seed(seed + start)  # a batch's samples do not depend on what ran before
                    prompts = [render_prompt(tokenizer, one_shot_messages(query, system_prompt)) for query in chunk]
                    _append(cache, chunk, generate_batch(model, tokenizer, prompts, **generation))
    finally:
        if was_training:
            model.train()
    return output_path


def _append(cache, queries: list[Query], answers: list[str]) -> None:
    lines = []
    for query, answer in zip(queries, answers, strict=True):
        row = {
            "messages": [{"role": "user", "content": query.text}, {"role": "assistant", "content": answer}],
            "query_key": query.key,
        }
        lines.append(json.dumps(row, ensure_ascii=False) + "\n")
    cache.write("".join(lines))  # whole rows at once, then on disk before the next batch starts
    cache.flush()
    os.fsync(cache.fileno())
