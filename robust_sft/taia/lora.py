"""The LoRA side of TAIA: which LoRA layer adapts which parameter, and each kept update merged by PEFT itself.

A merge never touches the live model: each layer is merged by PEFT's own `merge()` into a *copy* of its base tensor
(the original is swapped back at once), so the result is bit for bit what `merge_and_unload()` writes, and the
extra memory is one tensor at a time.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn

from ..trl_internals import unwrap_peft
from .modules import canonical_name


def is_peft_model(model: nn.Module) -> bool:
    """True for a model carrying PEFT adapters (a `PeftModel`)."""
    return hasattr(model, "peft_config") and hasattr(model, "get_base_model")


def tuner_layers(peft_model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """(name of the adapted parameter in the plain model, LoRA layer) for every LoRA layer of a PEFT model.

    A `lora.Linear` adapts `<module>.weight`; a `lora.ParamWrapper` (PEFT's `target_parameters`, used for fused MoE
    experts and routers) adapts `<module>.<parameter_name>`; nested wrappers each adapt their own parameter.
    """
    from peft.tuners.lora import LoraLayer
    from peft.tuners.tuners_utils import BaseTunerLayer

    for module_name, module in unwrap_peft(peft_model).named_modules():
        if not isinstance(module, BaseTunerLayer):
            continue
        name = canonical_name(module_name)
        if name is None:
            continue
        if not isinstance(module, LoraLayer):
            raise ValueError(
                f"{module_name} is a {type(module).__name__}: TAIA exports LoRA adapters only (PEFT's LoraConfig)."
            )
        yield f"{name}.{getattr(module, 'parameter_name', 'weight')}", module


def adapted_parameters(peft_model: nn.Module) -> dict[str, nn.Module]:
    """Plain-model parameter name -> the LoRA layer adapting it (biases too, for layers trained with `lora_bias`)."""
    adapted = {}
    for name, layer in tuner_layers(peft_model):
        adapted[name] = layer
        if any(layer.lora_bias.get(adapter, False) for adapter in layer.active_adapters):
            adapted[name.rsplit(".", 1)[0] + ".bias"] = layer
    return adapted


def saved_module_copies(peft_model: nn.Module) -> dict[str, torch.Tensor]:
    """Plain-model tensor name -> the trained tensor of a `modules_to_save` copy (what `merge_and_unload` puts in
    place of the original module)."""
    from peft.utils.other import AuxiliaryTrainingWrapper, ModulesToSaveWrapper

    copies = {}
    for module_name, module in unwrap_peft(peft_model).named_modules():
        if not isinstance(module, AuxiliaryTrainingWrapper):
            continue
        if not isinstance(module, ModulesToSaveWrapper):
            raise ValueError(
                f"{module_name} is a {type(module).__name__}; TAIA exports LoRA layers and modules_to_save only."
            )
        if module.disable_adapters or not module.active_adapters:
            continue
        trained = module.modules_to_save[module.active_adapters[0]]
        name = canonical_name(module_name)
        for tensor_name, tensor in trained.state_dict().items():
            copies[f"{name}.{tensor_name}"] = tensor
    return copies


def merged_tensors(layer: nn.Module) -> dict[str, torch.Tensor]:
    """PEFT's own merge of `layer`'s active adapters, done on copies of its base tensors: {attribute: merged tensor}.

    The live model is left as it was (same tensors, nothing marked merged).
    """
    if layer.merged:
        raise ValueError(
            "The LoRA layers are already merged into the base weights; the updates cannot be told apart any more. "
            "Call `model.unmerge_adapter()` first."
        )
    base = layer.get_base_layer()
    attributes = [getattr(layer, "parameter_name", "weight")]
    if any(layer.lora_bias.get(adapter, False) for adapter in layer.active_adapters):
        attributes.append("bias")
    originals = {attribute: getattr(base, attribute).data for attribute in attributes}
    caches = set(getattr(layer, "_caches", {}))
    for attribute, original in originals.items():
        getattr(base, attribute).data = original.clone()
    try:
        layer.merge(safe_merge=False)
        return {attribute: getattr(base, attribute).data for attribute in attributes}
    finally:
        for attribute, original in originals.items():
            getattr(base, attribute).data = original
        layer.merged_adapters.clear()
        for key in set(getattr(layer, "_caches", {})) - caches:  # DoRA stores the weight norm of the merge
            layer._caches.pop(key)
