"""build_cache on vLLM: token ids in, one seed per request, rows written call by call, the engine freed after.

Not run in this project's CI or on its machines (no GPU, vLLM not installed): the request contract is tested against
vLLM's real classes when vLLM is importable (`tests/test_delia_cache.py`), and skipped otherwise.
"""

from __future__ import annotations

import gc
import logging
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from transformers import PreTrainedTokenizerBase

from .cache import Query, cache_row, row_seed

logger = logging.getLogger(__name__)


def vllm_requests(
    prompts: Sequence[Sequence[int]], seeds: Sequence[int] | None, generation: dict[str, Any]
) -> tuple[list[Any], list[Any]]:
    """vLLM's inputs for `prompts`: token-id prompts (`TokensPrompt`, so vLLM adds no special token: the rendered
    template has them already) and one `SamplingParams` per request, with the request's own seed."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    sampling = generation["do_sample"]
    requests = [TokensPrompt(prompt_token_ids=list(prompt)) for prompt in prompts]
    params = [
        SamplingParams(
            temperature=generation["temperature"] if sampling else 0.0,
            top_p=generation["top_p"] if sampling else 1.0,
            max_tokens=generation["max_new_tokens"],
            seed=seeds[i] if sampling else None,
            stop_token_ids=list(generation["stop_token_ids"]),
        )
        for i in range(len(prompts))
    ]
    return requests, params


def finish_reason(completion: Any) -> str:
    """`"length"` when vLLM cut the answer at `max_tokens`, `"stop"` when it ended on a stop token or EOS."""
    if completion.finish_reason not in ("stop", "length"):
        raise RuntimeError(f"vLLM did not finish a request (finish_reason={completion.finish_reason!r}).")
    return completion.finish_reason


def release_parallel_state() -> None:
    """Tear down vLLM's model-parallel groups, so that the engine's memory can go and training can start."""
    try:
        from vllm.distributed.parallel_state import destroy_distributed_environment, destroy_model_parallel

        destroy_model_parallel()
        destroy_distributed_environment()
    except Exception as error:  # a vLLM without these: collecting the engine below still frees its weights
        logger.debug("vLLM parallel state not destroyed: %s", error)


def collect_gpu_memory() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


@contextmanager
def vllm_sampler(
    model_path: str,
    tokenizer: PreTrainedTokenizerBase,
    generation: dict[str, Any],
    batch_size: int,
    seed: int,
    vllm_kwargs: dict[str, Any] | None,
) -> Iterator[Callable[[list[tuple[Query, list[int]]]], list[dict[str, Any]]]]:
    """A vLLM engine built from `model_path` and `vllm_kwargs` (e.g. `tensor_parallel_size`,
    `gpu_memory_utilization`, `max_model_len`) that samples one chunk per `generate` call (its rows are written before
    the next call), freed when the block ends. `batch_size` is left to vLLM's scheduler (`max_num_seqs` in
    `vllm_kwargs`); the chunks are `CHUNK_BATCHES * batch_size` queries."""
    try:
        from vllm import LLM
    except ImportError:
        raise ImportError("backend='vllm' needs vLLM: `pip install robust_sft[vllm]` (a CUDA machine).") from None
    engine = {"llm": LLM(model=model_path, seed=seed, **(vllm_kwargs or {}))}  # the only reference to the engine

    def sample_chunk(chunk: list[tuple[Query, list[int]]]) -> list[dict[str, Any]]:
        seeds = [row_seed(seed, query.key) for query, _ in chunk]
        requests, params = vllm_requests([prompt for _, prompt in chunk], seeds, generation)
        rows = []
        for (query, _), output in zip(chunk, engine["llm"].generate(requests, params, use_tqdm=False), strict=True):
            completion = output.outputs[0]
            tokens = [token for token in completion.token_ids if token not in generation["stop_token_ids"]]
            answer = tokenizer.decode(tokens, skip_special_tokens=True).strip()
            rows.append(cache_row(query, answer, finish_reason(completion), len(tokens)))
        return rows

    try:
        yield sample_chunk
    finally:  # the engine's GPU memory goes back before training starts in this process
        release_parallel_state()
        engine.clear()
        collect_gpu_memory()
