"""DELIA's self-sampled cache (build_cache): the paper's prompt, rows that survive any text, exact resume (sampling
included), the settings record, the writer lock, shards, truncated answers, the vLLM request contract, the CLI."""

import importlib.util
import json
import logging
import os
import sys
import threading
import types

import pytest
import torch
from datasets import Dataset

from robust_sft.data import DataFormatError
from robust_sft.delia import (
    CacheError,
    CacheResult,
    DELIAConfig,
    DELIATrainer,
    Query,
    build_cache,
    load_diverse_dataset,
    merge_cache_shards,
    one_shot_messages,
    read_queries,
    render_prompt,
)
from robust_sft.delia.cache import row_seed
from robust_sft.delia.store import encode_row, meta_path, read_rows, shard_path
from robust_sft.testing import make_tiny_model, make_tiny_tokenizer, save_tiny_model

from .conftest import train_args
from .test_delia_sampling import stopping_tiny_model

QUERIES = [Query(f"Name thing number {i}.", f"Thing {i}.") for i in range(5)]
MANY = [Query(f"Tell me about item {i}. " * (1 + i % 3), f"Item {i}." if i % 2 else None) for i in range(20)]
GREEDY = dict(do_sample=False, progress=False)
SAMPLED = dict(do_sample=True, temperature=1.0, top_p=0.95, seed=7, progress=False)


@pytest.fixture(scope="module")
def model():
    return stopping_tiny_model(make_tiny_tokenizer())


@pytest.fixture(scope="module")
def tok():
    return make_tiny_tokenizer()


def rows_of(path):
    rows, torn = read_rows(path)
    assert torn == 0
    return rows


# ---------------------------------------------------------------------------------------------- the prompt
def test_prompt_is_the_papers_one_shot_with_a_generation_prompt(tokenizer):
    query = Query("What is 2+2?", "4")
    messages = one_shot_messages(query, system_prompt="Be brief.")
    assert [turn["role"] for turn in messages] == ["system", "user", "assistant", "user"]
    assert messages[1]["content"] == messages[3]["content"] == "What is 2+2?" and messages[2]["content"] == "4"
    rendered = render_prompt(tokenizer, messages)
    assert rendered.endswith("<|im_start|>assistant\n") and rendered.count("What is 2+2?") == 2
    assert [turn["role"] for turn in one_shot_messages(Query("Hi"))] == ["user"]


def test_templates_without_a_system_role_get_it_folded():
    strict = make_tiny_tokenizer()
    strict.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
        "{% endif %}<{{ m['role'] }}>{{ m['content'] }}</s>{% endfor %}{% if add_generation_prompt %}<assistant>"
        "{% endif %}"
    )
    rendered = render_prompt(strict, one_shot_messages(Query("Q?", "A."), system_prompt="Be brief."))
    assert rendered == "<user>Be brief.\n\nQ?</s><assistant>A.</s><user>Q?</s><assistant>"


# ---------------------------------------------------------------------------------------------- rows and resume
def test_batched_cache_equals_one_by_one_and_is_read_back(tmp_path, model, tok):
    batched = build_cache(model, tok, MANY, tmp_path / "batched.jsonl", batch_size=3, max_new_tokens=8, **GREEDY)
    single = build_cache(model, tok, MANY, tmp_path / "single.jsonl", batch_size=1, max_new_tokens=8, **GREEDY)
    assert isinstance(batched, CacheResult) and batched.written == 20 and batched.skipped == 0
    rows = {row["query_key"]: row for row in rows_of(batched)}
    assert rows == {row["query_key"]: row for row in rows_of(single)}
    assert {row["messages"][0]["content"] for row in rows.values()} == {query.text for query in MANY}
    assert {row["finish_reason"] for row in rows.values()} == {"stop", "length"}
    assert batched.rows + batched.truncated + batched.empty == 20
    assert load_diverse_dataset(batched).column_names == ["messages"]  # what DELIATrainer reads back


