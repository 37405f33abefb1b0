"""build_cache throughput: batched (rows leave the batch, the next queries join it) vs one-by-one generation, one run.

    python benchmarks/build_cache.py              # embedded SmolLM2-135M-Instruct, 32 self-instruct queries, 2 threads
    python benchmarks/build_cache.py --queries 64 --max-new-tokens 512 --threads 2
    python benchmarks/build_cache.py --quick      # tiny in-process model, a few queries (the CI smoke run)

The workload is DELIA's: self-instruct seed tasks asked with the paper's one-shot prompt, sampled at temperature 0.7,
stopping on the template's end-of-turn token or at `--max-new-tokens`. Top-p is off by default (`--top-p 1`): then
build_cache draws the very tokens `generate` draws under the same seed (tested), so the two do the same work; the
paper's `--top-p 0.95` draws from the same nucleus but other tokens (compare tokens/s then). Every way answers the same
queries with the same settings, in this order:

- `one_by_one`: `model.generate` on one query at a time, seeded with the query's own seed: the baseline.
- `build_cache`: `build_cache(batch_size=...)` (our engine: length-sorted batches, finished rows leave, the next
  queries join; the rows written to disk and fsynced). `same_rows` says whether its rows equal the one-by-one answers.
- `build_cache_batch1`: the same with `batch_size=1`, the engine's own one-by-one cost.
- `generate_batched`: `model.generate` on length-sorted batches of `batch_size` (a batch runs until its longest row
  ends; the global RNG samples, so its tokens differ and its token count is reported).
- `continuous_batching`: transformers' `model.generate_batch` (paged attention, continuous batching; global seed).

Each row reports seconds, queries/s, new tokens and tokens/s; `speedup` is queries/s over `one_by_one`'s. Writes
`results/build_cache[-quick].json`. Time it on otherwise idle cores: timings of a shared machine say little.
"""

from __future__ import annotations

import random
import shlex
import sys
import time
import traceback
from pathlib import Path

from common import SHARED_DATA, machine, scratch_dir, write_report


def load(quick: bool, threads: int):
    import torch

    from robust_sft import load_model_and_tokenizer
    from robust_sft.testing import make_tiny_model, make_tiny_tokenizer

    torch.set_num_threads(threads)
    if quick:
        tokenizer = make_tiny_tokenizer()
        return make_tiny_model("llama", tokenizer).eval(), tokenizer
    model, tokenizer = load_model_and_tokenizer()
    return model.eval(), tokenizer


def timed(function) -> tuple[float, object]:
    started = time.perf_counter()
    value = function()
    return time.perf_counter() - started, value


def sampling_kwargs(settings, tokenizer) -> dict:
    """The `generate` arguments every plain-transformers row samples with (the cache's own settings)."""
    return dict(
        max_new_tokens=settings["max_new_tokens"],
        do_sample=True,
        temperature=settings["temperature"],
        top_p=settings["top_p"],
        top_k=None,
        eos_token_id=settings["stop_token_ids"],
        pad_token_id=tokenizer.pad_token_id,
    )


def one_by_one(model, tokenizer, queries, prompts, settings) -> dict:
    """`model.generate` per query under the query's own seed: the tokens build_cache draws, without batching."""
    import torch

    from robust_sft.delia.cache import row_seed

    answers, stops = {}, settings["stop_token_ids"]
    with torch.random.fork_rng():
        for query, prompt in zip(queries, prompts, strict=True):
            torch.manual_seed(row_seed(settings["seed"], query.key))
            output = model.generate(
                torch.tensor([prompt]),
                attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                **sampling_kwargs(settings, tokenizer),
            )
            new = output[0, len(prompt) :].tolist()
            answer = tokenizer.decode(new, skip_special_tokens=True).strip()
            answers[query.key] = (answer, count_new_tokens([new], stops))
    return answers


def generate_batched(model, tokenizer, prompts, settings, batch_size) -> int:
    """`model.generate` on length-sorted, left-padded batches; returns the number of new tokens (to each row's end)."""
    tokens = 0
    ordered = sorted(prompts, key=len)
    padding_side, tokenizer.padding_side = tokenizer.padding_side, "left"
    try:
        for start in range(0, len(ordered), batch_size):
            batch = tokenizer.pad({"input_ids": ordered[start : start + batch_size]}, return_tensors="pt")
            output = model.generate(
                **batch,
                **sampling_kwargs(settings, tokenizer),
            )
            tokens += count_new_tokens(output[:, batch["input_ids"].shape[1] :].tolist(), settings["stop_token_ids"])
    finally:
        tokenizer.padding_side = padding_side
    return tokens


def count_new_tokens(rows: list[list[int]], stops: list[int]) -> int:
    """Tokens up to (not including) each row's first stop token."""
    total = 0
    for row in rows:
        ends = [i for i, token in enumerate(row) if token in stops]
        total += ends[0] if ends else len(row)
    return total


def continuous_batching(model, prompts, settings, batch_size) -> int:
    """transformers' continuous batching (`generate_batch`, paged attention); returns the number of new tokens."""
    from transformers import ContinuousBatchingConfig, GenerationConfig

    config = GenerationConfig(
        max_new_tokens=settings["max_new_tokens"],
        do_sample=True,
        temperature=settings["temperature"],
        top_p=settings["top_p"],
        top_k=None,
        eos_token_id=settings["stop_token_ids"],
    )
    outputs = model.generate_batch(
        inputs=[list(prompt) for prompt in prompts],
        generation_config=config,
        continuous_batching_config=ContinuousBatchingConfig(max_requests_per_batch=batch_size),
        warmup=False,
    )
    return count_new_tokens([list(output.generated_tokens) for output in outputs.values()], settings["stop_token_ids"])


