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
