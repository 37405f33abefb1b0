"""Which parameters of a model are attention, which are MLP and which are neither (TAIA's split), per architecture.

The split is made over *parameters*, not `nn.Linear` modules: in transformers 5 the experts of a mixture-of-experts
block are fused 3-D parameters (`mlp.experts.gate_up_proj`, `mlp.experts.down_proj`) and the router (`mlp.gate`) is
a module with a bare `weight` parameter, neither of them an `nn.Linear`. Norms inside the attention block (`q_norm`,
`k_norm` of Qwen3 and Gemma3) belong to attention. Everything outside the attention and MLP blocks (embeddings, the
norms between blocks, the LM head) is neither: every export keeps its updates, as the paper's full fine-tuning
variant does.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Literal

from torch import nn

from ..trl_internals import unwrap_peft

logger = logging.getLogger(__name__)


Keep = Literal["attention", "mlp", "all"]
Group = Literal["attention", "mlp"]


KEEP_CHOICES = ("attention", "mlp", "all")


# Names of the sub-modules that hold a block's attention or its feed-forward part, across architectures:
# Llama/Qwen2/Qwen3/Mistral/Gemma/Gemma3/Phi/Phi-3 (`self_attn`, `mlp`), GPT-2 (`attn`, `mlp`), GPT-NeoX (`attention`,
# `mlp`), Falcon/BLOOM (`self_attention`, `mlp`), GPT-J/CodeGen (`attn`, `mlp`), Mixtral/Qwen2-MoE/Qwen3-MoE (`mlp`
# holding `gate`, `experts`, `shared_expert`, `shared_expert_gate`), Llama 4 (`feed_forward`), older Mixtral
# (`block_sparse_moe`), T5-style (`SelfAttention`, `DenseReluDense`), MPT (`attn`, `ffn`).
ATTENTION_CONTAINERS = frozenset(
    {"self_attn", "attn", "attention", "self_attention", "SelfAttention", "EncDecAttention", "cross_attn"}
)


MLP_CONTAINERS = frozenset(
    {"mlp", "feed_forward", "ffn", "block_sparse_moe", "experts", "shared_expert", "DenseReluDense", "moe"}
)


# Name parts that PEFT inserts into a wrapped model: adapter weights (skipped) and wrappers (removed).
_ADAPTER_PARTS = frozenset(
    {"lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector", "modules_to_save"}
)
_WRAPPER_PARTS = frozenset({"base_layer", "original_module"})


class UnknownArchitectureError(ValueError):
    """The attention / MLP split of a model cannot be told from its parameter names."""


def _check_keep(keep: str | None, name: str = "keep") -> None:
    if keep not in KEEP_CHOICES:
        raise ValueError(f"{name} must be one of {KEEP_CHOICES}, got {keep!r}.")


def canonical_name(name: str) -> str | None:
    """The name of a parameter in the plain transformers model, for a name inside a PEFT-wrapped one.

    `model.layers.0.self_attn.q_proj.base_layer.weight` -> `model.layers.0.self_attn.q_proj.weight`; the adapter
    weights themselves (`lora_A`, `lora_B`, `modules_to_save` copies) give None.
    """
    parts = name.split(".")
    if any(part in _ADAPTER_PARTS for part in parts):
        return None
    return ".".join(part for part in parts if part not in _WRAPPER_PARTS)


def _matches(name: str, patterns: Iterable[str]) -> bool:
    return any(name == pattern or name.endswith("." + pattern) for pattern in patterns)


def _prefixes(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:end]) for end in range(1, len(parts) + 1)]


def classify(
    name: str, attention_modules: Sequence[str] | None = None, mlp_modules: Sequence[str] | None = None
) -> Group | None:
    """`"attention"`, `"mlp"` or None (neither) for one parameter (or state-dict) name of the plain model.

    By default a name is attention (MLP) when one of its module names is in `ATTENTION_CONTAINERS`
    (`MLP_CONTAINERS`). With an override, when the name or one of its module prefixes matches a pattern the way PEFT's
    `target_modules` match (the full name, or a suffix after a dot): `"q_proj"` covers `...q_proj.weight` and
    `...q_proj.bias`, `"experts.gate_up_proj"` the fused expert parameter, `"mlp"` the whole feed-forward block.
    """
    if attention_modules is not None or mlp_modules is not None:
        prefixes = _prefixes(name)
        is_attention = any(_matches(prefix, attention_modules or ()) for prefix in prefixes)
        is_mlp = any(_matches(prefix, mlp_modules or ()) for prefix in prefixes)
    else:
        modules = set(name.split(".")[:-1])
        is_attention, is_mlp = bool(modules & ATTENTION_CONTAINERS), bool(modules & MLP_CONTAINERS)
    if is_attention and is_mlp:
        raise UnknownArchitectureError(f"Parameter {name} matches both the attention and the MLP patterns.")
    return "attention" if is_attention else "mlp" if is_mlp else None


def _is_linear(module: nn.Module) -> bool:
    # nn.Linear covers bitsandbytes Linear4bit/Linear8bitLt and Falcon's FalconLinear; GPT-2 style models use
    # transformers' Conv1D. These are what PEFT adapts through `target_modules`; any other parameter (fused experts,
    # routers) goes through `target_parameters`.
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"


def _base_module(module: nn.Module) -> nn.Module:
    from peft.tuners.tuners_utils import BaseTunerLayer

    while isinstance(module, BaseTunerLayer):
        module = module.get_base_layer()
    return module


@dataclass
class ModuleSplit:
    """The parameters of a model split into attention, MLP and neither (names in the plain transformers model).

    `classify(name)` answers for any state-dict name with the same rule (and the same override) as the split.
    """

    attention: list[str]
    mlp: list[str]
    other: list[str] = field(default_factory=list)
    attention_modules: tuple[str, ...] | None = None
    mlp_modules: tuple[str, ...] | None = None
    # Linear-like modules (PEFT `target_modules`) and other adaptable parameters (`target_parameters`), per group.
    linear_modules: dict[str, list[str]] = field(default_factory=dict)
    fused_parameters: dict[str, list[str]] = field(default_factory=dict)
    # Every module name of the model, to check that the LoRA target suffixes reach nothing else.
    all_modules: list[str] = field(default_factory=list, repr=False)

    def classify(self, name: str) -> Group | None:
        """The group of one (plain-model) parameter or state-dict name: `"attention"`, `"mlp"` or None."""
        return classify(name, self.attention_modules, self.mlp_modules)

    def names(self, which: Keep) -> list[str]:
        """The attention / MLP parameters whose updates `which` keeps."""
        _check_keep(which, "which")
        return {"attention": self.attention, "mlp": self.mlp, "all": self.attention + self.mlp}[which]

    def dropped(self, keep: Keep) -> list[str]:
        """The parameters whose updates `keep` discards."""
        return [name for group in dropped_groups(keep) for name in getattr(self, group)]

    def keeps(self, name: str, keep: Keep) -> bool:
        """True when `keep` keeps the update of `name` (always for parameters outside attention and MLP)."""
        return self.classify(name) not in dropped_groups(keep)

    def lora_targets(self, which: Keep = "all") -> list[str]:
        """PEFT `target_modules`: short suffixes (`"self_attn.q_proj"`, `"mlp.c_proj"`) of the linear layers."""
        modules = [name for group in _groups(which) for name in self.linear_modules.get(group, [])]
        return _short_suffixes(modules, self.all_modules, keep_parts=2)

    def lora_target_parameters(self, which: Keep = "all") -> list[str]:
        """PEFT `target_parameters`: suffixes of the adaptable parameters that are not in a linear layer (the fused
        3-D expert parameters and the router weights of MoE blocks); empty for dense models."""
        names = [name for group in _groups(which) for name in self.fused_parameters.get(group, [])]
        return _short_suffixes(names, self.attention + self.mlp + self.other, keep_parts=3)


def _groups(which: Keep) -> tuple[Group, ...]:
    _check_keep(which, "which")
    return {"attention": ("attention",), "mlp": ("mlp",), "all": ("attention", "mlp")}[which]


def dropped_groups(keep: Keep) -> tuple[Group, ...]:
    """The groups whose updates `keep` discards."""
    _check_keep(keep)
    return {"attention": ("mlp",), "mlp": ("attention",), "all": ()}[keep]


def _short_suffixes(names: Sequence[str], universe: Sequence[str], keep_parts: int) -> list[str]:
    """The last `keep_parts` name parts of each name, or the full name where that suffix would also reach a name
    outside `names` (PEFT matches a target as the full name or a suffix after a dot)."""
    wanted = set(names)
    outside = [name for name in universe if name not in wanted]
    targets = set()
    for name in names:
        suffix = ".".join(name.split(".")[-keep_parts:])
        targets.add(name if _matches_any(outside, suffix) else suffix)
    return sorted(targets)


def _matches_any(names: Iterable[str], pattern: str) -> bool:
    return any(name == pattern or name.endswith("." + pattern) for name in names)


def split_modules(
    model: nn.Module, attention_modules: Sequence[str] | None = None, mlp_modules: Sequence[str] | None = None
) -> ModuleSplit:
    """Split every parameter of a model (a plain transformers model or a PEFT model) into attention, MLP or neither.

    By default the split is read from the names of the containing modules (see `ATTENTION_CONTAINERS` and
    `MLP_CONTAINERS`). `attention_modules` / `mlp_modules` override it with name patterns matched like PEFT's
    `target_modules`, against the parameter name and each of its module prefixes (see `classify`).

    Raises:
        UnknownArchitectureError: a weight matrix outside the embeddings and the LM head is neither attention nor MLP
            (the message names them), or the model has no attention or no MLP parameter.
    """
    attention_modules = tuple(attention_modules) if attention_modules is not None else None
    mlp_modules = tuple(mlp_modules) if mlp_modules is not None else None
    base = unwrap_peft(model)
    output = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    output = _base_module(getattr(output, "original_module", output)) if output is not None else None
    groups: dict[str | None, list[str]] = {"attention": [], "mlp": [], None: []}
    linear: dict[str, list[str]] = {"attention": [], "mlp": []}
    fused: dict[str, list[str]] = {"attention": [], "mlp": []}
    unknown, seen, all_modules = [], set(), []
    for module_name, module in base.named_modules():
        name = canonical_name(module_name) if module_name else ""
        if name is None:
            continue
        all_modules.append(name)
        plain = _base_module(module)
        for parameter_name, parameter in module.named_parameters(recurse=False):
            full = f"{name}.{parameter_name}" if name else parameter_name
            if full in seen:
                continue
            seen.add(full)
            group = classify(full, attention_modules, mlp_modules)
            groups[group].append(full)
            if group is None:
                if parameter.ndim >= 2 and plain is not output and not isinstance(plain, nn.Embedding):
                    unknown.append(full)
            elif _is_linear(plain) and parameter_name == "weight":
                linear[group].append(name)
            elif parameter.ndim >= 2 and not _is_linear(plain):
                fused[group].append(full)
    attention, mlp = groups["attention"], groups["mlp"]
    if unknown or not attention or not mlp:
        shown = ", ".join(unknown[:12]) + (f", ... ({len(unknown)} in all)" if len(unknown) > 12 else "")
        raise UnknownArchitectureError(
            f"Cannot tell attention from MLP parameters in {type(base).__name__}: "
            + (f"unmatched weight matrices: {shown}. " if unknown else "")
            + (f"found {len(attention)} attention and {len(mlp)} MLP parameters. " if not attention or not mlp else "")
            + "Name them explicitly, e.g. TAIAConfig(attention_modules=['q_proj', 'k_proj', 'v_proj', 'o_proj'], "
            "mlp_modules=['gate_proj', 'up_proj', 'down_proj']) (suffixes of module or parameter names, as PEFT's "
            "target_modules; a container such as 'mlp' covers everything inside it)."
        )
    return ModuleSplit(
        attention=attention,
        mlp=mlp,
        other=groups[None],
        attention_modules=attention_modules,
        mlp_modules=mlp_modules,
        linear_modules=linear,
        fused_parameters=fused,
        all_modules=all_modules,
    )
