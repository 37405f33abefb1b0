"""TAIA in memory: run a trained model with only the kept updates, without merging or copying it."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import torch
from torch import nn

from ..trl_internals import unwrap_peft
from .lora import is_peft_model, tuner_layers
from .modules import Keep, ModuleSplit, _check_keep, dropped_groups, split_modules


@contextmanager
def taia_view(
    model: nn.Module,
    keep: Keep = "attention",
    split: ModuleSplit | None = None,
    pretrained: Mapping[str, torch.Tensor] | None = None,
) -> Iterator[nn.Module]:
    """Within the block, `model` computes what the `keep` export would: for evaluation without merging.

    - A PEFT (LoRA) model: the LoRA layers of the dropped parameters are switched off (experts and routers adapted
      through `target_parameters` included) and switched back on after.
    - A fully fine-tuned model: the dropped parameters point at the `pretrained` tensors (moved to their device)
      and back at the tuned ones after; the tuned tensors are not copied. A read-only view: do not train in it.

    `with taia_view(model): evaluate(model)`.
    """
    _check_keep(keep)
    split = split or split_modules(model)
    if is_peft_model(model):
        with _lora_view(model, keep, split):
            yield model
        return
    if pretrained is None:
        raise ValueError("A view of a full fine-tune needs the pre-trained tensors of the dropped parameters.")
    with _swapped_view(model, keep, split, pretrained):
        yield model


@contextmanager
def _lora_view(peft_model: nn.Module, keep: Keep, split: ModuleSplit) -> Iterator[None]:
    dropped = dropped_groups(keep)
    switched = [
        layer
        for name, layer in tuner_layers(peft_model)
        if split.classify(name) in dropped and not layer.disable_adapters
    ]
    trainable = {id(p): p.requires_grad for layer in switched for p in layer.parameters()}
    for layer in switched:
        layer.enable_adapters(False)
    try:
        yield
    finally:
        for layer in switched:
            layer.enable_adapters(True)
            for parameter in layer.parameters():
                parameter.requires_grad_(trainable[id(parameter)])


@contextmanager
def _swapped_view(
    model: nn.Module, keep: Keep, split: ModuleSplit, pretrained: Mapping[str, torch.Tensor]
) -> Iterator[None]:
    base = unwrap_peft(model)
    names = split.dropped(keep)
    missing = [name for name in names if name not in pretrained]
    if missing:
        raise KeyError(f"No pre-trained tensor for {len(missing)} dropped parameters (e.g. {missing[0]}).")
    tuned = {}
    try:
        for name in names:
            parameter = base.get_parameter(name)
            tuned[name] = parameter.data
            parameter.data = pretrained[name].to(device=parameter.device, dtype=parameter.dtype)
        yield
    finally:
        for name, data in tuned.items():
            base.get_parameter(name).data = data
