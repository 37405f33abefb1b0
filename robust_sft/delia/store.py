"""The self-sampling cache on disk: its rows, its settings record, its writer lock and its shards.

A cache is a JSONL file, one row per `\\n`-terminated line, whatever the text: the only line breaks that `json.dumps`
leaves raw (U+2028, U+2029, U+0085, which `str.splitlines` also splits on) are written as escapes, and the reader
splits on `\\n` alone. Next to it, `<cache>.meta.json` records what made the rows (the model's identity, the chat
template, the generation settings); `<cache>.lock` keeps a second writer out; a multi-process run writes one
`<cache>.rank{i}` shard per process, merged afterwards without duplicates.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

logger = logging.getLogger(__name__)

CACHE_FORMAT = 1
# Settings that name the model rather than identify it: recorded, never compared (a moved folder is the same model).
INFORMATIVE = ("model.name_or_path",)
_RAW_LINE_BREAKS = {"\u2028": "\\u2028", "\u2029": "\\u2029", "\x85": "\\u0085"}
# Config entries that do not change what the model computes.
_VOLATILE_CONFIG = {"transformers_version", "output_attentions", "output_hidden_states", "return_dict", "use_cache"}


class CacheError(ValueError):
    """A cache that cannot be continued as asked: damaged, made with other settings, or written by another process."""


def meta_path(path: str | os.PathLike) -> Path:
    return Path(f"{os.fspath(path)}.meta.json")


def lock_path(path: str | os.PathLike) -> Path:
    return Path(f"{os.fspath(path)}.lock")


def shard_path(path: str | os.PathLike, rank: int) -> Path:
    return Path(f"{os.fspath(path)}.rank{rank}")


def shard_of(key: str, world_size: int) -> int:
    """The shard (process) that samples the query with this key: a stable hash, the same in every process."""
    return int(hashlib.sha256(key.encode()).hexdigest()[:15], 16) % world_size


# ------------------------------------------------------------------------------------------------ rows
def encode_row(row: dict[str, Any]) -> bytes:
    """One `\\n`-terminated UTF-8 line; no other character of it is a line break to any reader."""
    text = json.dumps(row, ensure_ascii=False)
    for raw, escaped in _RAW_LINE_BREAKS.items():  # they occur only inside JSON strings, where the escape is valid
        text = text.replace(raw, escaped)
    try:
        return (text + "\n").encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate cannot be UTF-8: escape everything instead
        return (json.dumps(row, ensure_ascii=True) + "\n").encode("ascii")


def read_rows(path: str | os.PathLike) -> tuple[list[dict[str, Any]], int]:
    """The rows of a cache file and the number of bytes of an unfinished last line (an interrupted write), which is
    not a row. A damaged line anywhere else is an error that names it."""
    path = Path(path)
    if not path.is_file():
        return [], 0
    *lines, tail = path.read_bytes().split(b"\n")
    rows = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise CacheError(f"{path}: line {number} is not a JSON row; the cache is damaged.") from None
        if not isinstance(row, dict) or "messages" not in row:
            raise CacheError(f"{path}: line {number} is not a cache row (no `messages`).")
        rows.append(row)
    return rows, len(tail)


def repair_tail(path: Path) -> list[dict[str, Any]]:
    """The rows, after cutting off an unfinished last line left by an interrupted run (call under the lock)."""
    rows, torn = read_rows(path)
    if torn:
        with open(path, "r+b") as handle:
            handle.truncate(path.stat().st_size - torn)
            handle.flush()
            os.fsync(handle.fileno())
        logger.warning("%s: dropped an unfinished last row (%d bytes) left by an interrupted run.", path, torn)
    return rows


def append_rows(handle: BinaryIO, rows: Iterable[dict[str, Any]]) -> None:
    """Append whole rows in one write, on disk before returning."""
    handle.write(b"".join(encode_row(row) for row in rows))
    handle.flush()
    os.fsync(handle.fileno())


def is_usable(row: dict[str, Any]) -> bool:
    """A complete, non-empty answer: rows cut off by `max_new_tokens` (`finish_reason: "length"`) are not."""
    answer = row["messages"][-1].get("content") or ""
    return row.get("finish_reason", "stop") == "stop" and bool(answer.strip())


# ------------------------------------------------------------------------------------------------ settings
def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def weights_fingerprint(model: Any, sample: int = 4096) -> str:
    """A hash of the weights in memory: every tensor's name, dtype and shape and `sample` of its values, evenly spaced.

    Any fine-tune, merge or other checkpoint changes it; it costs a few milliseconds, whatever the model size."""
    import torch

    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        if not isinstance(tensor, torch.Tensor):
            continue
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}".encode())
        if tensor.device.type == "meta" or tensor.numel() == 0:
            continue
        flat = tensor.detach().reshape(-1)
        values = flat[:: max(1, flat.numel() // sample)][:sample].contiguous().cpu()
        digest.update(values.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def files_fingerprint(folder: str | os.PathLike) -> str:
    """A hash of a model folder's weight files (their names and contents), for engines that load the files
    themselves (vLLM)."""
    digest = hashlib.sha256()
    for file in sorted(Path(folder).iterdir()):
        if file.suffix in (".safetensors", ".bin", ".pt", ".gguf"):
            digest.update(file.name.encode())
            with open(file, "rb") as handle:
                for block in iter(lambda: handle.read(1 << 24), b""):
                    digest.update(block)
    return digest.hexdigest()


def config_fingerprint(config: Any) -> str:
    """A hash of the model config, without the entries that name the folder or only change what `forward` returns."""
    values = {k: v for k, v in config.to_dict().items() if not k.startswith("_") and k not in _VOLATILE_CONFIG}
    return _sha256(json.dumps(values, sort_keys=True, default=str))


def tokenizer_identity(tokenizer: Any) -> dict[str, Any]:
    template = getattr(tokenizer, "chat_template", None)
    return {
        "chat_template_sha256": _sha256(json.dumps(template, sort_keys=True)) if template else None,
        "vocab_size": len(tokenizer),
    }


def _flatten(settings: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in settings.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def differences(recorded: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """The settings that differ, as `name: recorded != current` (names only informative are skipped)."""
    old, new = _flatten(recorded), _flatten(current)
    found = []
    for name in sorted(set(old) | set(new)):
        if name in INFORMATIVE or old.get(name) == new.get(name):
            continue
        if name == "model.revision" and (old.get(name) is None or new.get(name) is None):
            continue  # only compared when both runs know it
        found.append(f"{name}: {old.get(name)!r} in the cache, {new.get(name)!r} now")
    return found


def _write_json(path: Path, value: dict[str, Any]) -> None:
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(json.dumps(value, indent=2, ensure_ascii=False), encoding="utf-8")
    os.replace(temporary, path)


def read_meta(path: str | os.PathLike) -> dict[str, Any] | None:
    file = meta_path(path)
    return json.loads(file.read_text(encoding="utf-8")) if file.is_file() else None


def check_settings(path: Path, settings: dict[str, Any], has_rows: bool, force: bool) -> None:
    """Record the settings of a new cache; refuse to continue one made with other settings unless `force`."""
    recorded = read_meta(path)
    if recorded is None:
        if has_rows and not force:
            raise CacheError(
                f"{path} has rows but no settings record ({meta_path(path).name}): it was written by an older "
                "robust_sft, so nothing says which model and settings made them. Start a new cache, or pass "
                "force=True (--force) to continue it with the current settings."
            )
        _write_json(meta_path(path), {"format": CACHE_FORMAT, "settings": settings})
        return
    found = differences(recorded["settings"], settings)
    if not found:
        return
    if not force:
        raise CacheError(
            f"{path} was made with other settings, and resuming would mix the answers of two models or settings: "
            + "; ".join(found)
            + ". Use another cache file, or pass force=True (--force) to mix them on purpose."
        )
    logger.warning("%s: mixing in answers made with other settings (force=True): %s", path, "; ".join(found))
    recorded.setdefault("mixed_in", []).append(settings)
    _write_json(meta_path(path), recorded)


def set_in_flight(path: Path, keys: list[str] | None) -> None:
    """Record the chunk being sampled (its query keys, in order), or clear it when the run is done."""
    recorded = read_meta(path)
    recorded["in_flight"] = keys
    _write_json(meta_path(path), recorded)


# ------------------------------------------------------------------------------------------------ lock and shards
@contextmanager
def writer_lock(path: Path, timeout: float) -> Iterator[None]:
    """Hold `<cache>.lock` while writing: a second writer waits up to `timeout` seconds, then gets a clear error."""
    from filelock import FileLock, Timeout

    lock = FileLock(lock_path(path), timeout=timeout)
    try:
        lock.acquire()
    except Timeout:
        raise CacheError(
            f"{path} is being written by another process (it holds {lock_path(path)}). Wait for it to finish (or pass "
            "lock_timeout=SECONDS to wait), or give each process its own shard: under a multi-process launch "
            "(torchrun / accelerate launch) build_cache shards by itself; otherwise pass shard=(rank, world_size) and "
            "merge with merge_cache_shards."
        ) from None
    try:
        yield
    finally:
        lock.release()


@dataclass
class CacheResult(os.PathLike):
    """What [`build_cache`] did: usable as the cache's path (`open(result)`, `DELIATrainer(diverse_dataset=result)`).

    `rows` counts the usable rows of the whole cache (complete, non-empty answers: what the trainer reads),
    `truncated` the rows cut off by `max_new_tokens` (kept in the file, flagged `finish_reason: "length"`, dropped
    when read), `empty` the empty answers (dropped too); `written` and `written_truncated` count this call's rows,
    `skipped` the queries already cached."""

    path: Path
    rows: int = 0
    truncated: int = 0
    empty: int = 0
    written: int = 0
    written_truncated: int = 0
    skipped: int = 0
    shards: list[Path] = field(default_factory=list)

    def __hash__(self) -> int:  # usable wherever a path is, e.g. Jupyter's `open`, which hashes its argument
        return hash(self.path)

    def __fspath__(self) -> str:
        return os.fspath(self.path)

    def __str__(self) -> str:
        return os.fspath(self.path)

    @classmethod
    def of(cls, path: Path, **counts: Any) -> CacheResult:
        rows, _ = read_rows(path)
        usable = sum(is_usable(row) for row in rows)
        truncated = sum(row.get("finish_reason") == "length" for row in rows)
        return cls(path, rows=usable, truncated=truncated, empty=len(rows) - usable - truncated, **counts)


def merge_cache_shards(
    path: str | os.PathLike, world_size: int, *, force: bool = False, lock_timeout: float = 600.0
) -> CacheResult:
    """Append the rows of `<cache>.rank0` ... `<cache>.rank{world_size-1}` to `<cache>` (each query once), then delete
    the shards. Every shard must have been made with the cache's settings (or the first shard's, for a new cache).
    Safe to re-run after an interruption: rows already merged are skipped."""
    path = Path(path)
    shards = [shard_path(path, rank) for rank in range(world_size)]
    missing = [str(shard) for shard in shards if not meta_path(shard).is_file()]
    if missing:
        raise CacheError(f"Shards {missing} are missing: every rank must finish build_cache before the merge.")
    with writer_lock(path, lock_timeout):
        rows = repair_tail(path)
        seen = {row["query_key"] for row in rows}
        added = 0
        with open(path, "ab") as handle:
            for shard in shards:
                shard_settings = read_meta(shard)["settings"]
                check_settings(path, shard_settings, has_rows=bool(seen), force=force)
                new = [row for row in read_rows(shard)[0] if row["query_key"] not in seen]
                append_rows(handle, new)
                seen.update(row["query_key"] for row in new)
                added += len(new)
        for shard in shards:  # every row is in the cache now
            for file in (shard, meta_path(shard), lock_path(shard)):
                file.unlink(missing_ok=True)
    logger.info("%s: merged %d rows from %d shards.", path, added, world_size)
    return CacheResult.of(path, written=added, shards=shards)
