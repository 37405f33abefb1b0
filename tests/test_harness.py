"""Our multiple-choice scores against lm-evaluation-harness 0.4.13's own implementation on the same PIQA rows."""

import inspect
import math
from pathlib import Path

import pytest

from robust_sft.evaluation.harness import (
    PIQA_CONTEXT,
    encode_pair,
    loglikelihoods,
    mean_and_stderr,
    multiple_choice_metrics,
    multiple_choice_scores,
    run_harness,
    write_piqa_task,
)
from robust_sft.evaluation.tasks import load_piqa
from robust_sft.testing import make_tiny_model, make_tiny_tokenizer

lm_eval = pytest.importorskip("lm_eval")

SHARED_PIQA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "piqa"


@pytest.fixture(scope="module")
def tiny():
    tokenizer = make_tiny_tokenizer()
    return make_tiny_model("llama", tokenizer, seed=3).eval(), tokenizer


@pytest.fixture(scope="module")
def piqa_rows():
    if not SHARED_PIQA.is_dir():
        pytest.skip("../shared/data/piqa is not beside the checkout")
    # Short rows keep the tiny model's context small; the same rows go to both implementations.
    return [q for q in load_piqa(SHARED_PIQA) if len(q.question) + max(map(len, q.options)) < 160][:24]


def test_trailing_spaces_move_to_the_continuation_as_lm_eval_does(tiny):
    _, tokenizer = tiny
    assert encode_pair(tokenizer, "Answer: ", "yes") == encode_pair(tokenizer, "Answer:", " yes")
    context, continuation = encode_pair(tokenizer, "Question: a\nAnswer:", " b")
    assert context + continuation == tokenizer.encode("Question: a\nAnswer: b")


def test_scores_equal_lm_eval_on_the_same_piqa_rows(tiny, piqa_rows):
    model, tokenizer = tiny
    ours = multiple_choice_scores(model, tokenizer, piqa_rows, batch_size=7)
    theirs = run_harness(model, "piqa", piqa_rows, tokenizer=tokenizer, batch_size=5, log_samples=True)
    samples = sorted(theirs["samples"], key=lambda sample: sample["doc_id"])
    assert len(samples) == len(ours) == len(piqa_rows)
    for mine, sample in zip(ours, samples):
        reference = [float(response[0][0]) for response in sample["resps"]]
        assert mine.loglikelihoods == pytest.approx(reference, abs=1e-4)
        assert (mine.acc, mine.acc_norm) == (sample["acc"], sample["acc_norm"])
    metrics = multiple_choice_metrics(ours)
    for key in ("acc", "acc_norm", "acc_stderr", "acc_norm_stderr"):
        assert metrics[key] == pytest.approx(theirs[key], abs=1e-9), key


def test_our_local_piqa_task_is_lm_evals_shipped_piqa_task_over_local_rows(tmp_path):
    """The equality test above runs lm-eval on our local task file against our scorer's `PIQA_CONTEXT`; this ties
    both to lm-eval's own piqa.yaml, so neither can drift from the published prompt, choices, target and metrics."""
    import yaml

    shipped = yaml.safe_load((Path(lm_eval.__file__).parent / "tasks" / "piqa" / "piqa.yaml").read_text())
    ours = yaml.safe_load((write_piqa_task([], tmp_path, "piqa_local") / "piqa_local.yaml").read_text())
    for key in ("output_type", "doc_to_text", "doc_to_target", "doc_to_choice", "metric_list", "validation_split"):
        assert ours[key] == shipped[key], key
    assert ours["dataset_path"] == "json"  # local rows instead of the hub's dataset: the only intended difference
    # our scorer's prompt: lm-eval's doc_to_text rendered for one question; options after TaskConfig's delimiter
    from lm_eval.config.task import TaskConfig

    assert PIQA_CONTEXT.format(question="Q?") == shipped["doc_to_text"].replace("{{goal}}", "Q?")
    delimiter = shipped.get("target_delimiter", TaskConfig.target_delimiter)
    assert delimiter == inspect.signature(multiple_choice_scores).parameters["target_delimiter"].default == " "


def test_loglikelihood_is_the_sum_of_the_continuation_token_log_probs(tiny):
    import torch

    model, tokenizer = tiny
    context, continuation = "Question: why\nAnswer:", " because it is"
    (score,) = loglikelihoods(model, tokenizer, [(context, continuation)])
    context_ids, continuation_ids = encode_pair(tokenizer, context, continuation)
    ids = torch.tensor([context_ids + continuation_ids])
    with torch.no_grad():
        log_probs = torch.log_softmax(model(ids).logits.float(), -1)[0]
    expected = sum(log_probs[len(context_ids) + i - 1, token].item() for i, token in enumerate(continuation_ids))
    assert score == pytest.approx(expected, abs=1e-5)


def test_stderr_is_the_sample_standard_deviation_over_sqrt_n():
    mean, stderr = mean_and_stderr([1.0, 0.0, 1.0, 1.0])
    assert mean == 0.75
    assert stderr == pytest.approx(math.sqrt(0.25) / 2)
    assert mean_and_stderr([]) == (0.0, 0.0)


def test_cli_harness_and_task_piqa_agree_on_a_model_folder(tmp_path, piqa_rows):
    import json

    from robust_sft.cli import main
    from robust_sft.testing import save_tiny_model

    model = save_tiny_model(str(tmp_path / "model"), seed=5)
    common = ["--model", model, "--data", str(SHARED_PIQA), "--limit", "6", "--batch-size", "4"]
    assert main(["eval", "--harness", "piqa", *common, "--output", str(tmp_path / "harness.json")]) == 0
    assert main(["eval", "--task", "piqa", *common, "--output-dir", str(tmp_path / "ours")]) == 0
    harness = json.loads((tmp_path / "harness.json").read_text())
    ours = json.loads((tmp_path / "ours" / "piqa.json").read_text())[model]
    for key in ("acc", "acc_norm", "acc_stderr", "acc_norm_stderr"):
        assert ours[key] == pytest.approx(harness[key], abs=1e-9), key
    assert ours["n"] == 6
