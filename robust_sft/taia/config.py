"""Configuration of [`TAIATrainer`]."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..trainer import RobustSFTConfig
from .modules import KEEP_CHOICES, _check_keep


# --------------------------------------------------------------------------------------------------- trainer
@dataclass
class TAIAConfig(RobustSFTConfig):
    r"""
    Configuration for [`TAIATrainer`]: everything of [`RobustSFTConfig`] plus the TAIA fields.

    Parameters:
        keep (`str`, *optional*, defaults to `"attention"`):
            Which updates `save_taia_model` / `taia_view` keep at inference: `"attention"` (TAIA), `"mlp"` (TAIF
            ablation) or `"all"` (vanilla).
        train_modules (`str`, *optional*, defaults to `"all"`):
            `"all"`: LoRA on every linear layer but the LM head (TAIA). `"attention"`: LoRA on the attention layers
            only (the TOA ablation); with full fine-tuning, the MLP weights are frozen.
        attention_modules (`list[str]` or `None`, *optional*):
            Override of the attention layers (PEFT-style name suffixes), for architectures not recognised by name.
        mlp_modules (`list[str]` or `None`, *optional*):
            Override of the MLP layers.
        snapshot_base_weights (`bool`, *optional*, defaults to `True`):
            Full fine-tuning only: keep a CPU copy of the pre-trained attention and MLP weights for the export. When
            off, the export reloads them from the model's `name_or_path`.
    """

    keep: str = field(
        default="attention",
        metadata={"help": "Updates kept at inference: 'attention' (TAIA), 'mlp' (TAIF) or 'all' (vanilla).",
                  "choices": list(KEEP_CHOICES)},
    )  # fmt: skip
    train_modules: str = field(
        default="all",
        metadata={"help": "'all': LoRA on every linear layer but the LM head (TAIA); 'attention': attention only "
                  "(the TOA ablation).", "choices": ["all", "attention"]},
    )  # fmt: skip
    attention_modules: list[str] | None = field(
        default=None, metadata={"help": "Override: attention layer name suffixes (e.g. q_proj k_proj v_proj o_proj)."}
    )
    mlp_modules: list[str] | None = field(
        default=None, metadata={"help": "Override: MLP layer name suffixes (e.g. gate_proj up_proj down_proj)."}
    )
    snapshot_base_weights: bool = field(
        default=True,
        metadata={"help": "Full fine-tuning: keep a CPU copy of the pre-trained attention/MLP weights for export."},
    )

    def __post_init__(self):
        _check_keep(self.keep)
        if self.train_modules not in ("all", "attention"):
            raise ValueError(f"train_modules must be 'all' or 'attention', got {self.train_modules!r}.")
        if self.train_modules == "attention" and self.keep == "mlp":
            raise ValueError(
                "train_modules='attention' trains no MLP update, so keep='mlp' would export the base model. Use "
                "keep='attention' (or 'all') with the TOA ablation."
            )
        super().__post_init__()

    def default_lora_target_modules(self) -> str | None:
        """LoRA targets of `robust-sft train taia --use_peft` without `--lora_target_modules`: every linear layer, or
        none for the TOA ablation (TAIATrainer then picks the attention layers)."""
        return "all-linear" if self.train_modules == "all" else None
