"""Concrete (relaxed Bernoulli) masks over a task vector, attached with `torch.nn.utils.parametrize`.

A masked weight reads `W_safe + s * tau` with `s = m / mean(m)` for a mask per element or per row, and `s = m` for a
single value per tensor (whose mean normalisation would always give 1), computed from the frozen safe weight and the
fine-tuned one `W_ft` (kept by the mask): in training as `lerp(W_safe, W_ft, s)`, at export as the formula in float32
with `W_ft` itself where `s = 1`, so that a mask of ones gives the fine-tune and a mask of zeros the safe model bit for
bit (`W_safe + (W_ft - W_safe)` is not always `W_ft` in floating point).

The mask is sampled once per forward of the model: a forward pre-hook draws one seed per forward and every read of a
masked weight in that forward (PEFT reads LoRA weights twice, gradient checkpointing re-runs layers in the backward)
regenerates the same noise from it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

from .task_vectors import _parameter_names, read_tensor

GRANULARITIES = ("element", "row", "tensor")


EXPORT_MODES = ("threshold", "expected")


MASK_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


MASKS_FILE = "realign_masks.safetensors"


_FORMAT = "robust_sft.realign.masks"


# ------------------------------------------------------------------------------------------------ the mask
def scaled_mask(mask: torch.Tensor) -> torch.Tensor:
    """`m / mean(m)` per tensor, and 0 when the mask is all zeros (the realigned weight is then the safe one)."""
    mean = mask.mean()
    return torch.where(mean > 0, mask / mean.clamp(min=torch.finfo(mask.dtype).tiny), torch.zeros_like(mask))


def mask_scale(mask: torch.Tensor) -> torch.Tensor:
    """The factor `s` on the task vector: `m / mean(m)` for a mask per element or per row, `m` itself for a
    single-value mask (per tensor), whose mean normalisation would cancel it."""
    return mask if mask.numel() == 1 else scaled_mask(mask)


def apply_mask(delta: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """`s * delta` with `s` from [`mask_scale`], for a mask broadcastable to `delta` (logits-shaped)."""
    return _broadcastable(mask_scale(mask), delta.dim()) * delta


def _broadcastable(scale: torch.Tensor, dim: int) -> torch.Tensor:
    return scale.reshape((1,) * dim) if scale.numel() == 1 else scale


def mask_shape(shape: torch.Size | tuple[int, ...], granularity: str) -> tuple[int, ...]:
    """Shape of the logits of a mask over a tensor of `shape`."""
    if granularity not in GRANULARITIES:
        raise ValueError(f"mask granularity must be one of {GRANULARITIES}, got {granularity!r}.")
    shape = tuple(shape)
    if granularity == "element":
        return shape
    if granularity == "row" and shape:
        return (shape[0],) + (1,) * (len(shape) - 1)
    return (1,) * len(shape)


def deterministic_mask(logits: torch.Tensor, export_mode: str = "threshold") -> torch.Tensor:
    """The export mask of `logits`: `threshold` keeps `sigmoid(logit) > 0.5`, `expected` is `sigmoid(logit)`."""
    if export_mode not in EXPORT_MODES:
        raise ValueError(f"export_mode must be one of {EXPORT_MODES}, got {export_mode!r}.")
    if export_mode == "threshold":
        return (logits > 0).to(logits.dtype)
    return torch.sigmoid(logits)


class ConcreteMask(nn.Module):
    """A parametrization `W_safe -> W_safe + s * (W_ft - W_safe)` with a Concrete (relaxed Bernoulli) mask `m` and
    `s` its [`mask_scale`] (computed as `lerp(W_safe, W_ft, s)` in training; in eval as the formula in float32, with
    `W_ft` itself where `s = 1`).

    In training mode `m = sigmoid((logits + log u - log(1 - u)) / temperature)` with `u ~ U(0, 1)` drawn from
    `seed` (set once per forward by [`attach_masks`]' hook; global RNG when unset); in eval mode the deterministic
    export mask: `threshold` (`sigmoid(logit) > 0.5`) or `expected` (`sigmoid(logit)`), applied in float32. With
    `force_ones` the weight is `W_ft` itself (DPO's reference, the unmasked fine-tune).

    Args:
        finetuned: `W_ft`, kept as a buffer (attach_masks stores it in the weight's dtype and device).
        granularity: One logit per `element`, per `row`, or per `tensor` (applied without mean normalisation).
        temperature: Concrete temperature.
        init_logit: Initial logit (0: keep with p = 0.5).
        export_mode: `threshold` or `expected`.
        dtype: dtype of the logits (their gradient and optimiser states follow it).
    """

    def __init__(
        self,
        finetuned: torch.Tensor,
        granularity: str = "element",
        temperature: float = 0.5,
        init_logit: float = 0.0,
        export_mode: str = "threshold",
        dtype: torch.dtype = torch.float32,
    ):
        super().__init__()
        if export_mode not in EXPORT_MODES:
            raise ValueError(f"export_mode must be one of {EXPORT_MODES}, got {export_mode!r}.")
        if temperature <= 0:
            raise ValueError(f"mask temperature must be > 0, got {temperature}.")
        self.register_buffer("finetuned", finetuned.detach(), persistent=False)
        shape = mask_shape(finetuned.shape, granularity)
        self.logits = nn.Parameter(torch.full(shape, float(init_logit), dtype=dtype, device=finetuned.device))
        self.granularity, self.temperature, self.export_mode = granularity, temperature, export_mode
        self.seed: int | None = None
        self.force_ones = False

    def _logistic_noise(self) -> torch.Tensor:
        device = self.logits.device
        if self.seed is None:
            uniform = torch.rand(self.logits.shape, device=device)
        else:
            generator = torch.Generator(device=device).manual_seed(self.seed)
            uniform = torch.rand(self.logits.shape, generator=generator, device=device)
        uniform = uniform.clamp(1e-6, 1 - 1e-6)
        return (torch.log(uniform) - torch.log1p(-uniform)).to(self.logits.dtype)

    def mask(self) -> torch.Tensor:
        """The mask in the logits' shape (broadcast over the weight): sampled in training, else the export's."""
        if self.training:
            return torch.sigmoid((self.logits + self._logistic_noise()) / self.temperature)
        return deterministic_mask(self.logits, self.export_mode)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        if self.force_ones:
            return self.finetuned
        scale = _broadcastable(mask_scale(self.mask()), weight.dim())
        if self.training:  # lerp in the model's dtype: autograd keeps no float32 copy nor W_ft - W_safe
            return torch.lerp(weight, self.finetuned, scale.to(weight.dtype))
        # The export: the formula itself in float32, and W_ft bit for bit where s = 1.
        safe, tuned, scale = weight.float(), self.finetuned.float(), scale.float()
        return torch.where(scale == 1, tuned, safe + scale * (tuned - safe)).to(weight.dtype)

    def kept_fraction(self) -> float:
        """Share of the task vector the export keeps (threshold) or its expected share (expected)."""
        return deterministic_mask(self.logits.detach(), self.export_mode).float().mean().item()


# ------------------------------------------------------------------------------------------------ masks on a model
class MaskSet(dict):
    """The masks attached to a model, by task-vector name (a dict of [`ConcreteMask`]).

    `carried` lists the task-vector tensors added to the weights unmasked; `handle` is the forward pre-hook that
    draws one mask sample per forward.
    """

    carried: list[str]
    handle: Any


def _draw_seeds(masks: MaskSet, module: nn.Module, args: Any) -> None:
    """Forward pre-hook: one seed per forward for every mask (not for the forced-ones reference, not in eval)."""
    first = next(iter(masks.values()), None)
    if first is None or first.force_ones or not first.training:
        return
    base = int(torch.randint(0, 2**62, (1,)).item())  # global RNG: follows the trainer's seed and checkpointed state
    for index, mask in enumerate(masks.values()):
        mask.seed = base + index


def _locations(model: nn.Module) -> dict[int, list[tuple[str, str]]]:
    """`id(parameter)` -> every `(module name, attribute)` that holds it (tied weights appear several times)."""
    locations: dict[int, list[tuple[str, str]]] = {}
    for module_name, module in model.named_modules(remove_duplicate=False):
        for attribute, parameter in module.named_parameters(recurse=False):
            locations.setdefault(id(parameter), []).append((module_name, attribute))
    return locations


def attach_masks(
    model: nn.Module,
    task_vector: Mapping[str, torch.Tensor],
    granularity: str = "element",
    temperature: float = 0.5,
    init_logit: float = 0.0,
    export_mode: str = "threshold",
    dtype: torch.dtype = torch.float32,
    unmasked: str | None = None,
) -> MaskSet:
    """Freeze every parameter of `model` and put a trainable [`ConcreteMask`] on each task-vector tensor.

    The model's weights must be the safe ones (`W_safe`). Each mask keeps `W_ft` in its weight's dtype and device:
    read from the fine-tuned checkpoint when the vector comes from [`task_vector_from_models`] /
    [`task_vector_from_adapters`] and still matches it (exact), else `W_safe + tau`. Tensors whose name matches the
    regular expression `unmasked` are set to `W_ft` whole (carried over unmasked) instead. Tied weights (an LM head
    sharing the embedding) share one mask. Returns the masks by the task vector's names.
    """
    import re

    if not task_vector:
        raise ValueError("The task vector is empty: nothing to mask.")
    names = _parameter_names(model, task_vector)
    locations = _locations(model)
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    masks = MaskSet()
    masks.carried = []
    for name, delta in task_vector.items():
        parameter = model.get_parameter(names[name])
        if tuple(delta.shape) != tuple(parameter.shape):
            raise ValueError(
                f"{name}: task vector shape {tuple(delta.shape)} != weight shape {tuple(parameter.shape)}."
            )
        finetuned = finetuned_weight(task_vector, name, parameter)
        if unmasked is not None and re.search(unmasked, name):
            with torch.no_grad():
                parameter.copy_(finetuned)
            masks.carried.append(name)
            continue
        mask = ConcreteMask(finetuned, granularity, temperature, init_logit, export_mode, dtype)
        for module_name, attribute in locations[id(parameter)]:
            parametrize.register_parametrization(model.get_submodule(module_name), attribute, mask, unsafe=True)
        masks[name] = mask
    masks.handle = model.register_forward_pre_hook(partial(_draw_seeds, masks))
    return masks


def finetuned_weight(task_vector: Mapping[str, torch.Tensor], name: str, weight: torch.Tensor) -> torch.Tensor:
    """`W_ft` for one tensor, in `weight`'s dtype and device: the fine-tuned checkpoint's own tensor when the vector
    records where it came from and `W_ft - W_safe` still equals it (bit for bit), else `W_safe + tau`."""
    delta = task_vector[name]
    source = (getattr(task_vector, "sources", None) or {}).get(name)
    with torch.no_grad():
        if source is not None:
            tuned = read_tensor(source, name)
            if tuned.dtype == weight.dtype and torch.equal(
                (tuned - weight.detach().to(tuned.device)).to(delta.dtype), delta.to(tuned.device)
            ):
                return tuned.to(weight.device)
        return weight.detach() + delta.to(weight.device, weight.dtype)


def _parametrized(model: nn.Module) -> dict[int, list[tuple[nn.Module, str]]]:
    """`id(mask)` -> every `(module, attribute)` the mask parametrizes."""
    found: dict[int, list[tuple[nn.Module, str]]] = {}
    for module in model.modules():
        if parametrize.is_parametrized(module):
            for attribute, chain in module.parametrizations.items():
                for parametrization in chain:
                    if isinstance(parametrization, ConcreteMask):
                        found.setdefault(id(parametrization), []).append((module, attribute))
    return found


@contextmanager
def masks_forced_to_one(masks: Mapping[str, ConcreteMask]) -> Iterator[None]:
    """Within the block every masked weight reads `W_ft`: the unmasked fine-tune (DPO's reference)."""
    previous = {name: mask.force_ones for name, mask in masks.items()}
    for mask in masks.values():
        mask.force_ones = True
    try:
        yield
    finally:
        for name, mask in masks.items():
            mask.force_ones = previous[name]


@contextmanager
def export_masks(masks: Mapping[str, ConcreteMask], export_mode: str | None = None) -> Iterator[None]:
    """Within the block every mask is the deterministic export mask (eval mode, `export_mode` if given)."""
    previous = {name: (mask.training, mask.export_mode, mask.force_ones) for name, mask in masks.items()}
    for mask in masks.values():
        mask.train(False)
        mask.force_ones = False
        if export_mode is not None:
            mask.export_mode = export_mode
    try:
        yield
    finally:
        for name, mask in masks.items():
            mask.train(previous[name][0])
            mask.export_mode, mask.force_ones = previous[name][1:]


def mask_report(masks: Mapping[str, ConcreteMask]) -> dict[str, Any]:
    """Kept fraction per masked tensor and overall (weighted by the task-vector tensors' sizes)."""
    per_tensor = {name: mask.kept_fraction() for name, mask in masks.items()}
    sizes = {name: mask.finetuned.numel() for name, mask in masks.items()}
    total = sum(per_tensor[name] * sizes[name] for name in masks) / max(sum(sizes.values()), 1)
    report = {"kept_fraction": total, "per_tensor": per_tensor}
    if getattr(masks, "carried", None):
        report["carried_unmasked"] = list(masks.carried)
    return report


def exported_state_dict(
    model: nn.Module, masks: Mapping[str, ConcreteMask], export_mode: str | None = None
) -> dict[str, torch.Tensor]:
    """The model's state dict with every masked weight replaced by its realigned value under the export mask, under
    the plain name (`...weight`, no `parametrizations.*` keys); the model is left unchanged. Tied weights share one
    tensor."""
    module_names: dict[int, list[str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        module_names.setdefault(id(module), []).append(name)
    places = _parametrized(model)
    ours = tuple(
        f"{name}.parametrizations.{attribute}.".lstrip(".")
        for group in places.values()
        for module, attribute in group
        for name in module_names[id(module)]
    )
    state = {name: value for name, value in model.state_dict().items() if not name.startswith(ours)}
    with torch.no_grad(), export_masks(masks, export_mode):
        for group in places.values():
            value = getattr(*group[0]).detach()
            for module, attribute in group:
                for name in module_names[id(module)]:
                    state[f"{name}.{attribute}".lstrip(".")] = value
    return state


def remove_masks(model: nn.Module, masks: Mapping[str, ConcreteMask], export_mode: str | None = None) -> nn.Module:
    """Bake the deterministic masks into the weights (`W_safe + s * tau`) and drop the parametrizations.

    Tied weights stay tied: the shared parameter is realigned once.
    """
    for mask in masks.values():
        mask.eval()
        mask.force_ones = False
        if export_mode is not None:
            mask.export_mode = export_mode
    handle = getattr(masks, "handle", None)
    if handle is not None:
        handle.remove()
    with torch.no_grad():
        for places in _parametrized(model).values():
            for module, attribute in places[1:]:  # the tied copies go back to the shared original first
                parametrize.remove_parametrizations(module, attribute, leave_parametrized=False)
            module, attribute = places[0]
            parametrize.remove_parametrizations(module, attribute, leave_parametrized=True)
    return model


# ------------------------------------------------------------------------------------------------ masks as files
def _atomic_save(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp")
    save_file({name: tensor.detach().contiguous().cpu() for name, tensor in tensors.items()}, temporary, metadata)
    os.replace(temporary, path)


def save_masks(masks: Mapping[str, ConcreteMask], path: str | os.PathLike) -> Path:
    """Write the mask logits (by task-vector name) and their settings to a safetensors file, atomically.

    `path` is a file, or a folder (then `realign_masks.safetensors` inside it). Load them with [`load_masks`].
    """
    path = Path(path)
    if path.suffix != ".safetensors":
        path = path / MASKS_FILE
    first = next(iter(masks.values()), None)
    if first is None:
        raise ValueError("No masks to save.")
    settings = {
        "granularity": first.granularity,
        "temperature": first.temperature,
        "export_mode": first.export_mode,
        "carried_unmasked": list(getattr(masks, "carried", [])),
    }
    _atomic_save({name: mask.logits for name, mask in masks.items()}, path, {"format": _FORMAT, **_json(settings)})
    return path


def _json(settings: dict[str, Any]) -> dict[str, str]:
    return {"settings": json.dumps(settings)}


def read_masks_file(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(logits by task-vector name, settings) of a file written by [`save_masks`]."""
    from safetensors import safe_open

    path = Path(path)
    if path.is_dir():
        path = path / MASKS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"No masks file at {path}: write one with save_masks() or SafetyRealignTrainer.")
    with safe_open(str(path), "pt") as handle:
        metadata = handle.metadata() or {}
        if metadata.get("format") != _FORMAT:
            raise ValueError(
                f"{path} is not a masks file written by save_masks() (format {metadata.get('format')!r})."
            )
        logits = {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118 (safe_open has no iter)
    return logits, json.loads(metadata["settings"])


def load_masks(path: str | os.PathLike, into: Mapping[str, ConcreteMask] | None = None) -> dict[str, torch.Tensor]:
    """The mask logits saved by [`save_masks`], by task-vector name; with `into` (e.g. `trainer.masks`), they are
    also copied into those masks, to continue training or export them."""
    logits, _ = read_masks_file(path)
    if into is not None:
        missing, unknown = set(into) - set(logits), set(logits) - set(into)
        if missing or unknown:
            raise ValueError(
                f"The masks file {path} does not match these masks: missing {sorted(missing)[:3]}, "
                f"unknown {sorted(unknown)[:3]}; was it saved for the same task vector?"
            )
        with torch.no_grad():
            for name, mask in into.items():
                if logits[name].shape != mask.logits.shape:
                    raise ValueError(
                        f"{name}: saved logits of shape {tuple(logits[name].shape)} != {tuple(mask.logits.shape)} "
                        "(another mask granularity?)."
                    )
                mask.logits.copy_(logits[name])
    return logits


def mask_values(
    masks: Mapping[str, ConcreteMask] | Mapping[str, torch.Tensor] | str | os.PathLike,
    export_mode: str | None = None,
) -> dict[str, torch.Tensor]:
    """Deterministic mask values (logits-shaped, broadcast over the task vector) from trained masks, a masks file, or
    a dict of mask values in [0, 1] (returned as is)."""
    if isinstance(masks, (str, os.PathLike)):
        logits, settings = read_masks_file(masks)
        return {
            name: deterministic_mask(value, export_mode or settings["export_mode"]) for name, value in logits.items()
        }
    values = {}
    for name, mask in masks.items():
        if isinstance(mask, ConcreteMask):
            values[name] = deterministic_mask(mask.logits.detach(), export_mode or mask.export_mode)
        elif isinstance(mask, torch.Tensor):
            values[name] = mask
        else:
            raise TypeError(
                f"Mask {name}: expected a ConcreteMask or a tensor of mask values, got {type(mask).__name__}."
            )
    return values
