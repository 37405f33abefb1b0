"""Configuration of [`DELIATrainer`]."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..trainer import RobustSFTConfig

SOURCES = ("task", "diverse")


@dataclass
class DELIAConfig(RobustSFTConfig):
    r"""
    Configuration for [`DELIATrainer`]: DELIA ([arXiv 2408.10841](https://arxiv.org/abs/2408.10841)).

    Parameters:
        diverse_ratio (`float`, *optional*, defaults to `1.0`):
            Diverse rows per task row: `min(len(diverse), int(len(task) * diverse_ratio))` diverse rows are mixed in
            (the paper: 100 task rows x 260). A smaller cache is used whole, never upsampled.
        task_weight (`float`, *optional*, defaults to `1.0`):
            Loss weight of task tokens (beyond the paper, which weights both sources equally).
        diverse_weight (`float`, *optional*, defaults to `1.0`):
            Loss weight of diverse tokens.
        new_special_tokens (`list[str]`, *optional*, defaults to `[]`):
            Tokens to add to the tokenizer (e.g. `["<sep>"]`). Their embedding rows start as the mean embedding and
            train: with LoRA, the input embedding is added to the LoRA targets (saved with the adapter); with full
            fine-tuning, as part of the embedding matrix.
        embedding_pad_multiple (`int`, *optional*, defaults to `64`):
            The resized embedding matrix has a multiple of this many rows.
    """

    diverse_ratio: float = field(default=1.0, metadata={"help": "Diverse rows per task row (no upsampling)."})
    task_weight: float = field(default=1.0, metadata={"help": "Loss weight of task tokens."})
    diverse_weight: float = field(default=1.0, metadata={"help": "Loss weight of diverse tokens."})
    new_special_tokens: list[str] = field(
        default_factory=list, metadata={"help": "Special tokens to add, e.g. <sep>; their embeddings train."}
    )
    embedding_pad_multiple: int = field(default=64, metadata={"help": "Resize the embeddings to a multiple of this."})

    def __post_init__(self):
        super().__post_init__()
        if self.diverse_ratio < 0:
            raise ValueError(f"diverse_ratio must be >= 0, got {self.diverse_ratio}.")
        if self.task_weight < 0 or self.diverse_weight < 0:
            raise ValueError("task_weight and diverse_weight must be >= 0.")
