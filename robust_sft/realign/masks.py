"""Concrete (relaxed Bernoulli) masks over a task vector, attached with `torch.nn.utils.parametrize`."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

from .task_vectors import _parameter_names

GRANULARITIES = ("element", "row", "tensor")


EXPORT_MODES = ("threshold", "expected")


# ------------------------------------------------------------------------------------------------ the mask
def scaled_mask(mask: torch.Tensor) -> torch.Tensor:
    """`m / mean(m)` per tensor, and 0 when the mask is all zeros (the realigned weight is then the safe one)."""
    mean = mask.mean()
    return torch.where(mean > 0, mask / mean.clamp(min=torch.finfo(mask.dtype).tiny), torch.zeros_like(mask))


class ConcreteMask(nn.Module):
    """A parametrization `weight -> weight + m * tau / mean(m)` with a Concrete (relaxed Bernoulli) mask `m`.

    In training mode `m = sigmoid((logits + log u - log(1 - u)) / temperature)` with `u ~ U(0, 1)`; in eval mode the
    deterministic export mask: `threshold` (`sigmoid(logit) > 0.5`) or `expected` (`sigmoid(logit)`).
    """

    def __init__(
        self,
        task_vector: torch.Tensor,
        granularity: str = "element",
        temperature: float = 0.5,
        init_logit: float = 0.0,
        export_mode: str = "threshold",
    ):
        super().__init__()
        if granularity not in GRANULARITIES:
            raise ValueError(f"mask granularity must be one of {GRANULARITIES}, got {granularity!r}.")
        if export_mode not in EXPORT_MODES:
            raise ValueError(f"export_mode must be one of {EXPORT_MODES}, got {export_mode!r}.")
        self.register_buffer("task_vector", task_vector.detach().float(), persistent=False)
        shape = {
            "element": tuple(task_vector.shape),
            "row": (task_vector.shape[0],) + (1,) * (task_vector.dim() - 1),
            "tensor": (1,) * task_vector.dim(),
        }[granularity]
        self.logits = nn.Parameter(torch.full(shape, float(init_logit)))
        self.temperature, self.export_mode = temperature, export_mode

    def mask(self) -> torch.Tensor:
        """The mask over the whole task vector (broadcast from the logits' shape)."""
        if self.training:
            noise = torch.rand_like(self.logits).clamp(1e-6, 1 - 1e-6)
            mask = torch.sigmoid((self.logits + torch.log(noise) - torch.log1p(-noise)) / self.temperature)
        elif self.export_mode == "threshold":
            mask = (self.logits > 0).float()  # sigmoid(logit) > 0.5
        else:
            mask = torch.sigmoid(self.logits)
        return mask.expand_as(self.task_vector)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        delta = scaled_mask(self.mask()) * self.task_vector
        return weight + delta.to(weight.dtype)

    def kept_fraction(self) -> float:
        """Share of the task vector the export keeps (threshold) or its expected share (expected)."""
        kept = (self.logits > 0).float() if self.export_mode == "threshold" else torch.sigmoid(self.logits)
        return kept.detach().expand_as(self.task_vector).mean().item()


def attach_masks(
    model: nn.Module, task_vector: dict[str, torch.Tensor], **mask_options: Any
) -> dict[str, ConcreteMask]:
    """Freeze every parameter of `model` and put a trainable [`ConcreteMask`] on each task-vector tensor.

    The model's weights must be the safe ones (`W_safe`); `mask_options` go to `ConcreteMask`. Returns the masks by
    the task vector's names.
    """
    names = _parameter_names(model, task_vector)
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    masks = {}
    for name, delta in task_vector.items():
        module_name, attribute = names[name].rsplit(".", 1)
        module = model.get_submodule(module_name)
        if tuple(delta.shape) != tuple(getattr(module, attribute).shape):
            raise ValueError(f"{name}: task vector shape {tuple(delta.shape)} != weight shape.")
        mask = ConcreteMask(delta.to(getattr(module, attribute).device), **mask_options)
        parametrize.register_parametrization(module, attribute, mask)
        masks[name] = mask
    return masks


def mask_report(masks: dict[str, ConcreteMask]) -> dict[str, Any]:
    """Kept fraction per masked tensor and overall (weighted by size)."""
    per_tensor = {name: mask.kept_fraction() for name, mask in masks.items()}
    sizes = {name: mask.task_vector.numel() for name, mask in masks.items()}
    total = sum(per_tensor[name] * sizes[name] for name in masks) / max(sum(sizes.values()), 1)
    return {"kept_fraction": total, "per_tensor": per_tensor}


def remove_masks(model: nn.Module, masks: dict[str, ConcreteMask], export_mode: str | None = None) -> nn.Module:
    """Bake the deterministic masks into the weights (`W_safe + m * tau / mean(m)`) and drop the parametrizations."""
    for mask in masks.values():
        mask.eval()
        if export_mode is not None:
            mask.export_mode = export_mode
    for module in list(model.modules()):
        if parametrize.is_parametrized(module):
            for attribute in list(module.parametrizations.keys()):
                with torch.no_grad():
                    parametrize.remove_parametrizations(module, attribute, leave_parametrized=True)
    return model