def test_rows_with_any_text_survive_write_and_resume(tmp_path, model, tok):
    odd = Query(
        "Line\u2028separator, paragraph\u2029separator, next\x85line, emoji \U0001f600 and \u00e9t\u00e9.", "Ok."
    )
    path = tmp_path / "cache.jsonl"
    build_cache(model, tok, [odd, QUERIES[0]], path, max_new_tokens=4, **GREEDY)
    data = path.read_bytes()
    assert data.count(b"\n") == 2 and len(data.decode("utf-8").splitlines()) == 2  # any line reader agrees
    assert "\U0001f600" in data.decode("utf-8")  # written as it is, not escaped
    result = build_cache(model, tok, [odd, *QUERIES[:3]], path, max_new_tokens=4, **GREEDY)  # resumes
    assert result.written == 2 and result.skipped == 2
    rows = {row["query_key"]: row for row in rows_of(path)}
    assert rows[odd.key]["messages"][0]["content"] == odd.text and len(rows) == 4
    kept = load_diverse_dataset(path, keep_truncated=True)
    assert odd.text in [messages[0]["content"] for messages in kept["messages"]]
    # A lone surrogate cannot be UTF-8: that row is escaped whole, and reads back the same.
    row = {"messages": [{"role": "user", "content": "bad \ud800 half"}], "query_key": "k"}
    assert json.loads(encode_row(row)) == row


def interrupt_after(model, calls):
    """Stop a run with KeyboardInterrupt after `calls` forward passes (the way Ctrl-C stops it)."""
    count = [0]

    def hook(*_):
        count[0] += 1
        if count[0] == calls:
            raise KeyboardInterrupt

    return model.register_forward_hook(hook)


def test_an_interrupted_sampling_run_resumes_to_the_same_rows(tmp_path, model, tok):
    options = dict(batch_size=2, max_new_tokens=10, **SAMPLED)  # chunks of 2 x 4 queries sampled together
    written = []  # rows on disk at each forward pass of an uninterrupted run
    count = model.register_forward_hook(lambda *_: written.append(len(rows_of(tmp_path / "reference.jsonl"))))
    try:
        reference = build_cache(model, tok, MANY, tmp_path / "reference.jsonl", **options)
    finally:
        count.remove()
    path = tmp_path / "cache.jsonl"
    handle = interrupt_after(model, written.index(10) + 1)  # in the second chunk, two of its rows written
    try:
        with pytest.raises(KeyboardInterrupt):
            build_cache(model, tok, MANY, path, **options)
    finally:
        handle.remove()
    interrupted = rows_of(path)
    assert len(interrupted) > 8  # the first chunk, and the rows of the second that had finished
    in_flight = json.loads(meta_path(path).read_text())["in_flight"]
    assert len(in_flight) == 8 and not set(in_flight) <= {row["query_key"] for row in interrupted}
    with open(path, "a") as cache:  # and a row cut off mid-write
        cache.write('{"messages": [{"role": "user", "con')
    resumed = build_cache(model, tok, MANY, path, **options)
    assert resumed.written == 20 - len(interrupted) and resumed.skipped == len(interrupted)
    assert path.read_bytes() == reference.path.read_bytes()  # the very rows, in the very order
    assert {row["finish_reason"] for row in rows_of(path)} == {"stop", "length"}
    again = build_cache(model, tok, MANY + MANY[:2], path, **options)  # nothing new to do
    assert again.written == 0 and path.read_bytes() == reference.path.read_bytes()
    other_seed = build_cache(model, tok, MANY, tmp_path / "other.jsonl", **{**options, "seed": 8})
    assert rows_of(other_seed) != rows_of(reference)


def test_sampling_leaves_the_global_rng_alone_and_seeds_come_from_the_key(tmp_path, model, tok):
    torch.manual_seed(0)
    state = torch.get_rng_state()
    build_cache(model, tok, QUERIES, tmp_path / "cache.jsonl", max_new_tokens=4, **SAMPLED)
    assert torch.equal(torch.get_rng_state(), state)
    assert row_seed(7, QUERIES[0].key) == row_seed(7, Query(QUERIES[0].text, QUERIES[0].reference).key)
    assert row_seed(7, QUERIES[0].key) != row_seed(7, QUERIES[1].key) != row_seed(8, QUERIES[1].key)


