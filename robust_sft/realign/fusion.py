"""Fusion of (masked) task vectors with PEFT's merge utilities, and the RESTA baseline."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from peft.utils import merge_utils
from torch import nn

from .masks import scaled_mask
from .task_vectors import apply_task_vector

# ------------------------------------------------------------------------------------------------ fusion
FUSION_METHODS = ("task_arithmetic", "ties", "dare_linear", "dare_ties", "magnitude_prune")


FUSION_DEFAULTS = {  # the paper's settings
    "task_arithmetic": {"weight": 0.3},
    "ties": {"weight": 0.4, "density": 0.2},
    "dare_linear": {"weight": 0.3, "density": 0.8},
    "dare_ties": {"weight": 0.3, "density": 0.8},
    "magnitude_prune": {"weight": 0.3, "density": 0.2},
}


def masked_task_vector(vector: dict[str, torch.Tensor], masks: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`m * tau / mean(m)` per tensor (tensors without a mask are kept whole)."""
    return {
        name: scaled_mask(masks[name].float().expand_as(delta)) * delta if name in masks else delta
        for name, delta in vector.items()
    }


def fuse_task_vectors(
    vectors: Sequence[dict[str, torch.Tensor]],
    method: str = "task_arithmetic",
    weights: Sequence[float] | None = None,
    density: float | None = None,
    masks: Sequence[dict[str, torch.Tensor] | None] | None = None,
    majority_sign_method: str = "total",
) -> dict[str, torch.Tensor]:
    """Fuse several task vectors tensor by tensor with `peft.utils.merge_utils`, after applying each one's mask.

    Defaults are the paper's: task arithmetic lambda 0.3; TIES density 0.2 (top 20%) lambda 0.4; DARE drop 20%
    (density 0.8). The result is a task vector: add it to the safe model with [`apply_task_vector`].
    """
    if method not in FUSION_METHODS:
        raise ValueError(f"Unknown fusion method {method!r}; expected one of {FUSION_METHODS}.")
    defaults = FUSION_DEFAULTS[method]
    weights = list(weights) if weights is not None else [defaults["weight"]] * len(vectors)
    density = density if density is not None else defaults.get("density")
    if len(weights) != len(vectors):
        raise ValueError(f"Got {len(weights)} weights for {len(vectors)} task vectors.")
    if masks is not None:
        vectors = [masked_task_vector(vector, mask or {}) for vector, mask in zip(vectors, masks, strict=True)]
    names = set(vectors[0])
    if any(set(vector) != names for vector in vectors[1:]):
        raise ValueError("The task vectors do not cover the same tensors; fuse vectors of the same model and targets.")
    weight_tensor = torch.tensor(weights, dtype=torch.float32)
    function = getattr(merge_utils, method)
    fused = {}
    for name in vectors[0]:
        tensors = [vector[name].float() for vector in vectors]
        if method == "task_arithmetic":
            fused[name] = function(tensors, weight_tensor)
        elif method in ("ties", "dare_ties"):
            fused[name] = function(tensors, weight_tensor, density, majority_sign_method)
        else:
            fused[name] = function(tensors, weight_tensor, density)
    return fused


def resta(finetuned: nn.Module, safety_vector: dict[str, torch.Tensor], coefficient: float = 1.0) -> nn.Module:
    """RESTA baseline: add back a safety vector, `W_ft + b * (W_aligned - W_unaligned)`, in place."""
    return apply_task_vector(finetuned, safety_vector, coefficient)
