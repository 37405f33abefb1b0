"""DELIA: diversity-enhanced instruction adaptation (arXiv 2408.10841).

A handful of task examples gives a biased gradient: the model learns the instruction's surface form. DELIA mixes the
task rows with many *diverse* rows, the model's own answers to a broad set of queries (self-sampled with
[`build_cache`]), so that the summed gradient approximates the task's ideal feature while the model stays close to
itself. [`DELIATrainer`] mixes `len(task) + min(len(cache), int(len(task) * diverse_ratio))` rows, logs the task and
the diverse losses separately, and adds new special tokens (e.g. `<sep>`) with trainable, correctly initialised
embeddings.

Files: `cache.py` (`build_cache`), `store.py` (the cache file, its settings record, lock and shards),
`vllm_backend.py`, `tokens.py` (new special tokens), `config.py`, `trainer.py`.
"""

from ..data.queries import Query, read_queries
from .cache import QUERIES_FILE, build_cache, one_shot_messages, render_prompt
from .config import DELIAConfig
from .store import CacheError, CacheResult, merge_cache_shards
from .tokens import (
    add_special_tokens,
    expose_head_bias,
    initialise_new_rows,
    load_dsft_model,
    with_embedding_target,
    with_trainable_tokens,
)
from .trainer import DELIATrainer, load_diverse_dataset

# The names of earlier releases.
DSFTConfig = DELIAConfig
DSFTTrainer = DELIATrainer

__all__ = [
    "CacheError",
    "CacheResult",
    "DELIAConfig",
    "DELIATrainer",
    "DSFTConfig",
    "DSFTTrainer",
    "QUERIES_FILE",
    "Query",
    "add_special_tokens",
    "build_cache",
    "expose_head_bias",
    "initialise_new_rows",
    "load_diverse_dataset",
    "load_dsft_model",
    "merge_cache_shards",
    "one_shot_messages",
    "read_queries",
    "render_prompt",
    "with_embedding_target",
    "with_trainable_tokens",
]
