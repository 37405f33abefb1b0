"""TAIATrainer: train LoRA on every linear layer, infer with the attention updates only."""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

import torch
from torch import nn
from transformers import AutoModelForCausalLM, PreTrainedModel

from ..methods import TAIA_PAPER
from ..modeling import is_quantized
from ..trainer import RobustSFTTrainer
from ..trl_internals import copy_model
from .config import TAIAConfig
from .export import _write_export, base_tensors, merge_taia, taia_state_dict, taia_view
from .modules import Keep, _check_keep, _matches, split_modules

logger = logging.getLogger(__name__)


class TAIATrainer(RobustSFTTrainer):
    """TAIA: train LoRA on all linear layers (or fully fine-tune), infer with the attention updates only.

    Overrides of the base: `__init__` only (LoRA targets, TOA freezing); TAIA acts at export (`save_taia_model`).

    A drop-in for [`~trl.SFTTrainer`] (see [`RobustSFTTrainer`] for the shared data and model handling). With a
    `LoraConfig` whose `target_modules` is unset, LoRA goes on every attention and MLP linear layer (attention only
    for `train_modules="attention"`). Without a `peft_config` the model is fully fine-tuned.

    After training, `save_taia_model(output_dir)` writes a merged plain transformers model with only the kept updates,
    and `taia_view()` evaluates the same thing in memory.

    Paper: [TAIA, arXiv 2405.20192](https://arxiv.org/abs/2405.20192).
    """

    _tag_names = ["trl", "sft", "robust_sft", "taia"]
    _name = "TAIA"
    _paper = TAIA_PAPER.as_trl_paper()

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
            return merge_taia(copy_model(self.model), keep, self.module_split)
        model = copy_model(self.accelerator.unwrap_model(self.model))
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