# ---------------------------------------------------------------------------------------------- settings record
def test_a_resume_with_other_settings_is_refused(tmp_path, model, tok):
    path = tmp_path / "cache.jsonl"
    build_cache(model, tok, QUERIES[:2], path, max_new_tokens=4, **GREEDY)
    settings = json.loads(meta_path(path).read_text())["settings"]
    assert settings["model"]["weights_fingerprint"] and settings["tokenizer"]["chat_template_sha256"]
    assert settings["generation"]["stop_token_ids"] == [tok.convert_tokens_to_ids("<|im_end|>")]
    other_model = make_tiny_model("llama", tok, seed=1)
    with pytest.raises(CacheError, match="model.weights_fingerprint"):
        build_cache(other_model, tok, QUERIES, path, max_new_tokens=4, **GREEDY)
    with pytest.raises(CacheError, match="generation.max_new_tokens: 4 in the cache, 5 now"):
        build_cache(model, tok, QUERIES, path, max_new_tokens=5, **GREEDY)
    other_template = make_tiny_tokenizer()
    other_template.chat_template = tok.chat_template.replace("<|im_start|>assistant", "<|im_start|>bot")
    with pytest.raises(CacheError, match="chat_template_sha256"):
        build_cache(model, other_template, QUERIES, path, max_new_tokens=4, **GREEDY)
    assert len(rows_of(path)) == 2  # nothing was written
    mixed = build_cache(other_model, tok, QUERIES, path, max_new_tokens=4, force=True, **GREEDY)
    assert mixed.written == 3 and len(json.loads(meta_path(path).read_text())["mixed_in"]) == 1
    # A cache without a record (an older robust_sft) cannot say what made it.
    legacy = tmp_path / "legacy.jsonl"
    legacy.write_text(path.read_text())
    with pytest.raises(CacheError, match="no settings record"):
        build_cache(model, tok, QUERIES, legacy, max_new_tokens=4, **GREEDY)


# ---------------------------------------------------------------------------------------------- writers and shards
def test_two_writers_cannot_duplicate_rows(tmp_path, model, tok):
    path = tmp_path / "cache.jsonl"
    started, release = threading.Event(), threading.Event()

    def hold(*_):
        started.set()
        release.wait(60)

    handle = model.register_forward_hook(hold)
    results = {}
    options = dict(max_new_tokens=6, **GREEDY)
    first = threading.Thread(target=lambda: results.update(first=build_cache(model, tok, MANY, path, **options)))
    first.start()
    try:
        assert started.wait(60)
        with pytest.raises(CacheError, match="being written by another process"):
            build_cache(model, tok, MANY, path, **options)
        handle.remove()
        waiting = threading.Thread(
            target=lambda: results.update(second=build_cache(model, tok, MANY, path, lock_timeout=120, **options))
        )
        waiting.start()
    finally:
        handle.remove()
        release.set()
    first.join(120)
    waiting.join(120)
    keys = [row["query_key"] for row in rows_of(path)]
    assert sorted(keys) == sorted(query.key for query in MANY)  # every query once
    assert results["first"].written == 20 and results["second"].written == 0


def test_shards_merge_into_the_rows_of_one_process(tmp_path, model, tok):
    options = dict(batch_size=3, max_new_tokens=6, **SAMPLED)
    single = {
        row["query_key"]: row for row in rows_of(build_cache(model, tok, MANY, tmp_path / "one.jsonl", **options))
    }
    path = tmp_path / "cache.jsonl"
    shares = [build_cache(model, tok, MANY, path, shard=(rank, 2), **options) for rank in range(2)]
    assert [share.path for share in shares] == [shard_path(path, 0), shard_path(path, 1)]
    assert sum(share.written for share in shares) == 20 and min(share.written for share in shares) > 0
    merged = merge_cache_shards(path, 2)
    rows = rows_of(path)
    assert merged.written == 20 and len({row["query_key"] for row in rows}) == len(rows) == 20
    assert {row["query_key"]: row for row in rows} == single  # each answer depends on its query's seed only
    assert not shard_path(path, 0).exists() and meta_path(path).is_file()
    assert build_cache(model, tok, MANY, path, **options).written == 0  # the merged cache resumes
    with pytest.raises(CacheError, match="missing"):
        merge_cache_shards(path, 2)


