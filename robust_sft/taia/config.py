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
            Which updates `save_taia_model` / `save_taia_adapter` / `taia_view` keep at inference: `"attention"`
            (TAIA), `"mlp"` (TAIF ablation) or `"all"` (vanilla). Updates outside attention and MLP (embeddings,
            norms between blocks, LM head) are always kept.
        eval_keep (`str` or `None`, *optional*, defaults to `None`):
            When set, `evaluate()` (and the evaluations during training) score the model with only these updates,
            as the export would: `"attention"` scores the TAIA model. `None` scores the trained model as it is.
        train_modules (`str`, *optional*, defaults to `"all"`):
            `"all"`: LoRA on every attention and MLP weight matrix (MoE experts and routers through PEFT's
            `target_parameters`), or full fine-tuning of every parameter (TAIA). `"attention"`: only the attention
            parameters are trained (the TOA ablation): LoRA on the attention layers, or, with full fine-tuning,
            everything else frozen (MLP, embeddings, norms outside attention, LM head).
        attention_modules (`list[str]` or `None`, *optional*):
            Override of the attention parameters (suffixes of module or parameter names, as PEFT's target_modules),
            for architectures not recognised by name.
        mlp_modules (`list[str]` or `None`, *optional*):
            Override of the MLP parameters.
        snapshot_base_weights (`bool`, *optional*, defaults to `True`):
            Full fine-tuning only: keep a CPU copy (in the model's dtype) of the pre-trained parameters that `keep`
            and `eval_keep` drop, for the export and the evaluation view. When off, the export reloads them from the
            model's `name_or_path`.
    """

    keep: str = field(
        default="attention",
        metadata={"help": "Updates kept at inference: 'attention' (TAIA), 'mlp' (TAIF) or 'all' (vanilla).",
                  "choices": list(KEEP_CHOICES)},
    )  # fmt: skip
    eval_keep: str | None = field(
        default=None,
        metadata={"help": "Score evaluations with only these updates ('attention': the TAIA model, 'mlp', 'all'); "
                  "unset: the trained model as it is."},
    )  # fmt: skip
    train_modules: str = field(
        default="all",
        metadata={"help": "'all': train attention and MLP (TAIA); 'attention': train the attention parameters only "
                  "(the TOA ablation).", "choices": ["all", "attention"]},
    )  # fmt: skip
    attention_modules: list[str] | None = field(
        default=None, metadata={"help": "Override: attention module/parameter name suffixes (e.g. q_proj k_proj)."}
    )
    mlp_modules: list[str] | None = field(
        default=None, metadata={"help": "Override: MLP module/parameter name suffixes (e.g. mlp experts)."}
    )
    snapshot_base_weights: bool = field(
        default=True,
        metadata={"help": "Full fine-tuning: keep a CPU copy of the pre-trained weights that keep/eval_keep drop."},
    )

    def __post_init__(self):
        _check_keep(self.keep)
        if self.eval_keep is not None:
            _check_keep(self.eval_keep, "eval_keep")
        if self.train_modules not in ("all", "attention"):
            raise ValueError(f"train_modules must be 'all' or 'attention', got {self.train_modules!r}.")
        if self.train_modules == "attention" and self.keep == "mlp":
            raise ValueError(
                "train_modules='attention' trains no MLP update, so keep='mlp' would export the base model. Use "
                "keep='attention' (or 'all') with the TOA ablation."
            )
        if self.train_modules == "attention" and self.eval_keep == "mlp":
            raise ValueError("train_modules='attention' trains no MLP update: eval_keep='mlp' would score the base.")
        super().__post_init__()

    def default_lora_target_modules(self) -> str | None:
        """LoRA targets of `robust-sft train taia --use_peft` without `--lora_target_modules`: every linear layer, or
        none for the TOA ablation (TAIATrainer then picks the attention layers)."""
        return "all-linear" if self.train_modules == "all" else None
