"""TAIA: train all parameters, infer with the attention updates only (Jiang et al., NeurIPS 2024, arXiv 2405.20192).

Fine-tuning on data outside the pre-training distribution damages the knowledge held in the feed-forward (MLP) layers.
TAIA trains as usual (LoRA on every linear layer, or full fine-tuning) and, at inference, keeps only the updates of
the attention modules: the MLP stays the pre-trained one. Training cost is that of plain SFT.

`keep` selects what is kept at inference: `"attention"` (TAIA), `"mlp"` (TAIF, the paper's ablation) or `"all"`
(vanilla). `train_modules="attention"` trains the attention modules only from the start (TOA, the other ablation).
"""

from __future__ import annotations

import copy
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from .modeling import is_quantized
from .trainer import RobustSFTConfig, RobustSFTTrainer

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


def _unwrap(model: nn.Module) -> nn.Module:
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _without_forward_patch(model: nn.Module) -> nn.Module:
    """Drop an instance-level `forward` (TRL's fused-LM-head patch) so the class forward runs again.

    TRL 1.16's `add_fused_lm_head` stores a closure over the *original* model's forward on the instance; a deep
    copy keeps that closure, so the copy would silently run the original's weights.
    """
    vars(_unwrap(model)).pop("forward", None)
    return model


def _copy_model(model: nn.Module) -> nn.Module:
    return _without_forward_patch(copy.deepcopy(model))


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
    base = _unwrap(model)
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


# --------------------------------------------------------------------------------------------------- LoRA adapters
def _tuner_layers(peft_model: nn.Module, names: Sequence[str]) -> Iterator[tuple[str, nn.Module]]:
    from peft.tuners.tuners_utils import BaseTunerLayer

    base = _unwrap(peft_model)
    for name in names:
        module = base.get_submodule(name)
        if isinstance(module, BaseTunerLayer):
            yield name, module


@contextmanager
def taia_view(
    peft_model: nn.Module, keep: Keep = "attention", split: ModuleSplit | None = None
) -> Iterator[nn.Module]:
    """Within the block, the PEFT model runs with the adapters of the dropped modules switched off (in memory).

    For evaluation without merging: `with taia_view(model): evaluate(model)`.
    """
    _check_keep(keep)
    split = split or split_modules(peft_model)
    switched = [module for _, module in _tuner_layers(peft_model, split.dropped(keep)) if not module.disable_adapters]
    trainable = {id(p): p.requires_grad for module in switched for p in module.parameters()}
    for module in switched:
        module.enable_adapters(False)
    try:
        yield peft_model
    finally:
        for module in switched:
            module.enable_adapters(True)
            for parameter in module.parameters():
                parameter.requires_grad_(trainable[id(parameter)])


def merge_taia(peft_model: nn.Module, keep: Keep = "attention", split: ModuleSplit | None = None) -> PreTrainedModel:
    """Merge only the kept LoRA updates into the base weights and return the plain transformers model.

    The adapters of the dropped modules are removed *before* the merge (once a full adapter is merged, its MLP part
    cannot be taken out without the base weights). The PEFT model is consumed.
    """
    _check_keep(keep)
    if is_quantized(peft_model):
        raise ValueError(
            "Refusing to merge LoRA updates into 4/8-bit quantized weights (the result would be lossy). "
            "Reload the base model in full precision and attach the adapter (`export_taia` does this)."
        )
    split = split or split_modules(peft_model)
    base = _unwrap(peft_model)
    for name, module in list(_tuner_layers(peft_model, split.dropped(keep))):
        parent_name, _, child = name.rpartition(".")
        setattr(base.get_submodule(parent_name), child, module.get_base_layer())
    return _without_forward_patch(peft_model.merge_and_unload())


