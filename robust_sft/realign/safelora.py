"""SafeLoRA (Hsu et al. 2024, arXiv 2405.16833, NeurIPS 2024): project a LoRA fine-tune onto the alignment subspace.

A post-hoc baseline beside RESTA, with no training. Per LoRA layer, the alignment matrix `V = W_aligned -
W_unaligned` (the base weight of that layer in the aligned and the unaligned model) gives `C = V V^T / ||V||_F`. The
LoRA update `dW = B A` is compared with its projection `C dW`; where their cosine similarity (of the flattened
matrices) is below a threshold, the layer's update is replaced by the projection, i.e. `B <- C B` (as
`C (B A) = (C B) A`, the adapter keeps its shape). The other layers are kept. The official code offers the same two
selections: a similarity threshold (0.5) or the `k` layers of lowest similarity.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from peft import PeftModel
from torch import nn

from .task_vectors import _safetensors_files, read_tensor

# ------------------------------------------------------------------------------------------------ the projection
WeightSource = str | os.PathLike | nn.Module | Mapping[str, torch.Tensor]


@dataclass
class SafeLoRAReport:
    """What [`safe_lora`] did: the cosine similarity of each LoRA layer's update with its projection (by module
    name), the layers it projected, and the threshold used."""

    similarities: dict[str, float] = field(default_factory=dict)
    projected: list[str] = field(default_factory=list)
    threshold: float | None = None


class _Weights:
    """Base-model weights by name, read one tensor at a time from a safetensors folder, a module or a dict."""

    def __init__(self, source: WeightSource):
        if isinstance(source, (str, os.PathLike)):
            self.files = _safetensors_files(source, "model.safetensors", "model.safetensors.index.json")
            self.tensors = None
        else:
            self.files = None
            self.tensors = dict(source.state_dict() if isinstance(source, nn.Module) else source)
        self.source = source

    def __getitem__(self, name: str) -> torch.Tensor:
        names = self.files if self.files is not None else self.tensors
        if name not in names:
            raise KeyError(f"{self.source!s:.80} has no weight {name}: is it the same architecture as the LoRA base?")
        return read_tensor(self.files[name], name) if self.files is not None else self.tensors[name]


def _lora_layers(model: PeftModel, adapter: str) -> dict[str, nn.Module]:
    """LoRA layers of `adapter` with matrix A / B (linear layers), by module name without PEFT's prefix."""
    layers = {}
    for name, module in model.named_modules():
        lora_a = getattr(module, "lora_A", None)
        if isinstance(lora_a, nn.ModuleDict) and adapter in lora_a:
            if getattr(lora_a[adapter], "weight", None) is None or lora_a[adapter].weight.dim() != 2:
                raise ValueError(f"{name}: SafeLoRA projects linear LoRA layers only (got {type(module).__name__}).")
            layers[name.removeprefix("base_model.model.")] = module
    if not layers:
        raise ValueError(f"The model has no LoRA layers for adapter {adapter!r}.")
    return layers


def alignment_projection(aligned: torch.Tensor, unaligned: torch.Tensor) -> torch.Tensor:
    """`C = V V^T / ||V||_F` with `V = W_aligned - W_unaligned` (out x in), computed in float32."""
    if aligned.shape != unaligned.shape:
        raise ValueError(
            f"Aligned and unaligned weights differ in shape: {tuple(aligned.shape)} vs {tuple(unaligned.shape)}."
        )
    vector = aligned.float() - unaligned.float()
    norm = torch.linalg.norm(vector)
    if norm == 0:
        raise ValueError("The aligned and unaligned weights are equal: no alignment direction to project onto.")
    return vector @ vector.T / norm


def _projection(name: str, layer: nn.Module, unaligned: _Weights, aligned: _Weights | None) -> torch.Tensor:
    """`C` of one LoRA layer, oriented as its update `B A` (out x in)."""
    base = layer.get_base_layer().weight
    if aligned is None and not base.is_floating_point():
        raise ValueError(
            f"{name}: the base weight is quantized ({base.dtype}); pass the aligned model's folder as `aligned`."
        )
    aligned_weight = aligned[f"{name}.weight"] if aligned is not None else base.detach()
    unaligned_weight = unaligned[f"{name}.weight"]
    if getattr(layer, "fan_in_fan_out", False):  # GPT-2's Conv1D stores (in, out)
        aligned_weight, unaligned_weight = aligned_weight.T, unaligned_weight.T
    return alignment_projection(aligned_weight.to(base.device), unaligned_weight.to(base.device))


def _similarity(projection: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor) -> float:
    update = lora_b.float() @ lora_a.float()
    projected = projection @ update
    return torch.nn.functional.cosine_similarity(projected.reshape(1, -1), update.reshape(1, -1)).item()


@torch.no_grad()
def safe_lora(
    model: PeftModel,
    unaligned: WeightSource,
    aligned: WeightSource | None = None,
    threshold: float = 0.5,
    num_projected_layers: int | None = None,
    adapter: str | None = None,
) -> SafeLoRAReport:
    """Apply SafeLoRA to `model`'s adapter in place and return what was projected.

    Args:
        model: A `PeftModel` with the LoRA fine-tune of the aligned model.
        unaligned: The unaligned (pre-alignment) base model: a safetensors folder, a module or a state dict.
        aligned: The aligned model, likewise; default: `model`'s own base weights (the LoRA was trained on it).
        threshold: Project the layers whose cosine similarity between `C dW` and `dW` is below it (paper: 0.5).
        num_projected_layers: Instead of the threshold, project this many layers of lowest similarity.
        adapter: The adapter to project (default: the active one).

    Memory: one `out x out` projection at a time (read tensor by tensor from folders); nothing else is copied.
    """
    if not isinstance(model, PeftModel):
        raise TypeError(f"safe_lora needs a PeftModel with a LoRA adapter, got {type(model).__name__}.")
    if num_projected_layers is not None and num_projected_layers < 0:
        raise ValueError(f"num_projected_layers must be >= 0, got {num_projected_layers}.")
    adapter = adapter or model.active_adapter
    layers = _lora_layers(model, adapter)
    unaligned_weights = _Weights(unaligned)
    aligned_weights = _Weights(aligned) if aligned is not None else None
    report = SafeLoRAReport()
    for name, layer in layers.items():
        projection = _projection(name, layer, unaligned_weights, aligned_weights)
        report.similarities[name] = _similarity(projection, layer.lora_A[adapter].weight, layer.lora_B[adapter].weight)
    if num_projected_layers is not None:
        chosen = sorted(report.similarities, key=report.similarities.get)[:num_projected_layers]
    else:
        report.threshold = threshold
        chosen = [name for name, similarity in report.similarities.items() if similarity < threshold]
    for name in chosen:
        layer = layers[name]
        lora_b = layer.lora_B[adapter].weight
        projection = _projection(name, layer, unaligned_weights, aligned_weights)
        lora_b.copy_((projection @ lora_b.float()).to(lora_b.dtype))
        report.projected.append(name)
    return report