# ---------------------------------------------------------------------------------------------- truncated answers
def test_truncated_answers_are_flagged_and_dropped(tmp_path, model, tok, caplog):
    path = tmp_path / "cache.jsonl"
    result = build_cache(model, tok, MANY, path, max_new_tokens=10, **GREEDY)
    rows = rows_of(path)
    cut = [row for row in rows if row["finish_reason"] == "length"]
    assert 0 < len(cut) == result.truncated == result.written_truncated < 20 and result.rows > 0
    with caplog.at_level(logging.WARNING, logger="robust_sft.delia"):
        diverse = load_diverse_dataset(path)
    assert len(diverse) == result.rows == 20 - result.truncated - result.empty
    assert f"{len(cut)} cut off by max_new_tokens" in caplog.text
    assert len(load_diverse_dataset(path, keep_truncated=True)) == 20
    task = [{"instruction": f"Condense: item {i} is red.", "output": f"item {i} red"} for i in range(10)]
    trainer = DELIATrainer(
        model=make_tiny_model("llama", tok),
        args=train_args(tmp_path / "run", config_class=DELIAConfig, diverse_ratio=5.0),
        train_dataset=Dataset.from_list(task),
        diverse_dataset=result,
        processing_class=tok,
    )
    assert trainer.mix_counts == {"task": 10, "diverse": result.rows}


# ---------------------------------------------------------------------------------------------- queries
def test_malformed_queries_name_the_row(tmp_path, tok):
    with pytest.raises(DataFormatError, match="Query 1 is empty"):
        build_cache(None, tok, ["fine", "  "], tmp_path / "cache.jsonl")  # before any model is loaded
    rows = [{"question": "q0", "answer": "a0"}, {"question": "q1", "answer": "a1"}, {"question": None, "answer": "a"}]
    with pytest.raises(DataFormatError, match="Row 2: field `question` is missing"):
        read_queries(rows, query_field="question", answer_field="answer")
    assert read_queries(rows[:2], query_field="question", answer_field="answer")[1] == Query("q1", "a1")
    chat = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]}
    with pytest.raises(DataFormatError, match="Row 1"):
        read_queries([chat, {"messages": [{"role": "user", "content": "hi"}]}])
    alpaca = read_queries([{"instruction": "Condense: x.", "output": "x"}])
    assert alpaca[0] == Query("Condense: x.", "x")


def test_self_instruct_seed_tasks_are_queries():
    from .conftest import SHARED_DATA

    queries = read_queries(f"{SHARED_DATA}/self_instruct/seed_tasks.jsonl")
    assert len(queries) == 175
    first = json.loads(open(f"{SHARED_DATA}/self_instruct/seed_tasks.jsonl").readline())
    assert queries[0] == Query(first["instruction"], first["instances"][0]["output"])
    with_input = next(q for q in queries if "\n\n" in q.text)
    assert with_input.reference
    with pytest.raises(DataFormatError, match="Row 1: field `instruction`"):
        read_queries([{"instruction": "a", "instances": []}, {"instruction": "", "instances": []}])


# ---------------------------------------------------------------------------------------------- vLLM
def test_vllm_requests_match_vllms_api():
    """The call contract against vLLM's real classes; skipped where vLLM is not installed (this project's CI)."""
    pytest.importorskip("vllm")
    import inspect

    from vllm import LLM, SamplingParams

    from robust_sft.delia.vllm_backend import vllm_requests

    generation = {"do_sample": True, "temperature": 0.7, "top_p": 0.95, "max_new_tokens": 8, "stop_token_ids": [2]}
    requests, params = vllm_requests([[1, 5, 6], [1, 7]], [11, 12], generation)
    assert [request["prompt_token_ids"] for request in requests] == [[1, 5, 6], [1, 7]]
    assert all(isinstance(param, SamplingParams) for param in params)
    assert [param.seed for param in params] == [11, 12] and params[0].stop_token_ids == [2]
    assert params[0].max_tokens == 8 and params[0].temperature == 0.7 and params[0].top_p == 0.95
    inspect.signature(LLM.generate).bind(object(), requests, params, use_tqdm=False)


