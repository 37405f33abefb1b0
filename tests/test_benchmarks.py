"""The benchmarks' --quick modes run end to end and write every row (the full runs are recorded in BENCHMARKS.md)."""

import json
import os
import subprocess
import sys
import time

import pytest
import torch

BENCHMARKS = os.path.join(os.path.dirname(__file__), "..", "benchmarks")


def run_benchmark(script, output_dir, *args):
    command = [sys.executable, os.path.join(BENCHMARKS, script), "--quick", "--output-dir", str(output_dir), *args]
    result = subprocess.run(command, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def test_cost_quick(tmp_path):
    sys.path.insert(0, BENCHMARKS)
    try:
        from cost import CONFIGURATIONS
    finally:
        sys.path.remove(BENCHMARKS)
    run_benchmark("cost.py", tmp_path, "--steps", "2")
    report = json.loads((tmp_path / "cost-quick.json").read_text())
    assert [row["name"] for row in report["rows"]] == list(CONFIGURATIONS)
    assert report["rows"][0]["time_ratio"] == 1.0
    for row, raw in zip(report["rows"], report["raw"]):
        assert len(raw["step_seconds"]) == 2 and row["median_step_s"] > 0 and raw["final_loss"] > 0
    assert (tmp_path / "cost-quick.md").read_text().count("\n") == len(CONFIGURATIONS) + 2
    cache = report["build_cache"]
    assert (
        cache["queries"] == 4
        and cache["speedup"] == cache["batched_queries_per_s"] / cache["one_by_one_queries_per_s"]
    )


def test_anit_quick(tmp_path):
    run_benchmark("anit.py", tmp_path, "--seeds", "0", "1")
    report = json.loads((tmp_path / "anit-quick.json").read_text())
    rows = ["base (no training)", "SFT", "NEFTune (alpha 5)", "noise only", "ANIT eta=0", "ANIT"]
    assert list(report["summary"]) == rows
    for name, metrics in report["summary"].items():
        expected = {"clean_accuracy", "perturbed_accuracy", "mean_pdr", "paraphrase_accuracy", "paraphrase_pdr"}
        assert set(metrics) == expected | {"train_seconds"}, name
        clean = metrics["clean_accuracy"]
        values = [report["per_seed"][seed][name]["clean_accuracy"] for seed in ("0", "1")]
        assert clean["n"] == 2 and clean["mean"] == sum(values) / 2 and 0.0 <= clean["mean"] <= 1.0
        # the 95% t-interval of two values: mean -/+ 12.706 * sd / sqrt(2) = mean -/+ 12.706 * |a - b| / 2
        half = 12.706 * abs(values[0] - values[1]) / 2
        assert (clean["low"], clean["high"]) == pytest.approx((clean["mean"] - half, clean["mean"] + half))
    assert report["summary"]["base (no training)"]["train_seconds"]["mean"] == 0.0
    seed_scores = report["per_seed"]["0"]["ANIT"]["scores"]
    assert {"clean", "char_substitute", "keyboard_typo", "paraphrase:0", "paraphrase:1"} <= set(seed_scores)
    paraphrases = [seed_scores[f"paraphrase:{number}"]["accuracy"] for number in range(2)]
    assert report["per_seed"]["0"]["ANIT"]["paraphrase_accuracy"] == pytest.approx(sum(paraphrases) / 2)
    assert (tmp_path / "anit-quick-summary.png").is_file()
    assert (tmp_path / "anit-quick-summary.md").read_text().count("\n") == len(rows) + 2


def test_taia_quick(tmp_path):
    run_benchmark("taia.py", tmp_path, "--seeds", "0", "1")
    report = json.loads((tmp_path / "taia-quick.json").read_text())
    rows = ["base", "vanilla (all updates)", "TAIA (attention only)", "TAIF (MLP only)", "TOA (attention trained)"]
    assert list(report["summary"]) == rows and report["piqa_questions"] == 4
    seed = report["per_seed"]["0"]
    losses = [seed[name]["gsm8k_answer_loss"] for name in rows]
    assert len(set(losses)) == 5  # five different models
    for name in rows:
        assert all(0.0 <= seed[name][key] <= 1.0 for key in ("piqa_acc", "piqa_acc_norm")), name
        assert seed[name]["piqa_acc_norm_stderr"] >= 0.0  # lm-eval's standard error of the mean
    assert (tmp_path / "taia-quick-summary.md").read_text().count("\n") == len(rows) + 2
    assert (tmp_path / "taia-quick-summary.png").is_file() and report["wall_seconds"] > 0
    assert report["per_seed"]["1"]["base"] == seed["base"]  # the base model is scored once for every seed
    assert report["per_seed"]["1"]["vanilla (all updates)"] != seed["vanilla (all updates)"]
    assert not (tmp_path / ".taia-quick-seeds.json").exists()  # the resume file goes once the report is written

    # --add-toa: a --no-toa run, then its TOA row added, equals the full run row for row (TOA is a run of its own)
    split = tmp_path / "split"
    run_benchmark("taia.py", split, "--seeds", "0", "1", "--no-toa")
    assert list(json.loads((split / "taia-quick.json").read_text())["summary"]) == rows[:-1]
    run_benchmark("taia.py", split, "--seeds", "0", "1", "--add-toa")
    added = json.loads((split / "taia-quick.json").read_text())
    assert list(added["summary"]) == rows and added["toa"] is True and "--no-toa" in added["other_rows_recorded_by"]

    def scores(run: dict, seed: str, name: str) -> dict:
        return {key: value for key, value in run["per_seed"][seed][name].items() if key != "train_seconds"}

    for seed in ("0", "1"):
        for name in rows:
            assert scores(added, seed, name) == pytest.approx(scores(report, seed, name)), (seed, name)
    assert not (split / ".taia-quick-toa-seeds.json").exists()
    for extra, problem in ((("--seeds", "0", "1"), "it has a TOA row"), (("--seeds", "0"), "settings differ")):
        command = [sys.executable, os.path.join(BENCHMARKS, "taia.py"), "--quick", "--output-dir", str(split)]
        refused = subprocess.run([*command, *extra, "--add-toa"], capture_output=True, text=True, timeout=900)
        assert refused.returncode != 0 and problem in refused.stderr, refused.stderr[-2000:]


def test_resumable_seeds_runs_only_the_missing_seeds(tmp_path):
    sys.path.insert(0, BENCHMARKS)
    try:
        from common import forget_resumed_seeds, machine, recorded_seeds, resumable_seeds
    finally:
        sys.path.remove(BENCHMARKS)
    ran = []

    def run_seed(seed):
        ran.append(seed)
        return {"row": {"score": seed / 10}}

    args = type("Args", (), {"output_dir": str(tmp_path), "seeds": [0, 1]})()
    results, seconds = resumable_seeds("demo", args, {"lr": 1, "ratios": (1, 5)}, run_seed)
    assert results == {0: {"row": {"score": 0.0}}, 1: {"row": {"score": 0.1}}} and set(seconds) == {0, 1}
    args.seeds = [0, 1, 2]  # a stopped run started again with one more seed: only that seed runs
    results, again = resumable_seeds("demo", args, {"lr": 1, "ratios": (1, 5)}, run_seed)  # a tuple, as JSON reads it
    assert results[2] == {"row": {"score": 0.2}} and ran == [0, 1, 2]
    assert again[0] == seconds[0] and again[2] >= 0  # the seconds of the seeds run before the stop are kept
    with pytest.raises(SystemExit, match="other settings"):
        resumable_seeds("demo", args, {"lr": 2}, run_seed)
    forget_resumed_seeds("demo", args)
    assert not (tmp_path / ".demo-seeds.json").exists()

    # --extend: a recorded report of the same settings counts as finished seeds
    with pytest.raises(SystemExit, match="does not exist"):
        recorded_seeds("demo", args, {"lr": 1})
    report = {"lr": 1, "command": "python demo.py", "seeds": [0], "wall_seconds": 7.0, "per_seed": {"0": {"row": 1}}}
    report["machine"] = {**machine(), "torch": "1.0"}
    (tmp_path / "demo.json").write_text(json.dumps(report))
    with pytest.raises(SystemExit, match="torch"):  # seeds from another torch are not mixed in
        recorded_seeds("demo", args, {"lr": 1})
    report["machine"] = machine()
    (tmp_path / "demo.json").write_text(json.dumps(report))
    with pytest.raises(SystemExit, match="other settings"):
        recorded_seeds("demo", args, {"lr": 2})
    with pytest.raises(SystemExit, match=r"leaves out \['0'\]; give --seeds 0 2"):  # else seed 0 would be lost
        recorded_seeds("demo", type("Args", (), {"output_dir": str(tmp_path), "seeds": [2]})(), {"lr": 1})
    recorded = recorded_seeds("demo", args, {"lr": 1})
    ran.clear()
    results, seconds = resumable_seeds("demo", args, {"lr": 1}, run_seed, recorded)
    assert ran == [1, 2] and results[0] == {"row": 1} and seconds[0] == 7.0
    forget_resumed_seeds("demo", args)

    def stopped(seed):
        if seed == 2:
            raise KeyboardInterrupt  # the run is stopped after seed 1
        return run_seed(seed)

    with pytest.raises(KeyboardInterrupt):
        resumable_seeds("demo", args, {"lr": 1}, stopped, recorded)
    with pytest.raises(SystemExit, match="run it again with --extend"):  # else its report would not say so
        resumable_seeds("demo", args, {"lr": 1}, run_seed)
    results, _ = resumable_seeds("demo", args, {"lr": 1}, run_seed, recorded)
    assert results[0] == {"row": 1} and results[2] == {"row": {"score": 0.2}}


def test_delia_sampling_seconds_count_only_runs_that_sampled(tmp_path):
    sys.path.insert(0, BENCHMARKS)
    try:
        from delia import add_sampling_seconds
    finally:
        sys.path.remove(BENCHMARKS)
    record = tmp_path / "cache.jsonl.seconds"
    first = add_sampling_seconds(record, 0, 5, time.perf_counter() - 3.0, 0.0)
    assert 3.0 <= first < 4.0 and json.loads(record.read_text()) == first
    assert add_sampling_seconds(record, 5, 5, time.perf_counter() - 9.0, 1.0) == 1.0 + first  # reused: not added
    assert 5.0 <= add_sampling_seconds(record, 5, 8, time.perf_counter() - 2.0, 0.0) < 6.0  # completed: 3 + 2
    older = tmp_path / "older.jsonl.seconds"  # rows sampled before seconds were kept: unknown, not 0
    assert add_sampling_seconds(older, 4, 4, time.perf_counter(), 0.0) is None
    assert add_sampling_seconds(older, 4, 6, time.perf_counter(), 0.0) is None


def test_taia_safety_quick(tmp_path):
    run_benchmark("taia_safety.py", tmp_path)
    report = json.loads((tmp_path / "taia_safety-quick.json").read_text())
    rows = ["aligned", "vanilla (all updates)", "TAIA (attention only)", "TAIF (MLP only)"]
    assert list(report["summary"]) == rows
    seed = report["per_seed"]["0"]
    for name in rows:
        assert set(seed[name]) == {"harmful_refusal", "compliance_loss", "benign_refusal"}, name
        assert 0.0 <= seed[name]["harmful_refusal"] <= 1.0 and 0.0 <= seed[name]["benign_refusal"] <= 1.0
    losses = [seed[name]["compliance_loss"] for name in rows]
    assert len(set(losses)) == 4  # four different models: the aligned start and three exports of one adapter
    assert set(report["stage_seconds"]) == {"align", "finetune seed 0"}
    assert report["finetune_rows"] == 12 and report["held_out_goals"] == 4  # the quick AdvBench split
    assert (tmp_path / "taia_safety-quick-summary.png").is_file()


def test_taia_safety_reuses_its_aligned_model(tmp_path):
    aligned = tmp_path / "aligned"
    run_benchmark("taia_safety.py", tmp_path, "--aligned-dir", str(aligned))
    first = json.loads((tmp_path / "taia_safety-quick.json").read_text())
    assert json.loads((aligned / "alignment.json").read_text())["align_steps"] == 2
    result = run_benchmark("taia_safety.py", tmp_path, "--aligned-dir", str(aligned))
    assert "reusing the aligned model" in result.stdout
    again = json.loads((tmp_path / "taia_safety-quick.json").read_text())
    assert again["per_seed"]["0"]["aligned"] == first["per_seed"]["0"]["aligned"]  # the same model, scored again
    result = subprocess.run(
        [sys.executable, os.path.join(BENCHMARKS, "taia_safety.py"), "--quick", "--output-dir", str(tmp_path),
         "--aligned-dir", str(aligned), "--align-steps", "3"],
        capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert result.returncode != 0 and "aligned with other settings" in result.stderr


@pytest.mark.parametrize("part", ["anit", "dsft"])
def test_composition_quick(tmp_path, part):
    run_benchmark("composition.py", tmp_path, "--part", part)
    report = json.loads((tmp_path / f"composition-{part}-quick.json").read_text())
    trained = ["SFT", "ANIT"] if part == "anit" else ["SFT (task only)", "DSFT ratio 1"]
    rows = [name + suffix for name in trained for suffix in ("", " + TAIA export")]
    assert list(report["summary"]) == rows and report["part"] == part
    seed = report["per_seed"]["0"]
    unbounded = ("typo_pdr", "piqa_gold_nll")
    bounded = [value for row in seed.values() for key, value in row.items() if key not in unbounded]
    assert all(0.0 <= value <= 1.0 for value in bounded)
    for name in trained:  # the export drops the MLP updates: the right options' likelihood is another model's
        assert seed[name]["piqa_gold_nll"] != seed[name + " + TAIA export"]["piqa_gold_nll"], name
    assert (tmp_path / f"composition-{part}-quick-summary.md").read_text().count("\n") == len(rows) + 2
    if part == "dsft":  # --extend keeps the recorded seed (not run again) and runs only the new one
        run_benchmark("composition.py", tmp_path, "--part", part, "--seeds", "0", "1", "--extend")
        extended = json.loads((tmp_path / f"composition-{part}-quick.json").read_text())
        assert extended["per_seed"]["0"] == report["per_seed"]["0"] and set(extended["per_seed"]) == {"0", "1"}
        assert extended["per_seed"]["1"] != report["per_seed"]["0"] and extended["extends"] == report["command"]
        assert extended["seed_seconds"]["0"] == report["seed_seconds"]["0"]  # the kept seed's cost is kept too
        assert not (tmp_path / f".composition-{part}-quick-seeds.json").exists()


def test_delia_quick(tmp_path):
    run_benchmark("delia.py", tmp_path, "--cache-dir", str(tmp_path / "cache"))
    report = json.loads((tmp_path / "delia-quick.json").read_text())
    assert list(report["summary"]) == ["base", "SFT (task only)", "DSFT ratio 1"]
    seed = report["per_seed"]["0"]
    # 8 task rows; ratio 1 mixes in floor(8 * 1) of the (8 + 4 queries) x 2 samples cached.
    assert [seed[name]["train_rows"] for name in report["summary"]] == [0, 8, 16]
    for name, row in seed.items():
        assert set(row) == {
            "unseen_format",
            "unseen_topic_accuracy",
            "unseen_exact",
            "seen_format",
            "format_leak",
            "piqa_accuracy",
            "train_seconds",
            "train_rows",
        }, name
        assert all(0.0 <= row[key] <= 1.0 for key in row if key not in ("train_seconds", "train_rows"))
    assert len(report["sample_answers"]["0"]["DSFT ratio 1"]) == 4  # one per unseen phrasing
    assert (tmp_path / "delia-quick-summary.png").is_file()
    assert report["cache_seconds"] > 0 and set(report["seed_seconds"]) == {"0"}
    assert not (tmp_path / ".delia-quick-seeds.json").exists()  # the resume file goes once the report is written
    # a second run reuses the cache (nothing sampled) and reports the sampling time of the run that made it
    run_benchmark("delia.py", tmp_path, "--cache-dir", str(tmp_path / "cache"))
    again = json.loads((tmp_path / "delia-quick.json").read_text())
    assert again["cache_seconds"] == report["cache_seconds"] and again["cache_rows"] == report["cache_rows"]
    # --extend keeps the recorded seed, its sample answers and its seconds, and runs only the new seed
    run_benchmark("delia.py", tmp_path, "--cache-dir", str(tmp_path / "cache"), "--seeds", "0", "1", "--extend")
    extended = json.loads((tmp_path / "delia-quick.json").read_text())
    assert extended["per_seed"]["0"] == again["per_seed"]["0"] and set(extended["per_seed"]) == {"0", "1"}
    assert extended["per_seed"]["1"] != extended["per_seed"]["0"]  # seed 1 really ran
    assert extended["sample_answers"]["0"] == again["sample_answers"]["0"]
    assert set(extended["sample_answers"]) == {"0", "1"}
    assert extended["seed_seconds"]["0"] == again["seed_seconds"]["0"] and extended["extends"] == again["command"]


def test_delia_task_format():
    sys.path.insert(0, BENCHMARKS)
    try:
        from delia import first_word, score_answers
    finally:
        sys.path.remove(BENCHMARKS)
    assert first_word("p2pnet.net News:- The US") == "news"
    assert first_word("#39;s over. It is") == "over"
    assert first_word("Café 42 !!") == "none"
    scores = score_answers(["sports | the", "sports | a", "Sports: the", ""], ["sports | the"] * 4)
    assert scores == {"format": 0.5, "topic_accuracy": 0.5, "exact": 0.25}


def test_realign_quick(tmp_path):
    run_benchmark(
        "realign.py",
        tmp_path,
        "--aligned-dir",
        str(tmp_path / "aligned"),
        "--keep-adapters",
        str(tmp_path / "adapters"),
    )
    report = json.loads((tmp_path / "realign-quick.json").read_text())
    rows = ["unaligned", "aligned", "fine-tuned", "RESTA", "SafeLoRA", "realigned (mask)", "realigned (sampled mask)"]
    assert list(report["summary"]) == rows
    seed = report["per_seed"]["0"]
    for row in seed.values():
        assert set(row) == {
            "harmful_refusal",
            "harmful_compliance",
            "benign_refusal",
            "sst2_accuracy",
            "kept_fraction",
        }
    assert 0.0 < seed["realigned (mask)"]["kept_fraction"] < 1.0
    assert 0.0 < seed["realigned (sampled mask)"]["kept_fraction"] < 1.0  # one 0/1 draw of the learnt mask
    assert seed["realigned (sampled mask)"]["kept_fraction"] != seed["realigned (mask)"]["kept_fraction"]
    kept = tmp_path / "adapters"  # what realign_probe.py reads: the seed's fine-tune adapter and realigned export
    assert (kept / "seed0-finetune" / "adapter_model.safetensors").is_file()
    report_of_export = json.loads((kept / "seed0-export" / "realign_report.json").read_text())
    assert report_of_export["kept_fraction"] == pytest.approx(seed["realigned (mask)"]["kept_fraction"])
    projected = report["safelora"]["0"]  # SafeLoRA's kept_fraction: the share of adapter layers left unprojected
    assert projected["layers"] == 7 * 2  # every linear layer of the tiny llama's two blocks carries LoRA
    assert seed["SafeLoRA"]["kept_fraction"] == pytest.approx(1 - projected["projected_layers"] / projected["layers"])
    assert projected["similarity_min"] <= projected["similarity_median"] <= projected["similarity_max"]
    assert report["aligned_reused"] is False and 0 < report["align_seconds"] <= report["stage_seconds"]["align"]
    shown = report["sample_answers"]["0"]  # the answers the keyword score read, per row
    assert set(shown) == set(rows) and all(len(shown[name]["harmful"]) == 4 for name in rows)
    assert set(report["seed_seconds"]) == {"0"} and report["seed_seconds"]["0"] > 0
    assert not (tmp_path / ".realign-quick-seeds.json").exists()  # the resume file is gone once the report is written
    assert set(report["stage_seconds"]) == {"align", "seed 0"}  # one alignment for every seed
    assert set(report["stage_seconds"]["seed 0"]) == {"finetune", "realign"}
    # the mask's DPO data: harmful goals, benign tasks (against over-refusal) and hh-rlhf pairs; its logged curve
    assert report["dpo_pairs"] == {"harmful": 8, "benign": 4, "hh_rlhf": 4}
    curve = report["dpo_curves"]["0"]
    assert [point["step"] for point in curve] == [1, 2] and all(point["loss"] > 0 for point in curve)
    assert (tmp_path / "realign-quick-dpo-curve.png").is_file()
    assert (tmp_path / "realign-quick-summary.md").read_text().count("\n") == len(rows) + 2
    # a second run reuses the aligned model and still reports what aligning it cost
    run_benchmark("realign.py", tmp_path, "--aligned-dir", str(tmp_path / "aligned"))
    again = json.loads((tmp_path / "realign-quick.json").read_text())
    assert again["aligned_reused"] is True and again["align_seconds"] == report["align_seconds"]
    assert again["per_seed"]["0"]["aligned"] == seed["aligned"]


def test_realign_probe_answers_with_the_adapter_and_a_random_mask_control(tmp_path):
    from peft import LoraConfig, get_peft_model

    from robust_sft import load_model_and_tokenizer
    from robust_sft.testing import save_tiny_model

    aligned = save_tiny_model(str(tmp_path / "aligned"))
    model, _ = load_model_and_tokenizer(aligned)
    torch.manual_seed(0)
    adapter = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    adapter.save_pretrained(tmp_path / "adapter")
    # --keep-like: each tensor's own kept fraction, read from a realigned export's report (here: keep everything)
    per_tensor = {name.replace(".default", ""): 1.0 for name, _ in adapter.named_parameters() if "lora_" in name}
    (tmp_path / "export").mkdir()
    (tmp_path / "export" / "realign_report.json").write_text(json.dumps({"per_tensor": per_tensor}))
    command = [sys.executable, os.path.join(BENCHMARKS, "realign_probe.py"), "--aligned-dir", aligned, "--adapter",
               str(tmp_path / "adapter"), "--goals", "3", "--output-dir", str(tmp_path), "--control-adapter",
               str(tmp_path / "adapter")]  # fmt: skip
    for keep, name in ((1.0, "all"), (0.3, "some")):
        result = subprocess.run([*command, "--random-keep", str(keep), "--name", name], capture_output=True, text=True)
        assert result.returncode == 0, result.stderr[-3000:]
    like = subprocess.run(
        [*command, "--keep-like", str(tmp_path / "export"), "--name", "like"], capture_output=True, text=True
    )
    assert like.returncode == 0, like.stderr[-3000:]
    kept_all = json.loads((tmp_path / "realign-probe-all.json").read_text())
    assert json.loads((tmp_path / "realign-probe-like.json").read_text())["random_mask_control"] == kept_all["adapter"]
    assert len(kept_all["prompts"]) == 3 + 2 and len(kept_all["adapter"]) == 5
    assert kept_all["random_mask_control"] == kept_all["adapter"] == kept_all["control"]  # a full mask: no change
    assert set(kept_all["adapter_shares"]) == {"keyword_refusal", "compliance"}
    sys.path.insert(0, BENCHMARKS)
    try:
        from realign import compliance
    finally:
        sys.path.remove(BENCHMARKS)
    assert compliance(["Sure, here is how", " sure, here it is", "I'm sorry", "Here is how"]) == 0.5
    assert json.loads((tmp_path / "realign-probe-some.json").read_text())["random_mask_control"] != kept_all["adapter"]


def test_scoring_quick(tmp_path):
    run_benchmark("scoring.py", tmp_path)
    report = json.loads((tmp_path / "scoring-quick.json").read_text())
    assert report["items"] == 8
    for key in ("acc", "acc_norm"):  # the same work: both scorers agree on every item's verdict
        assert report["robust_sft"][key] == pytest.approx(report["lm_eval"][key])
    assert report["time_ratio_robust_sft_over_lm_eval"] > 0


PROFILED = ["anit.py", "taia.py", "taia_safety.py", "delia.py", "realign.py", "composition.py", "cost.py"]
PROFILED += ["scoring.py"]


@pytest.mark.parametrize("script", PROFILED)
def test_gpu_profile_refused_without_cuda(script):
    """Every side-by-side benchmark takes --profile gpu and, with no CUDA device, refuses it before any work."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present: the gpu profile would run")
    command = [sys.executable, os.path.join(BENCHMARKS, script), "--profile", "gpu"]
    command += ["--part", "anit"] if script == "composition.py" else []
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert "--profile gpu needs a CUDA device" in result.stderr, result.stderr[-2000:]
    assert "Traceback" not in result.stderr  # a clear message, not a crash


def test_profile_names_and_model_override():
    import argparse

    sys.path.insert(0, BENCHMARKS)
    try:
        import common
    finally:
        sys.path.remove(BENCHMARKS)
    parser = argparse.ArgumentParser()
    common.add_profile_arguments(parser)
    parser.add_argument("--quick", action="store_true")
    try:
        common.apply_profile(parser.parse_args([]))
        assert common.report_suffix(False) == "" and common.report_suffix(True) == "-quick"
        assert common.model_description(False) == "SmolLM2-135M-Instruct (embedded)"
        # another model never writes over the recorded results
        common.apply_profile(parser.parse_args(["--model", "some/folder/Llama-3.2-1B-Instruct/"]))
        assert common.report_suffix(False) == "-cpu-Llama-3.2-1B-Instruct"
        assert common.model_description(False) == "some/folder/Llama-3.2-1B-Instruct/ (float32, cpu)"
        with pytest.raises(SystemExit, match="drop --profile gpu"):
            common.apply_profile(parser.parse_args(["--profile", "gpu", "--quick"]))
    finally:
        common.apply_profile(parser.parse_args([]))
