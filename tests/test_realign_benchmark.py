"""The realignment benchmark's DPO "chosen" answers are independent of the alignment refusals and of the refusal
keywords the score counts (else the refusal rate would partly measure recall of the scored phrases)."""

import os
import sys

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
