"""Which parameters of a model are attention and which are MLP (TAIA's split), per architecture."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from torch import nn

from ..trl_internals import unwrap_peft

logger = logging.getLogger(__name__)


Keep = Literal["attention", "mlp", "all"]


KEEP_CHOICES = ("attention", "mlp", "all")


# Names of the sub-modules that hold a block's attention or its feed-forward part, across architectures:
# Llama/Qwen2/Mistral/Gemma/Phi/Phi-3 (`self_attn`, `mlp`), GPT-2 (`attn`, `mlp`), GPT-NeoX (`attention`, `mlp`),
# Falcon (`self_attention`, `mlp`), GPT-J/CodeGen (`attn`, `mlp`), Mixtral/Qwen-MoE (`block_sparse_moe`, `experts`),
# T5-style (`SelfAttention`, `DenseReluDense`), BLOOM (`self_attention`, `mlp`), MPT (`attn`, `ffn`).
ATTENTION_CONTAINERS = frozenset(
    {"self_attn", "attn", "attention", "self_attention", "SelfAttention", "EncDecAttention", "cross_attn"}
)


MLP_CONTAINERS = frozenset(
    {"mlp", "feed_forward", "ffn", "block_sparse_moe", "experts", "shared_expert", "DenseReluDense", "moe"}
)


class UnknownArchitectureError(ValueError):
    """The attention / MLP split of a model cannot be told from its module names."""


def _is_linear(module: nn.Module) -> bool:
    # nn.Linear covers bitsandbytes Linear4bit/Linear8bitLt; GPT-2 style models use transformers' Conv1D; a PEFT
    # tuner layer stands where a linear layer was (its `base_layer` and `lora_*` children are skipped by name).
    from peft.tuners.tuners_utils import BaseTunerLayer

    return isinstance(module, (nn.Linear, BaseTunerLayer)) or type(module).__name__ == "Conv1D"


def _matches(name: str, patterns: Sequence[str]) -> bool:
    return any(name == pattern or name.endswith("." + pattern) for pattern in patterns)


@dataclass
class ModuleSplit:
    """The linear layers of a model, split into attention and MLP (full module names of the unwrapped model)."""

    attention: list[str]
    mlp: list[str]

    def names(self, which: Keep) -> list[str]:
        """The modules whose updates `which` keeps."""
        return {"attention": self.attention, "mlp": self.mlp, "all": self.attention + self.mlp}[which]

    def dropped(self, keep: Keep) -> list[str]:
        """The modules whose updates `keep` discards."""
        return {"attention": self.mlp, "mlp": self.attention, "all": []}[keep]

    def lora_targets(self, which: Keep = "all") -> list[str]:
        """Short, unambiguous PEFT `target_modules` entries (`"self_attn.q_proj"`, `"mlp.c_proj"`, ...)."""
        return sorted({".".join(name.split(".")[-2:]) for name in self.names(which)})


def split_modules(
    model: nn.Module, attention_modules: Sequence[str] | None = None, mlp_modules: Sequence[str] | None = None
) -> ModuleSplit:
    """Split a model's linear layers (all but the LM head) into attention and MLP.

    By default the split is read from the names of the containing modules (see `ATTENTION_CONTAINERS` and
    `MLP_CONTAINERS`). `attention_modules` / `mlp_modules` override it with name patterns matched like PEFT's
    `target_modules` (a full name, or a suffix after a dot: `"q_proj"`, `"attn.c_proj"`).

    Raises:
        UnknownArchitectureError: some linear layers are neither attention nor MLP; the message names them.
    """
    base = unwrap_peft(model)
    output = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    attention, mlp, unknown = [], [], []
    for name, module in base.named_modules():
        if not _is_linear(module) or module is output or ".lora_" in name or name.endswith(".base_layer"):
            continue
        parts = set(name.split(".")[:-1])
        if attention_modules is not None or mlp_modules is not None:
            is_attention = _matches(name, attention_modules or ())
            is_mlp = _matches(name, mlp_modules or ())
        else:
            is_attention, is_mlp = bool(parts & ATTENTION_CONTAINERS), bool(parts & MLP_CONTAINERS)
        if is_attention and is_mlp:
            raise UnknownArchitectureError(f"Module {name} matches both the attention and the MLP patterns.")
        (attention if is_attention else mlp if is_mlp else unknown).append(name)
    if unknown or not attention or not mlp:
        shown = ", ".join(unknown[:12]) + (f", ... ({len(unknown)} in all)" if len(unknown) > 12 else "")
        raise UnknownArchitectureError(
            f"Cannot tell attention from MLP layers in {type(base).__name__}: "
            + (f"unmatched linear layers: {shown}. " if unknown else "")
            + (f"found {len(attention)} attention and {len(mlp)} MLP layers. " if not attention or not mlp else "")
            + "Name them explicitly, e.g. TAIAConfig(attention_modules=['q_proj', 'k_proj', 'v_proj', 'o_proj'], "
            "mlp_modules=['gate_proj', 'up_proj', 'down_proj']) (suffixes of module names, as PEFT's target_modules)."
        )
    return ModuleSplit(attention=attention, mlp=mlp)


# --------------------------------------------------------------------------------------------------- export
def _check_keep(keep: str) -> None:
    if keep not in KEEP_CHOICES:
        raise ValueError(f"keep must be one of {KEEP_CHOICES}, got {keep!r}.")