def test_vllm_backend_writes_chunk_by_chunk_and_frees_the_engine(tmp_path, tok, monkeypatch):
    """vLLM cannot run here (no GPU): a stand-in engine with vLLM's call shape checks what robust_sft does around it
    (one request per query with its own seed, rows on disk after each call, the engine released)."""
    if importlib.util.find_spec("vllm") is not None:
        pytest.skip("vLLM is installed: test_vllm_requests_match_vllms_api covers the real API")
    calls, engines = [], []

    class SamplingParams:
        def __init__(self, **values):
            self.__dict__.update(values)

    class LLM:
        def __init__(self, model, seed, **engine_kwargs):
            self.engine_kwargs = engine_kwargs
            engines.append(self)

        def generate(self, prompts, sampling_params, use_tqdm):
            calls.append((prompts, sampling_params))
            if len(calls) == 2:
                assert len(rows_of(path)) == 4  # the first call's rows are on disk already
            outputs = []
            for prompt, params in zip(prompts, sampling_params, strict=True):
                length = params.seed % params.max_tokens + 1
                tokens = prompt["prompt_token_ids"][:length]
                reason = "length" if length == params.max_tokens else "stop"
                completion = types.SimpleNamespace(token_ids=tokens, finish_reason=reason)
                outputs.append(types.SimpleNamespace(outputs=[completion]))
            return outputs

    vllm = types.ModuleType("vllm")
    vllm.LLM, vllm.SamplingParams = LLM, SamplingParams
    inputs = types.ModuleType("vllm.inputs")
    inputs.TokensPrompt = dict
    monkeypatch.setitem(sys.modules, "vllm", vllm)
    monkeypatch.setitem(sys.modules, "vllm.inputs", inputs)
    model_dir = save_tiny_model(str(tmp_path / "tiny"))
    path = tmp_path / "cache.jsonl"
    result = build_cache(
        model_dir, None, MANY[:6], path, backend="vllm", batch_size=1, max_new_tokens=5, vllm_kwargs={"dtype": "half"},
        progress=False, seed=3,
    )  # fmt: skip
    assert result.written == 6 and len(calls) == 2 and engines[0].engine_kwargs == {"dtype": "half"}
    seeds = [params.seed for _, chunk in calls for params in chunk]
    assert sorted(seeds) == sorted(row_seed(3, query.key) for query in MANY[:6])
    assert all(set(prompt) == {"prompt_token_ids"} for prompts, _ in calls for prompt in prompts)
    tokenizer = make_tiny_tokenizer()  # the rendered template's tokens, no special token added again
    sent = {tuple(prompt["prompt_token_ids"]) for prompts, _ in calls for prompt in prompts}
    rendered = render_prompt(tokenizer, one_shot_messages(MANY[0]))
    assert tuple(tokenizer(rendered, add_special_tokens=False)["input_ids"]) in sent
    assert json.loads(meta_path(path).read_text())["settings"]["model"]["weight_files_sha256"]
    import gc
    import weakref

    engine = weakref.ref(engines.pop())
    gc.collect()
    assert engine() is None  # nothing holds the engine after build_cache


# ---------------------------------------------------------------------------------------------- command line
def test_cli_build_cache_then_train_delia(tmp_path, capsys):
    from robust_sft.cli import main

    base_dir = str(tmp_path / "base")
    tokenizer = make_tiny_tokenizer()
    stopping_tiny_model(tokenizer).save_pretrained(base_dir)  # some answers end before the limit
    tokenizer.save_pretrained(base_dir)
    queries = tmp_path / "queries.jsonl"
    queries.write_text("\n".join(json.dumps({"question": q.text, "answer": q.reference or "-"}) for q in MANY))
    cache = tmp_path / "cache.jsonl"
    command = ["build-cache", "--queries", str(queries), "--output", str(cache), "--model", base_dir, "--greedy",
               "--limit", "10", "--query-field", "question", "--answer-field", "answer",
               "--max-new-tokens", "10"]  # fmt: skip
    assert main(command) == 0
    assert f"{cache}: 10 rows." in capsys.readouterr().out
    longer = [*command[:-1], "12", "--limit", "12"]
    assert main(longer) == 1  # the CLI reports the refusal as one line, exit code 1
    assert "generation.max_new_tokens: 10 in the cache, 12 now" in capsys.readouterr().err
    assert main([*longer, "--force"]) == 0
    assert f"{cache}: 12 rows." in capsys.readouterr().out
    data = tmp_path / "task.jsonl"
    data.write_text("\n".join(json.dumps({"instruction": f"Say {i}.", "output": f"{i} <sep> ok"}) for i in range(8)))
    out = tmp_path / "run"
    command = ["train", "delia", "--dataset_name", str(data), "--model_name_or_path", base_dir,
               "--output_dir", str(out),
               "--max_steps", "1", "--per_device_train_batch_size", "4", "--use_peft", "--lora_r", "4",
               "--diverse_dataset", str(cache), "--diverse_ratio", "0.3", "--new_special_tokens", "<sep>",
               "--report_to", "none", "--save_strategy", "no", "--gradient_checkpointing", "false"]  # fmt: skip
    assert main(command) == 0
    assert (out / "adapter_config.json").is_file()
    assert "<sep>" in (out / "tokenizer.json").read_text()


