"""Fusion of (masked) task vectors with PEFT's merge utilities, and the RESTA baseline."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

import torch
from peft.utils import merge_utils
from torch import nn

from .masks import ConcreteMask, apply_mask, mask_values
from .task_vectors import apply_task_vector, check_lora_compatibility

# ------------------------------------------------------------------------------------------------ fusion
FUSION_METHODS = ("task_arithmetic", "ties", "dare_linear", "dare_ties", "magnitude_prune")


FUSION_DEFAULTS = {  # the paper's settings
    "task_arithmetic": {"weight": 0.3},
    "ties": {"weight": 0.4, "density": 0.2},
    "dare_linear": {"weight": 0.3, "density": 0.8},
    "dare_ties": {"weight": 0.3, "density": 0.8},
    "magnitude_prune": {"weight": 0.3, "density": 0.2},
}


MaskSource = Mapping[str, ConcreteMask] | Mapping[str, torch.Tensor] | str | os.PathLike


def masked_task_vector(
    vector: Mapping[str, torch.Tensor], masks: MaskSource, export_mode: str | None = None
) -> dict[str, torch.Tensor]:
    """`m * tau / mean(m)` per tensor (`m * tau` for a single-value mask); tensors without a mask are kept whole.

    `masks` are trained masks (`trainer.masks`), a masks file from [`save_masks`] / `trainer.save_model()`, or mask
    values in [0, 1] broadcastable to each tensor; trained masks and files use their deterministic export mask.
    """
    values = mask_values(masks, export_mode)
    unknown = sorted(set(values) - set(vector))
    if unknown:
        raise ValueError(
            f"The masks cover tensors the task vector lacks (e.g. {unknown[:3]}): a mask of another vector?"
        )
    return {
        name: apply_mask(delta, values[name].to(delta.device)).to(delta.dtype) if name in values else delta
        for name, delta in vector.items()
    }


def fuse_task_vectors(
    vectors: Sequence[Mapping[str, torch.Tensor]],
    method: str = "task_arithmetic",
    weights: Sequence[float] | None = None,
    density: float | None = None,
    masks: Sequence[MaskSource | None] | None = None,
    majority_sign_method: str = "total",
    seed: int | None = None,
) -> dict[str, torch.Tensor]:
    """Fuse several task vectors tensor by tensor with `peft.utils.merge_utils`, after applying each one's mask.

    Defaults are the paper's: task arithmetic lambda 0.3; TIES density 0.2 (top 20%) lambda 0.4; DARE drop 20%
    (density 0.8). `masks` has one entry per vector: `None`, trained masks, a masks file or mask values (see
    [`masked_task_vector`]); a shared mask trained over several vectors is simply given for each of them. `seed`
    makes DARE's random drop reproducible (the global RNG is left as it was). LoRA vectors (from
    [`task_vector_from_adapters`]) must share r, alpha and targets. The result is a task vector: add it to the safe
    model with [`apply_task_vector`].
    """
    if method not in FUSION_METHODS:
        raise ValueError(f"Unknown fusion method {method!r}; expected one of {FUSION_METHODS}.")
    if not vectors:
        raise ValueError("No task vectors to fuse.")
    defaults = FUSION_DEFAULTS[method]
    weights = list(weights) if weights is not None else [defaults["weight"]] * len(vectors)
    density = density if density is not None else defaults.get("density")
    if len(weights) != len(vectors):
        raise ValueError(f"Got {len(weights)} weights for {len(vectors)} task vectors.")
    configs = [getattr(vector, "lora_config", None) for vector in vectors]
    if all(config is not None for config in configs):
        check_lora_compatibility(*configs, names=[f"task vector {i}" for i in range(len(vectors))])
    if masks is not None:
        if len(masks) != len(vectors):
            raise ValueError(f"Got {len(masks)} masks for {len(vectors)} task vectors (use None for an unmasked one).")
        vectors = [
            vector if mask is None else masked_task_vector(vector, mask) for vector, mask in zip(vectors, masks)
        ]
    names = set(vectors[0])
    if any(set(vector) != names for vector in vectors[1:]):
        raise ValueError("The task vectors do not cover the same tensors; fuse vectors of the same model and targets.")
    weight_tensor = torch.tensor(weights, dtype=torch.float32)
    function = getattr(merge_utils, method)
    fused = {}
    cuda = sorted({tensor.device.index or 0 for vector in vectors for tensor in vector.values() if tensor.is_cuda})
    with torch.random.fork_rng(devices=cuda, enabled=seed is not None):
        if seed is not None:
            torch.manual_seed(seed)
        for name in vectors[0]:
            tensors = [vector[name].float() for vector in vectors]
            if method == "task_arithmetic":
                fused[name] = function(tensors, weight_tensor)
            elif method in ("ties", "dare_ties"):
                fused[name] = function(tensors, weight_tensor, density, majority_sign_method)
            else:
                fused[name] = function(tensors, weight_tensor, density)
    return fused


def resta(finetuned: nn.Module, safety_vector: Mapping[str, torch.Tensor], coefficient: float = 1.0) -> nn.Module:
    """RESTA baseline: add back a safety vector, `W_ft + b * (W_aligned - W_unaligned)`, in place."""
    return apply_task_vector(finetuned, safety_vector, coefficient)
