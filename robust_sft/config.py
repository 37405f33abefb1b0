"""Configuration of [`RobustSFTTrainer`], the base of every robust_sft SFT config."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from trl import SFTConfig


def _bf16_available() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_bf16_supported()


def _accelerator_available() -> bool:
    xpu = getattr(torch, "xpu", None)
    return torch.cuda.is_available() or torch.backends.mps.is_available() or bool(xpu and xpu.is_available())


def apply_device_defaults(config: Any) -> None:
    """bf16 only where the hardware has it (unless set), and `use_cpu` without an accelerator (DDP over gloo)."""
    if config.bf16 is None and not config.fp16:
        config.bf16 = _bf16_available()
    if not _accelerator_available():
        config.use_cpu = True


@dataclass
class RobustSFTConfig(SFTConfig):
    r"""
    Configuration for [`RobustSFTTrainer`] and the base of every robust_sft config.

    Differences from [`~trl.SFTConfig`]:

    - `bf16` defaults to `True` only where the hardware supports it (so the config works on CPU as is).
    - `use_cpu` is set when the machine has no accelerator, so that several CPU processes (`torchrun` or
      `accelerate launch --multi_gpu --num_processes 2` on a CPU-only machine) train with DDP over gloo.
    - Data preparation is TRL's, so the trained tokens are those of `SFTTrainer` with the same config (`text` rows
      get EOS, `messages` rows train the whole sequence unless `assistant_only_loss=True`, prompt/completion rows
      train the completion). On top: Alpaca rows, and `assistant_only_loss=True` also works for chat templates
      without `{% generation %}` markers (assistant turns located from character offsets).
    - `quantization` loads the model quantized when the trainer loads it; an already-loaded model in another
      precision is refused.

    Parameters:
        quantization (`str` or `None`, *optional*, defaults to `None`):
            When the trainer loads the model itself (`model` is a hub id, a folder or `None`): `"4bit"` for QLoRA
            (NF4, double quantization) or `"8bit"`; needs bitsandbytes. With an already-loaded model it must match
            how that model was loaded (else a `ValueError`).
    """

    quantization: str | None = field(
        default=None,
        metadata={
            "help": "When the trainer loads the model itself: '4bit' (QLoRA, NF4 + double quantization) or '8bit'; "
            "needs bitsandbytes. An already-loaded model must have been loaded that way.",
            "choices": [None, "4bit", "8bit"],
        },
    )

    def __post_init__(self):
        apply_device_defaults(self)
        if self.quantization not in (None, "4bit", "8bit"):
            raise ValueError(f"quantization must be None, '4bit' or '8bit', got {self.quantization!r}.")
        super().__post_init__()
