"""Task vectors: the difference between a fine-tuned and a safe model (full weights or LoRA adapters)."""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

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


def read_tensor(path: str, name: str) -> torch.Tensor:
    """One tensor of a safetensors file."""
    from safetensors import safe_open

    with safe_open(path, "pt") as handle:
        return handle.get_tensor(name)


class TaskVector(dict):
    """`{tensor name: W_ft - W_safe}`, with where it came from.

    `sources` maps each tensor to the safetensors file of its fine-tuned value: the masks read `W_ft` from there, so
    that a mask of ones gives the fine-tune back bit for bit (`W_safe + (W_ft - W_safe)` is not always `W_ft` in
    floating point). `lora_config` holds the LoRA settings (r, alpha, targets, ...) of a vector read from adapters,
    so that vectors and models are checked for compatibility before they are combined.
    """

    sources: dict[str, str] | None = None
    lora_config: dict[str, Any] | None = None


def task_vector_from_models(
    safe: str | os.PathLike,
    finetuned: str | os.PathLike,
    include: str | None = None,
    dtype: torch.dtype | None = None,
) -> TaskVector:
    """`W_ft - W_safe` for every tensor that differs, read tensor by tensor from two safetensors model folders.

    Every changed tensor counts: matrices, biases, norms, embeddings and the LM head (choose which are masked and
    which are carried over unmasked with `SafetyRealignConfig.unmasked_parameters`). Only one tensor of each model is
    in memory at a time, so the cost is the task vector itself. `include` is a regular expression on tensor names
    (`None`: every tensor; e.g. `r"\\.layers\\.\\d+\\."` for the transformer blocks only). The difference is taken in
    `dtype` (default: the checkpoint's own); the vector records the fine-tuned files (`sources`).
    """
    safe_files = _safetensors_files(safe, "model.safetensors", "model.safetensors.index.json")
    ft_files = _safetensors_files(finetuned, "model.safetensors", "model.safetensors.index.json")
    vector = TaskVector()
    vector.sources = {}
    for name, path in ft_files.items():
        if include is not None and not re.search(include, name):
            continue
        if name not in safe_files:
            raise ValueError(f"{finetuned} has tensor {name} that {safe} lacks: are they the same architecture?")
        tuned, original = read_tensor(path, name), read_tensor(safe_files[name], name)
        if tuned.shape != original.shape:
            raise ValueError(
                f"{name}: shape {tuple(tuned.shape)} in {finetuned} but {tuple(original.shape)} in {safe}."
            )
        if not tuned.is_floating_point():
            continue
        target = dtype or tuned.dtype
        difference = tuned.to(target) - original.to(target)
        if torch.count_nonzero(difference):
            vector[name], vector.sources[name] = difference, path
    if not vector:
        raise ValueError(f"{finetuned} and {safe} do not differ in any tensor matching {include!r}.")
    return vector


LORA_COMPATIBILITY_FIELDS = (
    "r",
    "lora_alpha",
    "target_modules",
    "use_rslora",
    "use_dora",
    "rank_pattern",
    "alpha_pattern",
)


def _lora_settings(config: Any) -> dict[str, Any]:
    """The LoRA fields that must agree between combined adapters, from a LoraConfig, a dict or an adapter folder."""
    if isinstance(config, (str, os.PathLike)):
        path = Path(config) / "adapter_config.json"
        if not path.is_file():
            raise FileNotFoundError(f"{config} has no adapter_config.json: not a PEFT adapter folder.")
        config = json.loads(path.read_text())
    elif not isinstance(config, dict):
        config = config.to_dict() if hasattr(config, "to_dict") else vars(config)
    settings = {}
    for field in LORA_COMPATIBILITY_FIELDS:
        value = config.get(field)
        if isinstance(value, (list, set, tuple)):
            value = sorted(value)
        settings[field] = value if value not in ({}, None, False) else None
    return settings