def row(seconds: float, queries: int, tokens: int | None, **extra) -> dict:
    return {
        "seconds": seconds,
        "queries_per_s": queries / seconds,
        "new_tokens": tokens,
        "tokens_per_s": tokens / seconds if tokens is not None else None,
        **extra,
    }


def main(argv: list[str] | None = None) -> int:
    import argparse

    from common import RESULTS

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="A tiny in-process model and a few queries: a smoke run.")
    parser.add_argument("--queries", type=int, default=None, help="Self-instruct queries (default 32; quick 6).")
    parser.add_argument("--max-new-tokens", type=int, default=None, help="Longest answer (default 256; quick 8).")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2, help="torch threads (the machine of the recorded runs: 2).")
    parser.add_argument("--top-p", type=float, default=1.0, help="1: the same tokens as one_by_one (default).")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--skip", nargs="*", default=[], help="Rows not to run, e.g. continuous_batching generate_batched."
    )
    parser.add_argument("--output-dir", default=str(RESULTS))
    args = parser.parse_args(argv)
    args.queries = args.queries or (6 if args.quick else 32)
    args.max_new_tokens = args.max_new_tokens or (8 if args.quick else 256)

    from robust_sft.delia import build_cache, read_queries
    from robust_sft.delia.cache import prompt_ids
    from robust_sft.delia.store import read_meta, read_rows
    from robust_sft.generation import end_of_turn_token_ids

    model, tokenizer = load(args.quick, args.threads)
    queries = read_queries(SHARED_DATA / "self_instruct" / "seed_tasks.jsonl")
    random.Random(args.seed).shuffle(queries)
    queries = queries[: args.queries]
    prompts = [prompt_ids(tokenizer, query, None) for query in queries]
    settings = {
        "temperature": 0.7,
        "top_p": args.top_p,
        "max_new_tokens": args.max_new_tokens,
        "seed": args.seed,
        "stop_token_ids": end_of_turn_token_ids(tokenizer, model),
    }
    options = dict(progress=False, **{k: settings[k] for k in ("temperature", "top_p", "max_new_tokens", "seed")})
    results: dict[str, dict] = {}
    rows_by_mode: dict[str, dict[str, str]] = {}

    def engine(batch_size: int) -> dict:
        path = Path(scratch_dir("build-cache")) / "cache.jsonl"
        seconds, result = timed(lambda: build_cache(model, tokenizer, queries, path, batch_size=batch_size, **options))
        rows = read_rows(path)[0]
        rows_by_mode[f"batch{batch_size}"] = {r["query_key"]: r["messages"][1]["content"] for r in rows}
        tokens = sum(r["new_tokens"] for r in rows)
        assert read_meta(path)["settings"]["generation"]["stop_token_ids"] == settings["stop_token_ids"]
        return row(seconds, len(queries), tokens, truncated=result.truncated, batch_size=batch_size)

    plan = {
        "one_by_one": lambda: None,
        "build_cache": lambda: engine(args.batch_size),
        "build_cache_batch1": lambda: engine(1),
        "generate_batched": lambda: None,
        "continuous_batching": lambda: None,
    }
    for name in plan:
        if name in args.skip:
            continue
        print(f"== {name}", flush=True)
        try:
            if name == "one_by_one":
                seconds, answers = timed(lambda: one_by_one(model, tokenizer, queries, prompts, settings))
                rows_by_mode["one_by_one"] = {key: answer for key, (answer, _) in answers.items()}
                tokens = sum(count for _, count in answers.values())
                results[name] = row(seconds, len(queries), tokens)
            elif name == "generate_batched":
                seconds, tokens = timed(lambda: generate_batched(model, tokenizer, prompts, settings, args.batch_size))
                results[name] = row(seconds, len(queries), tokens, batch_size=args.batch_size)
            elif name == "continuous_batching":
                seconds, tokens = timed(lambda: continuous_batching(model, prompts, settings, args.batch_size))
                results[name] = row(seconds, len(queries), tokens, batch_size=args.batch_size)
            else:
                results[name] = plan[name]()
        except Exception as error:  # a way that does not run here is recorded, not fatal
            results[name] = {"error": f"{type(error).__name__}: {error}", "traceback": traceback.format_exc()[-2000:]}
        print(f"   {results[name]}", flush=True)
    base = results.get("one_by_one", {}).get("queries_per_s")
    for result in results.values():
        if base and "queries_per_s" in result:
            result["speedup"] = result["queries_per_s"] / base
    if "one_by_one" in rows_by_mode:
        for name, key in (("build_cache", f"batch{args.batch_size}"), ("build_cache_batch1", "batch1")):
            if key in rows_by_mode and name in results:
                results[name]["same_rows"] = rows_by_mode[key] == rows_by_mode["one_by_one"]
    report = {
        "benchmark": "build_cache",
        "command": "python benchmarks/build_cache.py " + shlex.join(sys.argv[1:] if argv is None else argv),
        "machine": machine(),
        "model": "tiny llama (robust_sft.testing)" if args.quick else "SmolLM2-135M-Instruct (embedded)",
        "queries": len(queries),
        "settings": settings,
        "batch_size": args.batch_size,
        "rows": results,
    }
    path = write_report(args.output_dir, "build_cache-quick" if args.quick else "build_cache", report)
    for name, result in results.items():
        summary = result.get("error") or (
            f"{result['queries_per_s']:.3f} queries/s, {result['speedup']:.2f}x, {result['new_tokens']} tokens"
            + (f", same rows as one_by_one: {result['same_rows']}" if "same_rows" in result else "")
            if "speedup" in result
            else result
        )
        print(f"{name:>22}: {summary}")
    print(f"Wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
