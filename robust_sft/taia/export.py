"""TAIA views and exports: LoRA merges and full fine-tunes with only the kept updates."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from ..modeling import is_quantized
from ..trl_internals import unwrap_peft, without_forward_patch
from .modules import Keep, ModuleSplit, _check_keep, split_modules


def _tuner_layers(peft_model: nn.Module, names: Sequence[str]) -> Iterator[tuple[str, nn.Module]]:
    from peft.tuners.tuners_utils import BaseTunerLayer

    base = unwrap_peft(peft_model)
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
    base = unwrap_peft(peft_model)
    for name, module in list(_tuner_layers(peft_model, split.dropped(keep))):
        parent_name, _, child = name.rpartition(".")
        setattr(base.get_submodule(parent_name), child, module.get_base_layer())
    return without_forward_patch(peft_model.merge_and_unload())


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
