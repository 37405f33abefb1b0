"""Configuration of [`SafetyRealignTrainer`]."""

from __future__ import annotations

from dataclasses import dataclass, field

from trl import DPOConfig

from ..trainer import apply_device_defaults
from .masks import EXPORT_MODES, GRANULARITIES


# ------------------------------------------------------------------------------------------------ the trainer
@dataclass
class SafetyRealignConfig(DPOConfig):
    r"""
    Configuration for [`SafetyRealignTrainer`] ([Yi et al. 2024, arXiv 2405.09055](https://arxiv.org/abs/2405.09055)).

    Everything of [`~trl.DPOConfig`] applies (`beta` 0.1 and the sigmoid loss, as the paper). Differences: a learning
    rate for mask logits, and `bf16` / `use_cpu` set from the hardware.

    Parameters:
        mask_granularity (`str`, *optional*, defaults to `"element"`):
            One mask logit per task-vector `element` (the paper), per `row`, or per `tensor` (cheaper options).
        mask_temperature (`float`, *optional*, defaults to `0.5`):
            Temperature of the Concrete relaxation.
        mask_init_logit (`float`, *optional*, defaults to `0.0`):
            Initial logit (0 gives p = 0.5, the paper's init).
        export_mode (`str`, *optional*, defaults to `"threshold"`):
            Deterministic mask of the export: `threshold` (sigmoid(logit) > 0.5) or `expected` (sigmoid(logit)).
    """

    learning_rate: float = field(
        default=5e-3, metadata={"help": "Learning rate of the mask logits (paper: 1e-3..1e-2)."}
    )
    mask_granularity: str = field(
        default="element", metadata={"help": "Mask logits per element, row or tensor.", "choices": list(GRANULARITIES)}
    )
    mask_temperature: float = field(default=0.5, metadata={"help": "Concrete relaxation temperature."})
    mask_init_logit: float = field(default=0.0, metadata={"help": "Initial mask logit (0 = keep with p 0.5)."})
    export_mode: str = field(
        default="threshold",
        metadata={"help": "Export mask: threshold (sigmoid > 0.5) or expected.", "choices": list(EXPORT_MODES)},
    )

    def __post_init__(self):
        apply_device_defaults(self)
        if self.mask_granularity not in GRANULARITIES:
            raise ValueError(f"mask_granularity must be one of {GRANULARITIES}, got {self.mask_granularity!r}.")
        if self.export_mode not in EXPORT_MODES:
            raise ValueError(f"export_mode must be one of {EXPORT_MODES}, got {self.export_mode!r}.")
        if self.mask_temperature <= 0:
            raise ValueError(f"mask_temperature must be > 0, got {self.mask_temperature}.")
        super().__post_init__()