# --------------------------------------------------------------------------------------------------- full fine-tuning
def taia_state_dict(
    tuned: nn.Module, base_state: dict[str, torch.Tensor], keep: Keep = "attention", split: ModuleSplit | None = None
) -> dict[str, torch.Tensor]:
    """The tuned state dict with the dropped modules' tensors taken from the pre-trained `base_state`.

    Embeddings, norms and the LM head come from the tuned model, as in the paper's full fine-tuning variant.
    """
    _check_keep(keep)
    split = split or split_modules(tuned)
    dropped = split.dropped(keep)
    state = {name: tensor.detach().clone() for name, tensor in tuned.state_dict().items()}
    for name in state:
        module_name = name.rsplit(".", 1)[0]
        if module_name in dropped:
            if name not in base_state:
                raise KeyError(f"The pre-trained weights have no tensor {name}; are they of the same architecture?")
            state[name] = base_state[name].to(dtype=state[name].dtype, device=state[name].device).clone()
    return state


def base_tensors(model: nn.Module, split: ModuleSplit) -> dict[str, torch.Tensor]:
    """CPU copies of the attention and MLP tensors of a model (what a full-fine-tuning TAIA export restores)."""
    keep = set(split.attention) | set(split.mlp)
    return {
        name: tensor.detach().to("cpu", copy=True)
        for name, tensor in model.state_dict().items()
        if name.rsplit(".", 1)[0] in keep
    }


# --------------------------------------------------------------------------------------------------- export
def _check_keep(keep: str) -> None:
    if keep not in KEEP_CHOICES:
        raise ValueError(f"keep must be one of {KEEP_CHOICES}, got {keep!r}.")


MODEL_CARD = """---
library_name: transformers
tags: [robust_sft, taia, trl, sft]
base_model: {base}
---

# {title}

This model was fine-tuned with robust_sft's `TAIATrainer` and exported with **keep = `{keep}`**:
{what}

Method: TAIA, *Training All parameters but Inferring with only Attention*
([arXiv 2405.20192](https://arxiv.org/abs/2405.20192)). The fine-tune was {training}; at export only the kept
updates were merged into the pre-trained weights. It is a plain transformers model: load it with
`AutoModelForCausalLM.from_pretrained` (robust_sft is not needed).

- base model: `{base}`
- kept updates: {kept} modules; reset to pre-trained: {dropped} modules
"""

_KEEP_TEXT = {
    "attention": "only the attention updates are kept; every MLP weight is the pre-trained model's (TAIA).",
    "mlp": "only the MLP updates are kept; every attention weight is the pre-trained model's (TAIF ablation).",
    "all": "every update is kept (a plain merge, the vanilla baseline).",
}


