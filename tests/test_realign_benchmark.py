"""The realignment benchmark's DPO "chosen" answers are independent of the alignment refusals and of the refusal
keywords the score counts (else the refusal rate would partly measure recall of the scored phrases)."""

import json
import os
import subprocess
import sys

import pytest

from robust_sft.evaluation import REFUSAL_KEYWORDS, is_refusal

BENCHMARKS = os.path.join(os.path.dirname(__file__), "..", "benchmarks")


def benchmark_module():
    sys.path.insert(0, BENCHMARKS)
    try:
        import realign
    finally:
        sys.path.remove(BENCHMARKS)
    return realign


def test_dpo_chosen_answers_are_independent_of_refusals_and_keywords():
    realign = benchmark_module()
    answers, refusals = realign.SAFE_ANSWERS, realign.REFUSALS
    assert len(set(answers)) == len(answers) >= 10
    assert not any(is_refusal(answer) for answer in answers)  # no keyword, typographic apostrophes included
    assert not any(keyword.lower() in answer.lower() for answer in answers for keyword in REFUSAL_KEYWORDS)
    assert all(is_refusal(refusal) for refusal in refusals)  # the alignment SFT's refusals do carry keywords

    def four_grams(text):
        words = "".join(c if c.isalnum() or c == "'" else " " for c in text.lower()).split()
        return {tuple(words[i : i + 4]) for i in range(len(words) - 3)}

    template = set().union(*(four_grams(refusal) for refusal in refusals))
    for answer in answers:  # no answer shares a four-word phrase with an alignment refusal
        assert not four_grams(answer) & template, answer


@pytest.mark.slow
def test_memory_benchmark_quick(tmp_path):
    """The memory benchmark's --quick run (two rows) writes its report; the realignment's own tensors follow the
    documented formula: 4 (W_ft) + 4 (logit) + 4 (gradient) + 8 (Adam) bytes per masked element in float32."""
    command = [sys.executable, os.path.join(BENCHMARKS, "realign_memory.py"), "--quick", "--output-dir", str(tmp_path)]
    command += ["--rows", "lora-model", "realign-lora"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "realign-memory-quick.json").read_text())
    rows = report["rows"]
    assert list(rows) == ["fine-tuned LoRA model (load + forward)", "realign, LoRA mode (reference through the masks)"]
    realign = rows["realign, LoRA mode (reference through the masks)"]
    assert realign["realign_bytes_per_masked_element"] == pytest.approx(20.0, abs=0.01)  # + Adam step counters
    assert realign["reference_bytes"] == 0
    assert (
        realign["peak_above_imports_mib"] > 0
        and rows["fine-tuned LoRA model (load + forward)"]["peak_over_lora_model"] == 1.0
    )
