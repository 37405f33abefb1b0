"""Multiple-choice scoring with lm-evaluation-harness's definitions, and lm-eval itself over local task files.

Scores from [`multiple_choice_scores`] equal lm-eval 0.4's `output_type: multiple_choice` (checked in
tests/test_harness.py against lm-eval's own `HFLM` on the same rows):

- each option is the continuation `target_delimiter + option` (a space) after the context, e.g. PIQA's
  `"Question: {goal}\\nAnswer:"`; the pair is tokenized as lm-eval does (trailing spaces of the context move to the
  continuation; the whole text is encoded and split at the context's length);
- `acc`: the option with the highest summed log-likelihood; `acc_norm`: the highest log-likelihood divided by the
  option's length in characters; both with lm-eval's standard error (sample standard deviation / sqrt(n)).

Each (context, option) pair is one forward pass over right-padded batches, without the chat template, so published
numbers compare. [`run_harness`] runs lm-eval itself (`pip install robust_sft[eval]`) on a model folder or an adapter,
with task definitions written over local files (no hub).
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ..generation import _model_device
from .scoring import MultipleChoiceQuestion

PIQA_CONTEXT = "Question: {question}\nAnswer:"


def encode_pair(tokenizer: PreTrainedTokenizerBase, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids) exactly as lm-eval's causal `_encode_pair` makes them."""
    if not context:
        raise ValueError("The context of a log-likelihood request must not be empty.")
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = tokenizer.encode(context + continuation)
    context_ids = tokenizer.encode(context)
    return context_ids, whole[len(context_ids) :]