def _write_export(
    model: PreTrainedModel,
    tokenizer: Any,
    output_dir: str | os.PathLike,
    keep: Keep,
    split: ModuleSplit,
    training: str,
) -> Path:
    """Write model, tokenizer and model card into `output_dir` atomically (temp folder, then rename)."""
    output_dir = Path(output_dir)
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}-", dir=output_dir.parent))
    try:
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        base = getattr(model.config, "_name_or_path", "") or "unknown"
        card = MODEL_CARD.format(
            base=base,
            title=f"TAIA export (keep={keep})",
            keep=keep,
            what=_KEEP_TEXT[keep],
            training=training,
            kept=len(split.names(keep)),
            dropped=len(split.dropped(keep)),
        )
        (tmp / "README.md").write_text(card)
        (tmp / "taia.json").write_text(
            json.dumps({"method": "TAIA", "paper": "arXiv:2405.20192", "keep": keep, "training": training}, indent=2)
        )
        if output_dir.exists():
            shutil.rmtree(output_dir)
        tmp.rename(output_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return output_dir


def export_taia(
    base_model: str | os.PathLike | PreTrainedModel,
    adapter: str | os.PathLike,
    output_dir: str | os.PathLike,
    keep: Keep = "attention",
    *,
    tokenizer: Any | None = None,
    dtype: torch.dtype = torch.float32,
    attention_modules: Sequence[str] | None = None,
    mlp_modules: Sequence[str] | None = None,
) -> Path:
    """Merge a saved LoRA adapter into its base model keeping only the `keep` updates, and save a plain model.

    Args:
        base_model: The pre-trained model (a hub id, a folder or a loaded full-precision model).
        adapter: A PEFT adapter folder trained on that base (e.g. `TAIATrainer.save_model` output).
        output_dir: Where the merged model, tokenizer and a model card go (written atomically).
        keep: `"attention"` (TAIA), `"mlp"` (TAIF) or `"all"` (plain merge).
        tokenizer: Saved next to the model; by default loaded from the adapter folder, else from the base.
        dtype: The dtype of the merge and of the saved weights when the base is loaded here.
        attention_modules: Override of the architecture's attention layers (name suffixes).
        mlp_modules: Override of the architecture's MLP layers (name suffixes).
    """
    from peft import PeftModel

    _check_keep(keep)
    if isinstance(base_model, (str, os.PathLike)):
        base_path = str(base_model)
        base_model = AutoModelForCausalLM.from_pretrained(base_path, dtype=dtype)
    else:
        base_path = getattr(base_model.config, "_name_or_path", None)
    if is_quantized(base_model):
        raise ValueError("export_taia needs the base model in full precision; pass its hub id or folder instead.")
    if tokenizer is None:
        source = adapter if (Path(adapter) / "tokenizer_config.json").is_file() else base_path
        tokenizer = AutoTokenizer.from_pretrained(source) if source else None
    split = split_modules(base_model, attention_modules, mlp_modules)
    peft_model = PeftModel.from_pretrained(base_model, str(adapter))
    merged = merge_taia(peft_model, keep, split)
    return _write_export(merged, tokenizer, output_dir, keep, split, training="LoRA")


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


class TAIATrainer(RobustSFTTrainer):
    """TAIA: train LoRA on all linear layers (or fully fine-tune), infer with the attention updates only.

    A drop-in for [`~trl.SFTTrainer`] (see [`RobustSFTTrainer`] for the shared data and model handling). With a
    `LoraConfig` whose `target_modules` is unset, LoRA goes on every attention and MLP linear layer (attention only
    for `train_modules="attention"`). Without a `peft_config` the model is fully fine-tuned.

    After training, `save_taia_model(output_dir)` writes a merged plain transformers model with only the kept updates,
    and `taia_view()` evaluates the same thing in memory.

    Paper: [TAIA, arXiv 2405.20192](https://arxiv.org/abs/2405.20192).
    """

    _tag_names = ["trl", "sft", "robust_sft", "taia"]
    _name = "TAIA"
    _paper = {
        "title": "Unlocking Continual Learning Abilities in Language Models",
        "id": "2405.20192",
        "citation": "@inproceedings{jiang2024taia, title={Unlocking Continual Learning Abilities in Language Models}, "
        "booktitle={NeurIPS}, year={2024}, eprint={2405.20192}, archivePrefix={arXiv}}",
    }

    def __init__(self, model=None, args: TAIAConfig | None = None, *pargs, peft_config=None, **kwargs):
        args = args if args is not None else TAIAConfig(output_dir="taia-output")
        if not isinstance(args, TAIAConfig):
            raise TypeError(f"TAIATrainer needs a TAIAConfig, got {type(args).__name__}.")
        if model is None or isinstance(model, (str, os.PathLike)):
            model, tokenizer = self._load_model(model, args, kwargs.pop("quantization_config", None))
            kwargs.setdefault("processing_class", tokenizer)
        self.module_split = split_modules(model, args.attention_modules, args.mlp_modules)
        if peft_config is not None:
            peft_config = self._target_lora(peft_config, args)
        elif is_quantized(model):
            raise ValueError("A 4/8-bit model cannot be fully fine-tuned: pass a LoraConfig as peft_config (QLoRA).")
        else:
            self._freeze_for_toa(model, args)
        self._base_state = (
            base_tensors(model, self.module_split) if peft_config is None and args.snapshot_base_weights else None
        )
        self._base_name = getattr(model.config, "_name_or_path", None)
        super().__init__(model, args, *pargs, peft_config=peft_config, **kwargs)

    def _target_lora(self, peft_config, args: TAIAConfig):
        wanted = self.module_split.lora_targets("all" if args.train_modules == "all" else "attention")
        if getattr(peft_config, "target_modules", None) is None:
            peft_config.target_modules = wanted
        elif args.train_modules == "attention":
            targets = peft_config.target_modules
            targets = [targets] if isinstance(targets, str) else list(targets)
            if "all-linear" in targets or any(_matches(name, targets) for name in self.module_split.mlp):
                raise ValueError(
                    "train_modules='attention' (TOA) but peft_config.target_modules reaches MLP layers "
                    f"({targets}). Leave target_modules unset and TAIATrainer picks the attention layers."
                )
        return peft_config

    def _freeze_for_toa(self, model: nn.Module, args: TAIAConfig) -> None:
        if args.train_modules != "attention":
            return
        for name in self.module_split.mlp:
            for parameter in model.get_submodule(name).parameters():
                parameter.requires_grad_(False)

    @property
    def is_lora(self) -> bool:
        """True when the trained model carries PEFT adapters."""
        return hasattr(self.model, "peft_config")

    def taia_view(self, keep: Keep | None = None):
        """Context manager: the trained (LoRA) model with only the `keep` updates active, in memory."""
        if not self.is_lora:
            raise ValueError("taia_view needs a LoRA model; for full fine-tuning use save_taia_model or taia_model().")
        return taia_view(self.model, keep or self.args.keep, self.module_split)

    def taia_model(self, keep: Keep | None = None) -> PreTrainedModel:
        """A new merged, plain model with only the `keep` updates (the trainer's model is left as it is)."""
        keep = keep or self.args.keep
        _check_keep(keep)
        if self.is_lora:
            if is_quantized(self.model):
                return self._merge_from_full_precision_base(keep)
            return merge_taia(_copy_model(self.model), keep, self.module_split)
        model = _copy_model(self.accelerator.unwrap_model(self.model))
        model.load_state_dict(taia_state_dict(model, self._pretrained_tensors(), keep, self.module_split))
        return model

    def _pretrained_tensors(self) -> dict[str, torch.Tensor]:
        if self._base_state is not None:
            return self._base_state
        if not self._base_name:
            raise ValueError("No pre-trained weights to restore: set snapshot_base_weights=True or train from a path.")
        logger.warning("Reloading the pre-trained weights from %s for the TAIA export.", self._base_name)
        return AutoModelForCausalLM.from_pretrained(self._base_name, dtype=torch.float32).state_dict()

    def _merge_from_full_precision_base(self, keep: Keep) -> PreTrainedModel:
        from peft import PeftModel

        if not self._base_name:
            raise ValueError(
                "The base model is quantized and its name_or_path is unknown; use export_taia(base, ...)."
            )
        logger.warning(
            "The base model is 4/8-bit quantized: reloading %s in full precision (float32) to merge the kept updates "
            "(merging into quantized weights would be lossy).",
            self._base_name,
        )
        with tempfile.TemporaryDirectory() as adapter_dir:
            self.model.save_pretrained(adapter_dir)
            base = AutoModelForCausalLM.from_pretrained(self._base_name, dtype=torch.float32)
            return merge_taia(PeftModel.from_pretrained(base, adapter_dir), keep, self.module_split)

    def save_taia_model(self, output_dir: str | os.PathLike, keep: Keep | None = None) -> Path:
        """Write a plain transformers model (safetensors, tokenizer, model card) with only the `keep` updates merged.

        The folder loads with `AutoModelForCausalLM.from_pretrained` alone. With a 4/8-bit base, the base is reloaded
        in full precision for the merge (logged); nothing is merged into quantized weights.
        """
        keep = keep or self.args.keep
        merged = self.taia_model(keep)
        if self.args.should_save:
            training = "LoRA" if self.is_lora else "full fine-tuning"
            if self.is_lora and is_quantized(self.model):
                training = "QLoRA (4/8-bit base; merged into the full-precision base)"
            return _write_export(merged, self.processing_class, output_dir, keep, self.module_split, training)
        return Path(output_dir)
