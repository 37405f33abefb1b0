"""Configuration of [`SafetyRealignTrainer`]."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from trl import DPOConfig

from ..trainer import apply_device_defaults
from .masks import EXPORT_MODES, GRANULARITIES, MASK_DTYPES


# ------------------------------------------------------------------------------------------------ the trainer
@dataclass
class SafetyRealignConfig(DPOConfig):
    r"""
    Configuration for [`SafetyRealignTrainer`] ([Yi et al. 2024, arXiv 2405.09055](https://arxiv.org/abs/2405.09055)).

    Everything of [`~trl.DPOConfig`] applies (`beta` 0.1 and the sigmoid loss, as the paper). Differences: a learning
    rate for mask logits, and `bf16` / `use_cpu` set from the hardware.

    Parameters:
        mask_granularity (`str`, *optional*, defaults to `"element"`):
            One mask logit per task-vector `element` (the paper), per `row`, or per `tensor`. Element and row masks
            are applied as `m * tau / mean(m)`; a per-tensor mask as `m * tau` (its mean normalisation would cancel
            it).
        mask_temperature (`float`, *optional*, defaults to `0.5`):
            Temperature of the Concrete relaxation.
        mask_init_logit (`float`, *optional*, defaults to `0.0`):
            Initial logit (0 gives p = 0.5, the paper's init).
        mask_dtype (`str`, *optional*, defaults to `"float32"`):
            dtype of the mask logits, hence of their gradient and optimiser states: `float32`, `bfloat16` or
            `float16`. Half precision halves the mask's memory; bfloat16 rounds away updates smaller than about
            1/128 of a logit's magnitude.
        unmasked_parameters (`str` or `None`, *optional*, defaults to `None`):
            Regular expression on task-vector names: those tensors are carried over whole (added to the weights
            unmasked), e.g. `"norm|bias"` to keep the fine-tune's norms and biases. `None` masks every tensor.
        task_vector_weights (`list[float]` or `None`, *optional*, defaults to `None`):
            With several task vectors (one shared mask, the reference's multi-task mode): their weights in
            `sum_i w_i m * tau_i / mean(m)`. `None`: their mean.
        export_mode (`str`, *optional*, defaults to `"threshold"`):
            Deterministic mask of the export and of `save_model()`: `threshold` (sigmoid(logit) > 0.5) or
            `expected` (sigmoid(logit)).
    """

    learning_rate: float = field(
        default=5e-3, metadata={"help": "Learning rate of the mask logits (paper: 1e-3..1e-2)."}
    )
    mask_granularity: str = field(
        default="element", metadata={"help": "Mask logits per element, row or tensor.", "choices": list(GRANULARITIES)}
    )
    mask_temperature: float = field(default=0.5, metadata={"help": "Concrete relaxation temperature."})
    mask_init_logit: float = field(default=0.0, metadata={"help": "Initial mask logit (0 = keep with p 0.5)."})
    mask_dtype: str = field(
        default="float32",
        metadata={"help": "dtype of the mask logits and their optimiser states.", "choices": list(MASK_DTYPES)},
    )
    unmasked_parameters: str | None = field(
        default=None,
        metadata={"help": "Regex of task-vector tensors carried over unmasked (e.g. 'norm|bias'); None masks all."},
    )
    task_vector_weights: list[float] | None = field(
        default=None,
        metadata={"help": "Weights of several task vectors under one shared mask (default: their mean)."},
    )
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
        if self.mask_dtype not in MASK_DTYPES:
            raise ValueError(f"mask_dtype must be one of {tuple(MASK_DTYPES)}, got {self.mask_dtype!r}.")
        if self.mask_temperature <= 0:
            raise ValueError(f"mask_temperature must be > 0, got {self.mask_temperature}.")
        if self.unmasked_parameters is not None:
            try:
                re.compile(self.unmasked_parameters)
            except re.error as error:
                raise ValueError(f"unmasked_parameters is not a valid regular expression: {error}.") from error
        if self.sync_ref_model:
            raise ValueError(
                "sync_ref_model=True does not apply: the reference is the unmasked fine-tune, fixed by definition."
            )
        super().__post_init__()