def check_lora_compatibility(*configs: Any, names: Sequence[str] | None = None) -> dict[str, Any]:
    """Raise a ValueError naming every LoRA setting (r, alpha, targets, rsLoRA, DoRA, rank/alpha patterns) that
    differs between adapters that are combined; return the common settings. Each config is a `LoraConfig`, a dict,
    or an adapter folder."""
    settings = [_lora_settings(config) for config in configs]
    names = (
        list(names)
        if names is not None
        else [
            str(config) if isinstance(config, (str, os.PathLike)) else f"adapter {i}"
            for i, config in enumerate(configs)
        ]
    )
    for other, name in zip(settings[1:], names[1:]):
        differing = [field for field in LORA_COMPATIBILITY_FIELDS if other[field] != settings[0][field]]
        if differing:
            details = "; ".join(f"{field}: {settings[0][field]!r} vs {other[field]!r}" for field in differing)
            raise ValueError(
                f"LoRA adapters {names[0]} and {name} are not compatible ({details}): their task vectors do not "
                "line up element by element. Train them with the same LoraConfig (r, lora_alpha, target_modules)."
            )
    return settings[0] if settings else {}


def task_vector_from_adapters(
    finetuned_adapter: str | os.PathLike, safe_adapter: str | os.PathLike | None = None
) -> TaskVector:
    """The element-wise difference of the `lora_A` / `lora_B` tensors of two LoRA adapters (the paper's LoRA mode).

    Without `safe_adapter` the safe model is the base itself (its adapter is zero), so the vector is the fine-tuned
    adapter's tensors. Names are those of the adapter file (`...q_proj.lora_A.weight`). The two adapters' r, alpha
    and targets must match ([`check_lora_compatibility`]); the result records them in `lora_config`.
    """
    ft_files = _safetensors_files(
        finetuned_adapter, "adapter_model.safetensors", "adapter_model.safetensors.index.json"
    )
    settings = check_lora_compatibility(finetuned_adapter, *([safe_adapter] if safe_adapter is not None else []))
    safe_files = (
        _safetensors_files(safe_adapter, "adapter_model.safetensors", "adapter_model.safetensors.index.json")
        if safe_adapter is not None
        else {}
    )
    vector = TaskVector()
    vector.lora_config, vector.sources = settings, {}
    for name, path in ft_files.items():
        if ".lora_A." not in name and ".lora_B." not in name:
            continue
        tuned = read_tensor(path, name).float()
        if safe_adapter is not None and name not in safe_files:
            raise ValueError(f"{safe_adapter} has no tensor {name}: the two adapters must share their LoRA targets.")
        vector[name] = tuned - read_tensor(safe_files[name], name).float() if safe_files else tuned
        vector.sources[name] = path
    if not vector:
        raise ValueError(f"{finetuned_adapter} holds no lora_A / lora_B tensors.")
    return vector


def combine_task_vectors(
    vectors: Sequence[Mapping[str, torch.Tensor]], weights: Sequence[float] | None = None
) -> TaskVector:
    """`sum_i w_i tau_i` (default weights `1/K`: the mean, as the reference's multi-task mode).

    A shared mask over several task vectors, `sum_i w_i m * tau_i / mean(m)`, equals the mask over this combination,
    so the trainer stores one vector whatever the number of tasks. LoRA vectors must share their LoRA settings.
    """
    if not vectors:
        raise ValueError("No task vectors to combine.")
    weights = list(weights) if weights is not None else [1.0 / len(vectors)] * len(vectors)
    if len(weights) != len(vectors):
        raise ValueError(f"Got {len(weights)} weights for {len(vectors)} task vectors.")
    names = set(vectors[0])
    for index, vector in enumerate(vectors[1:], start=1):
        if set(vector) != names:
            difference = sorted(names.symmetric_difference(vector))[:3]
            raise ValueError(
                f"Task vector {index} does not cover the same tensors as task vector 0 (e.g. {difference}); combine "
                "vectors of the same model and targets."
            )
    configs = [getattr(vector, "lora_config", None) for vector in vectors]
    if any(config is not None for config in configs):
        if any(config is None for config in configs):
            raise ValueError("Cannot combine LoRA task vectors with full-weight ones.")
        check_lora_compatibility(*configs, names=[f"task vector {i}" for i in range(len(vectors))])
    combined = TaskVector()
    combined.lora_config = configs[0]
    for name in vectors[0]:
        total = weights[0] * vectors[0][name]
        for weight, vector in zip(weights[1:], vectors[1:]):
            total = total + weight * vector[name].to(total.device, total.dtype)
        combined[name] = total
    return combined


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
