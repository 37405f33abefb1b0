"""The benchmarks' --quick modes run end to end and write every row (the full runs are recorded in BENCHMARKS.md)."""

import json
import os
import subprocess
import sys

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
    run_benchmark("anit.py", tmp_path)
    report = json.loads((tmp_path / "anit-quick.json").read_text())
    assert list(report["summary"]) == ["base (no training)", "SFT", "NEFTune (alpha 5)", "noise only", "ANIT"]
    for name, metrics in report["summary"].items():
        assert set(metrics) == {"clean_accuracy", "perturbed_accuracy", "mean_pdr", "train_seconds"}, name
        assert 0.0 <= metrics["clean_accuracy"]["mean"] <= 1.0
    assert report["summary"]["base (no training)"]["train_seconds"]["mean"] == 0.0
    seed_scores = report["per_seed"]["0"]["ANIT"]["scores"]
    assert {"clean", "char_substitute", "keyboard_typo"} <= set(seed_scores)
    assert (tmp_path / "anit-quick-summary.png").is_file()


def test_taia_quick(tmp_path):
    run_benchmark("taia.py", tmp_path)
    report = json.loads((tmp_path / "taia-quick.json").read_text())
    rows = ["base", "vanilla (all updates)", "TAIA (attention only)", "TAIF (MLP only)"]
    assert list(report["summary"]) == rows
    seed = report["per_seed"]["0"]
    losses = [seed[name]["gsm8k_answer_loss"] for name in rows]
    assert len(set(losses)) == 4  # four different models
    assert all(0.0 <= seed[name]["piqa_accuracy"] <= 1.0 for name in rows)
    assert (tmp_path / "taia-quick-summary.md").is_file()