SHARD_SCRIPT = """
import json, os, sys
import torch
from robust_sft.delia import Query, build_cache
from robust_sft.generation import end_of_turn_token_ids
from robust_sft.testing import make_tiny_model, make_tiny_tokenizer

torch.set_num_threads(1)
tokenizer = make_tiny_tokenizer()
model = make_tiny_model("llama", tokenizer)
(stop,) = end_of_turn_token_ids(tokenizer, model)
with torch.no_grad():  # the test's stopping_tiny_model
    model.lm_head.weight.mul_(50)
    model.lm_head.weight[stop] = model.lm_head.weight[33] * 1.01
queries = [Query(**query) for query in json.loads(sys.argv[2])]
options = json.loads(sys.argv[3])
result = build_cache(model.eval(), tokenizer, queries, sys.argv[1], **options)
# one file per rank: two ranks printing to one pipe can interleave their lines
report = f"{sys.argv[1]}.report{os.environ['RANK']}"
with open(report, "w") as handle:
    handle.write(f"RESULT {result.path} {result.written} {result.rows}")
"""


@pytest.mark.slow
def test_a_two_process_launch_shards_and_merges(tmp_path, model, tok):
    """Under torchrun each rank samples its share into `<cache>.rank{i}`; rank 0 merges: one process's rows, once."""
    import subprocess

    from .test_distributed import _free_port

    options = dict(batch_size=3, max_new_tokens=6, **SAMPLED)
    one = build_cache(model, tok, MANY, tmp_path / "one.jsonl", **options)
    single = {row["query_key"]: row for row in rows_of(one)}
    script = tmp_path / "shard_build.py"
    script.write_text(SHARD_SCRIPT)
    path = tmp_path / "cache.jsonl"
    queries = json.dumps([{"text": query.text, "reference": query.reference} for query in MANY])
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
               str(_free_port()), str(script), str(path), queries, json.dumps(options)]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    reports = [(tmp_path / f"cache.jsonl.report{rank}").read_text().split() for rank in range(2)]
    assert {report[1] for report in reports} == {str(path)}
    assert sum(int(report[2]) for report in reports) == 20  # each rank sampled its own share
    rows = rows_of(path)
    assert len(rows) == len({row["query_key"] for row in rows}) == 20
    assert {row["query_key"]: row for row in rows} == single
    assert not any(shard_path(path, rank).exists() for rank in range(2))


def test_build_cache_benchmark_quick(tmp_path):
    """benchmarks/build_cache.py --quick runs end to end: same rows batched and one by one, a speedup per row."""
    import subprocess

    script = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "build_cache.py")
    command = [sys.executable, script, "--quick", "--threads", "1", "--skip", "continuous_batching",
               "--output-dir", str(tmp_path)]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "build_cache-quick.json").read_text())
    rows = report["rows"]
    assert list(rows) == ["one_by_one", "build_cache", "build_cache_batch1", "generate_batched"]
    assert rows["one_by_one"]["speedup"] == 1.0 and rows["build_cache"]["same_rows"] is True
    assert rows["build_cache"]["new_tokens"] == rows["one_by_one"]["new_tokens"] > 0
    assert report["queries"] == 6 and report["settings"]["stop_token_ids"]
