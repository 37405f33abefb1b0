"""Configuration of [`DELIATrainer`]."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..trainer import RobustSFTConfig

SOURCES = ("task", "diverse")
NEW_TOKEN_TRAINING = ("trainable_tokens", "lora_embedding")


@dataclass
class DELIAConfig(RobustSFTConfig):
    r"""
    Configuration for [`DELIATrainer`]: DELIA ([arXiv 2408.10841](https://arxiv.org/abs/2408.10841)).

    Parameters:
        diverse_ratio (`float`, *optional*, defaults to `1.0`):
            Diverse rows per task row: `min(len(diverse), floor(len(task) * diverse_ratio))` diverse rows are mixed in
            (the paper: 100 task rows x 260), the product taken on the ratio as written (100 x 0.29 is 29, not the
            28 of float arithmetic). A smaller cache is used whole, never upsampled.
        task_weight (`float`, *optional*, defaults to `1.0`):
            Loss weight of task tokens (beyond the paper, which weights both sources equally).
        diverse_weight (`float`, *optional*, defaults to `1.0`):
            Loss weight of diverse tokens.
        new_special_tokens (`list[str]`, *optional*, defaults to `[]`):
            Tokens to add to the tokenizer (e.g. `["<sep>"]`). Their embedding rows start as the mean embedding and
            train: with full fine-tuning as part of the embedding matrices; with LoRA as `new_token_training` says.
        new_token_training (`str`, *optional*, defaults to `"trainable_tokens"`):
            How a LoRA run trains the new tokens' rows. `"trainable_tokens"`: their input *and* output rows train
            (PEFT's `trainable_token_indices`, only those rows), so the model learns to read and to write them.
            `"lora_embedding"`: the reference's choice, LoRA on the input embedding (every token gets trainable
            coordinates); the output rows stay at their initial value, so the model reads the new tokens but does
            not learn to write them.
        embedding_pad_multiple (`int`, *optional*, defaults to `64`):
            The resized embedding matrix has a multiple of this many rows.
    """

    diverse_ratio: float = field(default=1.0, metadata={"help": "Diverse rows per task row (no upsampling)."})
    task_weight: float = field(default=1.0, metadata={"help": "Loss weight of task tokens."})
    diverse_weight: float = field(default=1.0, metadata={"help": "Loss weight of diverse tokens."})
    new_special_tokens: list[str] = field(
        default_factory=list, metadata={"help": "Special tokens to add, e.g. <sep>; their embeddings train."}
    )
    new_token_training: str = field(
        default="trainable_tokens",
        metadata={
            "help": "LoRA runs: 'trainable_tokens' (the new rows, input and output, train: the model learns to write "
            "them) or 'lora_embedding' (LoRA on the input embedding: it reads them only).",
            "choices": list(NEW_TOKEN_TRAINING),
        },
    )
    embedding_pad_multiple: int = field(default=64, metadata={"help": "Resize the embeddings to a multiple of this."})

    def __post_init__(self):
        super().__post_init__()
        if self.diverse_ratio < 0:
            raise ValueError(f"diverse_ratio must be >= 0, got {self.diverse_ratio}.")
        if self.task_weight < 0 or self.diverse_weight < 0:
            raise ValueError("task_weight and diverse_weight must be >= 0.")
        if self.new_token_training not in NEW_TOKEN_TRAINING:
            raise ValueError(f"new_token_training must be in {NEW_TOKEN_TRAINING}, got {self.new_token_training!r}.")
        weighted = self.task_weight != 1 or self.diverse_weight != 1
        if weighted and (self.label_smoothing_factor > 0 or self.loss_type != "nll"):
            raise ValueError(
                f"task_weight / diverse_weight ({self.task_weight} / {self.diverse_weight}) reweight TRL's plain "
                f"token NLL; with label_smoothing_factor={self.label_smoothing_factor} and "
                f"loss_type={self.loss_type!r} TRL computes another loss, which the weights would not reach. Set both "
                "weights to 1, or use label_smoothing_factor=0 and loss_type='nll'."
            )
