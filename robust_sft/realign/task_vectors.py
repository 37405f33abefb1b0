"""Task vectors: the difference between a fine-tuned and a safe model (full weights or LoRA adapters)."""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Iterable
from pathlib import Path

import torch
from torch import nn

logger = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------------ task vectors
def _safetensors_files(folder: str | os.PathLike, single: str, index: str) -> dict[str, str]:
    """tensor name -> file, for a folder with one safetensors file or a sharded one with an index."""
    folder = Path(folder)
    if (folder / index).is_file():
        weight_map = json.loads((folder / index).read_text())["weight_map"]
        return {name: str(folder / file) for name, file in weight_map.items()}
    if (folder / single).is_file():
        from safetensors import safe_open

        with safe_open(str(folder / single), "pt") as handle:
            return dict.fromkeys(handle.keys(), str(folder / single))
    raise FileNotFoundError(f"{folder} has neither {single} nor {index}: not a safetensors model/adapter folder.")


def _read_tensor(path: str, name: str) -> torch.Tensor:
    from safetensors import safe_open

    with safe_open(path, "pt") as handle:
        return handle.get_tensor(name)


def task_vector_from_models(
    safe: str | os.PathLike,
    finetuned: str | os.PathLike,
    include: str | None = r"\.(layers|h|blocks)\.\d+\.",
    dtype: torch.dtype = torch.float32,
) -> dict[str, torch.Tensor]:
    """`W_ft - W_safe` for every matrix that differs, read tensor by tensor from two safetensors model folders.

    Only one tensor of each model is in memory at a time, so the cost is the task vector itself (no full copies of
    the two models). `include` is a regular expression on tensor names (default: the transformer blocks; `None` for
    every tensor); 1-D tensors (norms, biases) are skipped.
    """
    safe_files = _safetensors_files(safe, "model.safetensors", "model.safetensors.index.json")
    ft_files = _safetensors_files(finetuned, "model.safetensors", "model.safetensors.index.json")
    vector = {}
    for name, path in ft_files.items():
        if include is not None and not re.search(include, name):
            continue
        if name not in safe_files:
            raise ValueError(f"{finetuned} has tensor {name} that {safe} lacks: are they the same architecture?")
        tuned = _read_tensor(path, name).to(dtype)
        if tuned.dim() < 2:
            continue
        difference = tuned - _read_tensor(safe_files[name], name).to(dtype)
        if torch.count_nonzero(difference):
            vector[name] = difference
    if not vector:
        raise ValueError(f"{finetuned} and {safe} do not differ in any tensor matching {include!r}.")
    return vector


def task_vector_from_adapters(
    finetuned_adapter: str | os.PathLike, safe_adapter: str | os.PathLike | None = None
) -> dict[str, torch.Tensor]:
    """The element-wise difference of the `lora_A` / `lora_B` tensors of two LoRA adapters (the paper's LoRA mode).

    Without `safe_adapter` the safe model is the base itself (its adapter is zero), so the vector is the fine-tuned
    adapter's tensors. Names are those of the adapter file (`...q_proj.lora_A.weight`).
    """
    ft_files = _safetensors_files(
        finetuned_adapter, "adapter_model.safetensors", "adapter_model.safetensors.index.json"
    )
    safe_files = (
        _safetensors_files(safe_adapter, "adapter_model.safetensors", "adapter_model.safetensors.index.json")
        if safe_adapter is not None
        else {}
    )
    vector = {}
    for name, path in ft_files.items():
        if ".lora_A." not in name and ".lora_B." not in name:
            continue
        tuned = _read_tensor(path, name).float()
        if safe_adapter is not None and name not in safe_files:
            raise ValueError(f"{safe_adapter} has no tensor {name}: the two adapters must share their LoRA targets.")
        vector[name] = tuned - (_read_tensor(safe_files[name], name).float() if safe_files else 0.0)
    if not vector:
        raise ValueError(f"{finetuned_adapter} holds no lora_A / lora_B tensors.")
    return vector


def _parameter_names(model: nn.Module, names: Iterable[str]) -> dict[str, str]:
    """Map task-vector names to the model's parameter names (adapter files omit the adapter name `default`)."""
    parameters = {name for name, _ in model.named_parameters()}
    mapping = {}
    for name in names:
        candidates = [name, re.sub(r"\.(lora_[AB])\.weight$", r".\1.default.weight", name)]
        candidates += [f"base_model.model.{candidate}" for candidate in candidates]
        found = next((candidate for candidate in candidates if candidate in parameters), None)
        if found is None:
            raise KeyError(f"The task vector's tensor {name} matches no parameter of the model.")
        mapping[name] = found
    return mapping


def apply_task_vector(model: nn.Module, vector: dict[str, torch.Tensor], scale: float = 1.0) -> nn.Module:
    """Add `scale * vector` to the model's weights in place (scale 1 on the safe model gives the fine-tuned one)."""
    names = _parameter_names(model, vector)
    with torch.no_grad():
        for name, delta in vector.items():
            parameter = model.get_parameter(names[name])
            parameter.add_((scale * delta).to(parameter.device, parameter.dtype))
    return model


def zero_adapter(peft_model: nn.Module) -> nn.Module:
    """Set every LoRA weight of a PEFT model to zero, in place.

    A LoRA task vector measured from the base (`task_vector_from_adapters(adapter)` without a safe adapter) starts
    from a zero adapter: the realignment then masks the fine-tune's own A and B matrices on top of the safe base.
    """
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if "lora_" in name:
                parameter.zero_()
    return peft_model