@torch.no_grad()
def loglikelihoods(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    requests: Sequence[tuple[str, str]],
    batch_size: int = 32,
    max_length: int | None = None,
    desc: str = "log-likelihood",
) -> list[float]:
    """The summed log-probability of each continuation given its context (lm-eval's `loglikelihood`)."""
    max_length = max_length or getattr(model.config, "max_position_embeddings", 2048)
    encoded = [encode_pair(tokenizer, context, continuation) for context, continuation in requests]
    # Longest first, as lm-eval: a batch's padding is set by its first row and memory errors come early.
    order = sorted(range(len(encoded)), key=lambda index: -sum(map(len, encoded[index])))
    device = _model_device(model)
    was_training = model.training
    model.eval()
    results = [0.0] * len(encoded)
    for start in tqdm(range(0, len(order), batch_size), desc=desc, leave=False):
        chunk = order[start : start + batch_size]
        inputs = [(encoded[i][0] + encoded[i][1])[-(max_length + 1) :][:-1] for i in chunk]
        width = max(len(ids) for ids in inputs)
        batch = torch.zeros((len(chunk), width), dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, ids in enumerate(inputs):
            batch[row, : len(ids)] = torch.tensor(ids)
            mask[row, : len(ids)] = 1
        logits = model(input_ids=batch.to(device), attention_mask=mask.to(device)).logits.float()
        log_probs = torch.log_softmax(logits, dim=-1).cpu()
        for row, index in enumerate(chunk):
            continuation = torch.tensor(encoded[index][1])
            end = len(inputs[row])
            picked = log_probs[row, end - len(continuation) : end].gather(-1, continuation.unsqueeze(-1))
            results[index] = picked.sum().item()
    model.train(was_training)
    return results


@dataclass
class ChoiceResult:
    """One question's option log-likelihoods and the lm-eval verdicts."""

    loglikelihoods: list[float]
    option_chars: list[int]
    answer: int

    @property
    def acc(self) -> float:
        return float(max(range(len(self.loglikelihoods)), key=self.loglikelihoods.__getitem__) == self.answer)

    @property
    def acc_norm(self) -> float:
        normed = [ll / chars for ll, chars in zip(self.loglikelihoods, self.option_chars)]
        return float(max(range(len(normed)), key=normed.__getitem__) == self.answer)


def multiple_choice_scores(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    questions: Sequence[MultipleChoiceQuestion],
    context: str = PIQA_CONTEXT,
    target_delimiter: str = " ",
    batch_size: int = 32,
    desc: str = "multiple choice",
) -> list[ChoiceResult]:
    """Score every option of every question as lm-eval does (`context` is formatted with `question=`)."""
    requests, owners = [], []
    for number, question in enumerate(questions):
        prompt = context.format(question=question.question)
        for option in question.options:
            requests.append((prompt, target_delimiter + option))
            owners.append(number)
    scores = loglikelihoods(model, tokenizer, requests, batch_size=batch_size, desc=desc)
    results, cursor = [], 0
    for question in questions:
        count = len(question.options)
        lls = scores[cursor : cursor + count]
        cursor += count
        results.append(ChoiceResult(lls, [len(option) for option in question.options], question.answer))
    return results


def mean_and_stderr(values: Sequence[float]) -> tuple[float, float]:
    """The mean and lm-eval's standard error of the mean (sample standard deviation / sqrt(n))."""
    n = len(values)
    if n == 0:
        return 0.0, 0.0
    mean = sum(values) / n
    if n < 2:
        return mean, 0.0
    variance = sum((value - mean) ** 2 for value in values) / (n - 1)
    return mean, math.sqrt(variance) / math.sqrt(n)


def multiple_choice_metrics(results: Sequence[ChoiceResult]) -> dict[str, float]:
    """`acc`, `acc_norm` and their standard errors, as lm-eval reports them."""
    acc, acc_stderr = mean_and_stderr([result.acc for result in results])
    acc_norm, acc_norm_stderr = mean_and_stderr([result.acc_norm for result in results])
    return {
        "acc": acc,
        "acc_stderr": acc_stderr,
        "acc_norm": acc_norm,
        "acc_norm_stderr": acc_norm_stderr,
        "n": len(results),
    }


# ------------------------------------------------------------------------------------------------ lm-eval itself
HARNESS_TASKS = ("piqa",)

_PIQA_TASK = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    validation: {data}
validation_split: validation
output_type: multiple_choice
doc_to_text: "Question: {{{{goal}}}}\\nAnswer:"
doc_to_target: label
doc_to_choice: "{{{{[sol1, sol2]}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
"""


def write_piqa_task(questions: Sequence[MultipleChoiceQuestion], folder: str | os.PathLike, name: str) -> Path:
    """An lm-eval task definition (PIQA's own prompt and metrics) over a local copy of `questions`."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    data = folder / f"{name}.jsonl"
    rows = [{"goal": q.question, "sol1": q.options[0], "sol2": q.options[1], "label": q.answer} for q in questions]
    data.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    (folder / f"{name}.yaml").write_text(_PIQA_TASK.format(name=name, data=data.resolve()), encoding="utf-8")
    return folder


def run_harness(
    model: str | os.PathLike | Any,
    task: str,
    questions: Sequence[MultipleChoiceQuestion],
    *,
    tokenizer: Any | None = None,
    adapter: str | os.PathLike | None = None,
    batch_size: int = 32,
    log_samples: bool = False,
) -> dict[str, Any]:
    """Run lm-eval's `simple_evaluate` on `questions` with the task's standard prompt and metrics (no hub).

    `model` is a folder (or a loaded model with `tokenizer`); `adapter` a PEFT adapter folder on top of it. Returns
    lm-eval's results dict for the task (acc, acc_norm and their `_stderr`) and, with `log_samples`, its samples.
    """
    if task not in HARNESS_TASKS:
        raise ValueError(f"No local lm-eval definition for task {task!r}; available: {', '.join(HARNESS_TASKS)}.")
    try:
        from lm_eval import simple_evaluate
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as error:
        raise ImportError("run_harness needs lm-eval: pip install 'robust_sft[eval]' (lm-eval 0.4.13).") from error
    with tempfile.TemporaryDirectory(prefix="robust-sft-harness-") as folder:
        name = f"{task}_local"
        write_piqa_task(questions, folder, name)
        if isinstance(model, (str, os.PathLike)):
            device = "cuda" if torch.cuda.is_available() else "cpu"  # lm-eval's HFLM assumes CUDA otherwise
            arguments: dict[str, Any] = {"pretrained": str(model), "dtype": "float32", "device": device}
            if adapter is not None:
                arguments["peft"] = str(adapter)
            lm = HFLM(**arguments, batch_size=batch_size)
        else:
            lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
        output = simple_evaluate(
            model=lm,
            tasks=[name],
            task_manager=TaskManager(include_path=folder),
            log_samples=log_samples,
            verbosity="ERROR",
        )
    result = {key.split(",")[0]: value for key, value in output["results"][name].items() if key != "alias"}
    if log_samples:
        result["samples"] = output["samples"][name]
    return result
