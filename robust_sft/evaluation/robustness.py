"""Robustness to perturbed instructions: accuracy per operator, per paraphrase and per distortion bucket, PDR."""

from __future__ import annotations

import random
from collections.abc import Sequence

from datasets import Dataset
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ..data import detect_format, to_example
from .scoring import label_accuracy, label_correctness


def performance_drop_rate(clean: float, perturbed: float) -> float:
    """PDR = 1 - perturbed / clean (PromptBench); 0 when the clean score is 0 (nothing left to drop)."""
    return 1.0 - perturbed / clean if clean > 0 else 0.0


DISTORTION_BUCKETS = (0.1, 0.3)  # bucket edges of the per-distortion breakdown: [0, .1), [.1, .3), [.3, 1]


def distortion_bucket(distortion: float, edges: Sequence[float] = DISTORTION_BUCKETS) -> str:
    """The name of the bucket a distortion falls in, e.g. `[0.1, 0.3)`; the last bucket includes 1."""
    bounds = [0.0, *edges, 1.0]
    for low, high in zip(bounds[:-2], bounds[1:-1]):
        if distortion < high:
            return f"[{low:g}, {high:g})"
    return f"[{bounds[-2]:g}, 1]"


def perturbation_robustness(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    rows: Dataset,
    labels: Sequence[str],
    operators: Sequence[str],
    rate: float = 0.2,
    seed: int = 0,
    batch_size: int = 32,
    instruction_variants: Sequence[str] = (),
    buckets: Sequence[float] = DISTORTION_BUCKETS,
) -> dict[str, dict[str, float]]:
    """Label accuracy with clean instructions, with each operator's perturbation and with each paraphrase.

    Returns `{name: {"accuracy", "pdr"}}` for `clean`, every operator (with `changed`, the share of rows the operator
    really changed) and every `paraphrase:<i>` (the instruction replaced by `instruction_variants[i]`), plus
    `distortion:<bucket>` rows pooling the changed rows of every operator by their Levenshtein distortion
    (`{"accuracy", "pdr", "count"}`). Each row's noise is seeded by (seed,
    operator, row), so every model compared sees the same perturbed instructions.
    """
    from ..anit.distortion import levenshtein_distortion
    from ..anit.noise import NoiseContext, apply_noise, get_operator

    data_format = detect_format(rows.column_names)
    instructions = [to_example(row, data_format, i).instruction for i, row in enumerate(rows)]
    context = NoiseContext.from_texts(instructions)
    clean = label_accuracy(model, tokenizer, rows, labels, batch_size=batch_size, desc="clean")
    results = {"clean": {"accuracy": clean, "pdr": 0.0}}
    pooled: dict[str, list[bool]] = {}
    for name in operators:
        operator = get_operator(name)
        drawn = [
            apply_noise(text, operator, rate, random.Random(f"{seed}:{name}:{i}"), context)
            for i, text in enumerate(instructions)
        ]
        noisy = [text for text, _ in drawn]
        correct = label_correctness(model, tokenizer, rows, labels, lambda text, i, n=noisy: n[i], batch_size, name)
        accuracy = sum(correct) / max(len(correct), 1)
        changed = sum(bool(used) for _, used in drawn)
        results[name] = {
            "accuracy": accuracy,
            "pdr": performance_drop_rate(clean, accuracy),
            "changed": changed / max(len(drawn), 1),
        }
        # Only rows the operator really changed go into the distortion buckets (an unchanged row is a clean row).
        for raw, (text, used), right in zip(instructions, drawn, correct):
            if used:
                pooled.setdefault(distortion_bucket(levenshtein_distortion(raw, text), buckets), []).append(right)
    for number, variant in enumerate(instruction_variants):
        accuracy = label_accuracy(
            model, tokenizer, rows, labels, lambda text, index, v=variant: v, batch_size, f"paraphrase {number}"
        )
        results[f"paraphrase:{number}"] = {"accuracy": accuracy, "pdr": performance_drop_rate(clean, accuracy)}
    for bucket, flags in pooled.items():
        accuracy = sum(flags) / len(flags)
        results[f"distortion:{bucket}"] = {
            "accuracy": accuracy,
            "pdr": performance_drop_rate(clean, accuracy),
            "count": len(flags),
        }
    return results
