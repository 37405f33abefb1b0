"""build_cache: the model's own answers to a broad set of queries, the diverse rows DELIA mixes in."""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from datasets import Dataset
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ..data.queries import Query, read_queries
from ..generation import end_of_turn_token_ids, sample_continuations
from .store import (
    CacheError,
    CacheResult,
    check_settings,
    config_fingerprint,
    encode_row,
    files_fingerprint,
    merge_cache_shards,
    read_meta,
    read_rows,
    repair_tail,
    set_in_flight,
    shard_of,
    shard_path,
    tokenizer_identity,
    weights_fingerprint,
    writer_lock,
)

logger = logging.getLogger(__name__)

# 80 everyday instructions with short reference answers, written for robust_sft: a small broad query set for examples
# and smoke runs (the paper samples thousands; point build_cache at a larger set, e.g. self-instruct, for real runs).
QUERIES_FILE = Path(__file__).with_name("queries.jsonl")


# ------------------------------------------------------------------------------------------------ build_cache
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


# ------------------------------------------------------------------------------------------------ build_cache
CHUNK_BATCHES = 4  # batches sampled together (a chunk): the unit an interrupted run's re-run redoes


def row_seed(seed: int, key: str) -> int:
    """The sampling seed of one query, derived from the run's `seed` and the query's own key (63 bits)."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{key}".encode()).digest()[:8], "big") >> 1


def prompt_ids(tokenizer: PreTrainedTokenizerBase, query: Query, system_prompt: str | None) -> list[int]:
    """The one-shot prompt as token ids; the template already holds the special tokens (none are added again)."""
    return tokenizer(render_prompt(tokenizer, one_shot_messages(query, system_prompt)), add_special_tokens=False)[
        "input_ids"
    ]


def cache_row(query: Query, answer: str, finish_reason: str, new_tokens: int) -> dict[str, Any]:
    return {
        "messages": [{"role": "user", "content": query.text}, {"role": "assistant", "content": answer}],
        "query_key": query.key,
        "finish_reason": finish_reason,
        "new_tokens": new_tokens,
    }


def sampling_order(queries: Sequence[Query], prompts: Sequence[Sequence[int]]) -> list[int]:
    """Shortest prompt first, ties by key: each batch pads little, and the order depends on the queries alone, so a
    resumed run (whose pending queries are the tail of this order) forms the batches of an uninterrupted one."""
    return sorted(range(len(queries)), key=lambda i: (len(prompts[i]), queries[i].key))


def progress_bar(total: int, target: Path, enabled: bool):
    return tqdm(total=total, desc=f"build_cache {target.name}", unit="query", disable=not enabled, smoothing=0.05)


def _as_queries(
    queries: Dataset | str | os.PathLike | Sequence[str] | Sequence[dict[str, Any]] | Sequence[Query],
    query_field: str | None,
    answer_field: str | None,
) -> list[Query]:
    if isinstance(queries, (list, tuple)) and queries and all(isinstance(query, Query) for query in queries):
        items = list(queries)
    else:
        items = read_queries(queries, query_field, answer_field)
    unique: dict[str, Query] = {}
    for query in items:  # each query once
        unique.setdefault(query.key, query)
    return list(unique.values())


def _launch(shard: tuple[int, int] | None) -> tuple[int, int, Callable[[], None] | None]:
    """(rank, world size, barrier): the explicit `shard`, else the multi-process launch this runs under, if any."""
    if shard is not None:
        rank, world = shard
        if not 0 <= rank < world:
            raise ValueError(f"shard must be (rank, world_size) with 0 <= rank < world_size, got {shard}.")
        return rank, world, None
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 0, 1, None
    import torch
    from accelerate import PartialState

    # The process group the trainer will use too (accelerate's state is shared); a CPU-only launch must say so.
    state = PartialState(cpu=not torch.cuda.is_available())
    if state.num_processes <= 1:
        raise RuntimeError(f"WORLD_SIZE is {os.environ['WORLD_SIZE']} but no process group could be set up.")
    return state.process_index, state.num_processes, state.wait_for_everyone


def _resolve_model(model: Any, tokenizer: Any, backend: str) -> tuple[Any, Any, str | None]:
    """(model object or None for vLLM, tokenizer, model path or None)."""
    if model is not None and not isinstance(model, (str, os.PathLike)):
        if backend == "vllm":
            raise ValueError("The vllm backend loads the model itself: pass a hub id or a folder, not a model object.")
        if tokenizer is None:
            raise ValueError("build_cache needs the model's tokenizer when it is given a model object.")
        return model, tokenizer, None
    from ..modeling import ensure_embedded_model, load_model_and_tokenizer, load_tokenizer

    path = os.fspath(model) if model is not None else None
    if backend == "vllm":
        path = path or str(ensure_embedded_model())
        return None, tokenizer or load_tokenizer(path), path
    loaded, loaded_tokenizer = load_model_and_tokenizer(path)
    return loaded, tokenizer or loaded_tokenizer, path


def cache_settings(
    model: PreTrainedModel | None,
    tokenizer: PreTrainedTokenizerBase,
    model_path: str | None,
    generation: dict[str, Any],
) -> dict[str, Any]:
    """What made a cache's rows, recorded in `<cache>.meta.json` and compared on resume: the model (its name, hub
    revision, a hash of its config and of its weights), the chat template and vocabulary, the generation settings."""
    if model is not None:
        config = model.config
        weights = {"weights_fingerprint": weights_fingerprint(model)}  # the weights in memory, which made the rows
    else:  # vLLM loads the files itself: hash them
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(model_path)
        weights = {"weight_files_sha256": files_fingerprint(model_path) if Path(model_path).is_dir() else None}
    identity = {
        "name_or_path": getattr(config, "_name_or_path", None) or model_path,
        "revision": getattr(config, "_commit_hash", None),
        "config_sha256": config_fingerprint(config),
        **weights,
    }
    return {"model": identity, "tokenizer": tokenizer_identity(tokenizer), "generation": generation}


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
    force: bool = False,
    shard: tuple[int, int] | None = None,
    lock_timeout: float = 0.0,
    vllm_kwargs: dict[str, Any] | None = None,
    progress: bool = True,
) -> CacheResult:
    """Self-sample the diverse data of DELIA: the model's own answers to `queries`, appended to a JSONL cache.

    Each query is asked with the paper's one-shot prompt (query, its reference answer as the demonstration, the query
    again; `add_generation_prompt` always) and one answer is sampled (temperature 0.7, top_p 0.95, up to 512 new
    tokens by default; `do_sample=False` for greedy), stopping at the chat template's end-of-turn token. Rows are
    `{"messages": [user = query, assistant = answer], "query_key": ..., "finish_reason": "stop" | "length",
    "new_tokens": ...}` (the answer's length in tokens, its end-of-turn token not counted); answers
    cut off by `max_new_tokens` are kept in the file but flagged, and [`load_diverse_dataset`] drops them.

    Resuming is exact: each answer is drawn from a generator seeded by `seed` and the query's own key, queries are
    taken in a fixed order (shortest prompt first, ties by key) in chunks of `4 * batch_size`, each row is appended
    as it finishes, and the chunk in flight is recorded, so an interrupted run's re-run redoes that chunk as it was
    and then the chunks an uninterrupted run forms: the same rows, sampling included. The global RNG is never
    touched. The settings are
    recorded in `<cache>.meta.json` and compared on resume: another model, template or generation setting is refused
    unless `force=True`. A lock (`<cache>.lock`) keeps a second writer out.

    Under a multi-process launch (torchrun, `accelerate launch`) each process samples its share of the queries into
    `<cache>.rank{i}`, then rank 0 merges the shards into the cache; `shard=(rank, world_size)` does one share by
    hand (merge with [`merge_cache_shards`]).

    Args:
        model: A model, or a hub id / folder / `None` (embedded default) loaded with `load_model_and_tokenizer`.
        queries: Plain strings, `Query` objects, or rows in any data-layer format (a Dataset or a file), where the
            user turn is the query and the answer its reference; or name the fields with `query_field` /
            `answer_field` (e.g. GSM8K's `question` / `answer`).
        batch_size: Rows generated together; finished rows leave the batch and the next queries join it.
        backend: `transformers` (the model in this process) or `vllm` (needs vllm and a model id or folder; engine
            arguments in `vllm_kwargs`).
        force: Continue a cache made with other settings (mixing two models' or settings' answers on purpose).
        lock_timeout: Seconds to wait for another writer of the same cache before failing (0: fail at once).

    Returns:
        A [`CacheResult`]: the cache's path (usable wherever a path is) with the counts of usable, truncated and
        newly written rows.
    """
    if backend not in ("transformers", "vllm"):
        raise ValueError(f"backend must be 'transformers' or 'vllm', got {backend!r}.")
    if batch_size < 1 or max_new_tokens < 1:
        raise ValueError(f"batch_size and max_new_tokens must be >= 1, got {batch_size} and {max_new_tokens}.")
    if do_sample and (temperature <= 0 or not 0 < top_p <= 1):
        raise ValueError(f"Sampling needs temperature > 0 and 0 < top_p <= 1, got {temperature} and {top_p}.")
    output_path = Path(output_path)
    output_path.parent.mkdir(parents=True, exist_ok=True)
    items = _as_queries(queries, query_field, answer_field)  # bad queries fail before a model is loaded
    rank, world, barrier = _launch(shard)
    model, tokenizer, model_path = _resolve_model(model, tokenizer, backend)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    generation = {
        "backend": backend,
        "prompt": "one-shot: query, reference, query",
        "system_prompt": system_prompt,
        "do_sample": do_sample,
        "temperature": temperature if do_sample else None,
        "top_p": top_p if do_sample else None,
        "seed": seed if do_sample else None,
        "max_new_tokens": max_new_tokens,
        "stop_token_ids": end_of_turn_token_ids(tokenizer, model),
    }
    settings = cache_settings(model, tokenizer, model_path, generation)
    target = output_path
    if world > 1:
        target = shard_path(output_path, rank)
        merged = {row["query_key"] for row in read_rows(output_path)[0]}  # merged by an earlier run: not redone
        recorded = read_meta(output_path)
        if recorded is not None and not force:
            from .store import differences

            found = differences(recorded["settings"], settings)
            if found:
                raise CacheError(f"{output_path} was made with other settings: {'; '.join(found)}. Pass force=True.")
        items = [query for query in items if shard_of(query.key, world) == rank and query.key not in merged]
    with writer_lock(target, lock_timeout):
        cached_rows = repair_tail(target)
        check_settings(target, settings, has_rows=bool(cached_rows), force=force)
        cached = {row["query_key"] for row in cached_rows}
        pending = [query for query in items if query.key not in cached]
        chunks = plan_chunks(tokenizer, items, cached, target, batch_size * CHUNK_BATCHES, system_prompt)
        if chunks:
            logger.info("Sampling %d queries (%d cached) into %s.", len(pending), len(items) - len(pending), target)
            if backend == "vllm":
                from .vllm_backend import vllm_sampler

                sampler = vllm_sampler(model_path, tokenizer, generation, batch_size, seed, vllm_kwargs)
            else:
                sampler = transformers_sampler(model, tokenizer, generation, batch_size, seed)
            with sampler as sample_chunk:
                written, truncated = write_chunks(target, chunks, cached, sample_chunk, len(pending), progress)
        else:
            written = truncated = 0
            logger.info("%s already holds all %d queries.", target, len(items))
    counts = dict(written=written, written_truncated=truncated, skipped=len(items) - len(pending))
    if barrier is not None:
        barrier()
        if rank == 0:
            merge_cache_shards(output_path, world, force=force)
        barrier()
        target = output_path
    result = CacheResult.of(target, **counts)
    logger.info(
        "%s: %d usable rows; %d cut off by max_new_tokens=%d and %d empty (kept in the file, flagged, not trained).",
        target,
        result.rows,
        result.truncated,
        max_new_tokens,
        result.empty,
    )
    return result


def plan_chunks(
    tokenizer: PreTrainedTokenizerBase,
    items: list[Query],
    cached: set[str],
    target: Path,
    size: int,
    system_prompt: str | None,
) -> list[list[tuple[Query, list[int]]]]:
    """The chunks to sample, each a list of (query, prompt ids) generated together and written as its rows finish.

    A chunk an interrupted run left unfinished (recorded in the settings record as `in_flight`) comes first and whole,
    its cached rows included (they are sampled again, not written again), so it is computed exactly as before. The
    other uncached queries follow in `sampling_order`, cut every `size`: the chunks of an uninterrupted run."""
    by_key = {query.key: query for query in items}
    in_flight = [key for key in (read_meta(target) or {}).get("in_flight") or [] if key in by_key]
    redo = [by_key[key] for key in in_flight] if set(in_flight) - cached else []
    rest = [query for query in items if query.key not in cached and query.key not in set(in_flight)]
    prompts = {query.key: prompt_ids(tokenizer, query, system_prompt) for query in redo + rest}
    order = [rest[i] for i in sampling_order(rest, [prompts[query.key] for query in rest])]
    chunks = [redo] if redo else []
    chunks += [order[start : start + size] for start in range(0, len(order), size)]
    return [[(query, prompts[query.key]) for query in chunk] for chunk in chunks]


def write_chunks(
    target: Path,
    chunks: list[list[tuple[Query, list[int]]]],
    cached: set[str],
    sample_chunk: Callable[[list[tuple[Query, list[int]]]], Any],
    total: int,
    progress: bool,
) -> tuple[int, int]:
    """Sample the chunks in order, appending each row as it finishes (flushed; fsynced at the end of each chunk).
    The chunk in flight is recorded first, so an interrupted run's re-run redoes it exactly. Returns (rows written,
    of which truncated)."""
    written = truncated = 0
    with open(target, "ab") as handle, progress_bar(total, target, progress) as bar:
        for chunk in chunks:
            set_in_flight(target, [query.key for query, _ in chunk])
            for row in sample_chunk(chunk):
                if row["query_key"] in cached:  # written before an interruption: same row, kept once
                    continue
                handle.write(encode_row(row))
                handle.flush()
                cached.add(row["query_key"])
                written += 1
                truncated += row["finish_reason"] == "length"
                bar.update(1)
            os.fsync(handle.fileno())
        set_in_flight(target, None)
    return written, truncated


@contextmanager
def transformers_sampler(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, generation: dict[str, Any], batch_size: int, seed: int
) -> Iterator[Callable[[list[tuple[Query, list[int]]]], Iterator[dict[str, Any]]]]:
    """Sample chunks with [`sample_continuations`] (the model in eval mode meanwhile), yielding rows as they finish."""
    sampling = generation["do_sample"]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    def sample_chunk(chunk: list[tuple[Query, list[int]]]) -> Iterator[dict[str, Any]]:
        for row in sample_continuations(
            model,
            [prompt for _, prompt in chunk],
            max_new_tokens=generation["max_new_tokens"],
            batch_size=batch_size,
            stop_token_ids=generation["stop_token_ids"],
            temperature=generation["temperature"] if sampling else 0.0,
            top_p=generation["top_p"] if sampling else 1.0,
            seeds=[row_seed(seed, query.key) for query, _ in chunk] if sampling else None,
            pad_token_id=pad,
        ):
            answer = tokenizer.decode(row.token_ids, skip_special_tokens=True).strip()
            yield cache_row(chunk[row.index][0], answer, row.finish_reason, len(row.token_ids))

    was_training = model.training
    model.eval()
    try:
        yield sample_chunk
    finally:
        model.train(was_training)
