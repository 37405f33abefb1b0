"""TAIATrainer: train attention and MLP (LoRA or full fine-tuning), infer with the attention updates only."""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import torch
from peft import PeftModel
from torch import nn
from transformers import AutoModelForCausalLM, PreTrainedModel

from ..methods import TAIA_PAPER
from ..modeling import is_quantized
from ..trainer import RobustSFTTrainer
from .adapter import export_taia_adapter
from .config import TAIAConfig
from .export import (
    DEFAULT_SHARD_SIZE,
    TensorSource,
    _lora_source,
    atomic_folder,
    base_tensors,
    check_output_dir,
    export_source,
    write_taia_folder,
)
from .lora import is_peft_model
from .modules import Keep, _check_keep, _matches, dropped_groups, split_modules
from .view import taia_view

logger = logging.getLogger(__name__)


class TAIATrainer(RobustSFTTrainer):
    """TAIA: train LoRA on all attention and MLP weights (or fully fine-tune), infer with the attention updates only.

    Overrides of the base: `_prepare_model` (LoRA targets, TOA freezing, the pre-trained snapshot), `evaluation_loop`
    (the `eval_keep` view) and `save_model` (documentation only); TAIA itself acts at export.

    A drop-in for [`~trl.SFTTrainer`] (see [`RobustSFTTrainer`] for the shared data and model handling). With a
    `LoraConfig` whose `target_modules` is unset, LoRA goes on every attention and MLP weight matrix: the linear
    layers through `target_modules`, and the fused 3-D experts and the routers of MoE models (transformers 5)
    through PEFT's `target_parameters`, which needs `lora_dropout=0`. Without a `peft_config` the model is fully
    fine-tuned.

    After training:
    - `save_taia_model(dir)` writes a plain transformers model with only the kept updates, tensor by tensor;
    - `save_taia_adapter(dir)` writes the LoRA adapter with only the kept updates (for PEFT and LoRA servers);
    - `taia_view()` runs the same model in memory; `TAIAConfig(eval_keep="attention")` evaluates through it.

    Paper: [TAIA, NeurIPS 2024, arXiv 2405.20192](https://arxiv.org/abs/2405.20192).
    """

    _tag_names = ["trl", "sft", "robust_sft", "taia"]
    _name = "TAIA"
    _paper = TAIA_PAPER.as_trl_paper()

    def __init__(self, model=None, args: TAIAConfig | None = None, *pargs, peft_config=None, **kwargs):
        args = args if args is not None else TAIAConfig(output_dir="taia-output")
        if not isinstance(args, TAIAConfig):
            raise TypeError(f"TAIATrainer needs a TAIAConfig, got {type(args).__name__}.")
        # The base loads the model after checking the output folder and the rows; `_prepare_model` does the rest.
        super().__init__(model, args, *pargs, peft_config=peft_config, **kwargs)

    def _prepare_model(self, model, processing_class, args: TAIAConfig, kwargs):
        """The attention / MLP split, the LoRA targets (`kwargs["peft_config"]`), TOA freezing and the snapshot of
        the pre-trained tensors a full-fine-tuning export restores."""
        self.module_split = split_modules(model, args.attention_modules, args.mlp_modules)
        peft_config = kwargs.get("peft_config")
        if peft_config is not None:
            kwargs["peft_config"] = self._target_lora(peft_config, args)
        elif is_peft_model(model):
            pass  # a PEFT model passed in: a LoRA run with the adapters it carries
        elif is_quantized(model):
            raise ValueError("A 4/8-bit model cannot be fully fine-tuned: pass a LoraConfig as peft_config (QLoRA).")
        else:
            self._freeze_for_toa(model, args)
        self._base_state = None
        if peft_config is None and not is_peft_model(model) and args.snapshot_base_weights:
            dropped = {group for keep in (args.keep, args.eval_keep) if keep for group in dropped_groups(keep)}
            self._base_state = base_tensors(model, [n for g in sorted(dropped) for n in getattr(self.module_split, g)])
        self._base_name = getattr(model.config, "_name_or_path", None)
        return model

    # ----------------------------------------------------------------------------------------------- set-up
    def _target_lora(self, peft_config, args: TAIAConfig):
        which = "all" if args.train_modules == "all" else "attention"
        split = self.module_split
        unset = getattr(peft_config, "target_modules", None) is None
        if unset and not getattr(peft_config, "target_parameters", None):
            parameters = split.lora_target_parameters(which)
            if parameters and peft_config.lora_dropout:
                raise ValueError(
                    f"This model's MLP holds fused parameters ({', '.join(parameters)}: MoE experts and routers) that "
                    "PEFT adapts through `target_parameters`, which does not support lora_dropout. Set "
                    "LoraConfig(lora_dropout=0.0), or set target_modules yourself to leave them untrained."
                )
            peft_config.target_modules = split.lora_targets(which)
            peft_config.target_parameters = parameters or None
        elif args.train_modules == "attention":
            targets = peft_config.target_modules or []
            targets = [targets] if isinstance(targets, str) else list(targets)
            modules = split.linear_modules.get("mlp", [])
            reached = "all-linear" in targets or any(_matches(name, targets) for name in modules)
            reached |= any(_matches(n, peft_config.target_parameters or []) for n in split.fused_parameters["mlp"])
            if reached:
                raise ValueError(
                    "train_modules='attention' (TOA) but peft_config.target_modules / target_parameters reach MLP "
                    f"parameters ({targets}). Leave them unset and TAIATrainer picks the attention layers."
                )
        return peft_config

    def _freeze_for_toa(self, model: nn.Module, args: TAIAConfig) -> None:
        """TOA with full fine-tuning: only the attention parameters train (MLP, embeddings, norms outside
        attention and the LM head are frozen)."""
        if args.train_modules != "attention":
            return
        attention = set(self.module_split.attention)
        for name, parameter in model.named_parameters():
            parameter.requires_grad_(name in attention)

    @property
    def is_lora(self) -> bool:
        """True when the trained model carries PEFT adapters."""
        return hasattr(self.model, "peft_config")

    @property
    def _plain_model(self) -> nn.Module:
        return self.accelerator.unwrap_model(self.model)

    # ----------------------------------------------------------------------------------------------- views
    def taia_view(self, keep: Keep | None = None):
        """Context manager: the trained model computing what the `keep` export computes, in memory.

        LoRA: the dropped adapters are switched off. Full fine-tuning: the dropped parameters point at the
        pre-trained tensors (from the snapshot, or reloaded) until the block ends."""
        keep = keep or self.args.keep
        _check_keep(keep)
        if self.is_lora:
            return taia_view(self.model, keep, self.module_split)
        return taia_view(self._plain_model, keep, self.module_split, self._pretrained_tensors(keep))

    def evaluation_loop(self, *args, **kwargs):
        """`Trainer.evaluation_loop`, run under `taia_view(args.eval_keep)` when `eval_keep` is set."""
        if self.args.eval_keep is None:
            return super().evaluation_loop(*args, **kwargs)
        with self.taia_view(self.args.eval_keep):
            return super().evaluation_loop(*args, **kwargs)

    # ----------------------------------------------------------------------------------------------- exports
    def save_model(self, output_dir: str | None = None, _internal_call: bool = False):
        """Save what was trained, as `SFTTrainer.save_model` does: the **vanilla** LoRA adapter (every update,
        attention and MLP) or, with full fine-tuning, the fully fine-tuned model; the model card is tagged `taia`
        and cites the paper. This is the training artefact, not the TAIA model: `save_taia_model` writes the merged
        model with only the kept updates, `save_taia_adapter` the adapter with only the kept updates."""
        return super().save_model(output_dir, _internal_call)

    def _pretrained_tensors(self, keep: Keep) -> Mapping[str, torch.Tensor]:
        """The pre-trained tensors of the parameters `keep` drops (full fine-tuning)."""
        names = self.module_split.dropped(keep)
        if self._base_state is not None and all(name in self._base_state for name in names):
            return self._base_state
        if not self._base_name:
            raise ValueError(
                "No pre-trained weights to restore: set snapshot_base_weights=True (with keep / eval_keep set to what "
                "you export) or train a model loaded from a path."
            )
        dtype = next(self._plain_model.parameters()).dtype
        logger.warning("Reloading the pre-trained weights from %s (%s) for TAIA.", self._base_name, dtype)
        reloaded = AutoModelForCausalLM.from_pretrained(self._base_name, dtype=dtype)
        wanted = set(names)
        return {name: tensor for name, tensor in reloaded.state_dict().items() if name in wanted}

    @contextmanager
    def _export_source(self, keep: Keep) -> Iterator[TensorSource]:
        if not self.is_lora:
            pretrained = self._pretrained_tensors(keep) if keep != "all" else {}
            yield export_source(self._plain_model, keep, self.module_split, pretrained)
        elif not is_quantized(self.model):
            yield _lora_source(self.model, keep, self.module_split)
        else:  # QLoRA: never merge into quantized weights
            if not self._base_name:
                raise ValueError("The base model is quantized and its name_or_path is unknown; use export_taia.")
            logger.warning(
                "The base model is 4/8-bit quantized: reloading %s in its own dtype to merge the kept updates "
                "(merging into quantized weights would be lossy).",
                self._base_name,
            )
            with tempfile.TemporaryDirectory() as adapter_dir:
                self.model.save_pretrained(adapter_dir)
                base = AutoModelForCausalLM.from_pretrained(self._base_name, dtype="auto")
                yield _lora_source(PeftModel.from_pretrained(base, adapter_dir), keep, self.module_split)

    def _write(self, directory: Path, keep: Keep, max_shard_size: int | str) -> None:
        training = "LoRA" if self.is_lora else "full fine-tuning"
        if self.is_lora and is_quantized(self.model):
            training = "QLoRA (4/8-bit base; merged into the base loaded in its own dtype)"
        with self._export_source(keep) as source:
            write_taia_folder(
                source, directory, keep, self.module_split, tokenizer=self.processing_class, training=training,
                max_shard_size=max_shard_size,
            )  # fmt: skip

    def save_taia_model(
        self,
        output_dir: str | os.PathLike,
        keep: Keep | None = None,
        *,
        overwrite: bool = False,
        max_shard_size: int | str = DEFAULT_SHARD_SIZE,
    ) -> Path:
        """Write a plain transformers model (safetensors shards, config, tokenizer, model card) with only the `keep`
        updates merged, tensor by tensor: peak memory beyond the trained model is one shard, and the dtype is the
        model's own. Only the main process writes; every process waits for it.

        The folder loads with `AutoModelForCausalLM.from_pretrained` alone. With a 4/8-bit base, the base is reloaded
        in its own dtype for the merge (logged); nothing is merged into quantized weights. A folder that is not
        empty is refused unless `overwrite=True`, and the run's own `output_dir` (or a folder holding it) always.
        """
        keep = keep or self.args.keep
        _check_keep(keep)
        output_dir = check_output_dir(output_dir, overwrite, protected=[self.args.output_dir])
        if self.accelerator.is_main_process:
            with atomic_folder(output_dir) as tmp:
                self._write(tmp, keep, max_shard_size)
        self.accelerator.wait_for_everyone()
        return output_dir

    def save_taia_adapter(
        self, output_dir: str | os.PathLike, keep: Keep | None = None, *, overwrite: bool = False
    ) -> Path:
        """Write the trained LoRA adapter with only the `keep` updates (the MLP, expert and router adapters removed
        for TAIA): a PEFT adapter folder that `PeftModel.from_pretrained(base, output_dir)` loads on the untouched
        base model, and that LoRA servers read (see `export_taia_adapter`). Only the main process writes."""
        keep = keep or self.args.keep
        _check_keep(keep)
        if not self.is_lora:
            raise ValueError("save_taia_adapter needs a LoRA run; a full fine-tune exports with save_taia_model.")
        output_dir = check_output_dir(output_dir, overwrite, protected=[self.args.output_dir])
        if self.accelerator.is_main_process:
            with tempfile.TemporaryDirectory() as adapter_dir:
                self.model.save_pretrained(adapter_dir)
                if self.processing_class is not None:
                    self.processing_class.save_pretrained(adapter_dir)
                export_taia_adapter(
                    adapter_dir, output_dir, keep, attention_modules=self.args.attention_modules,
                    mlp_modules=self.args.mlp_modules, overwrite=overwrite,
                )  # fmt: skip
        self.accelerator.wait_for_everyone()
        return output_dir

    def taia_model(self, keep: Keep | None = None) -> PreTrainedModel:
        """A new plain model on the CPU with only the `keep` updates (the trainer's model is left as it is).

        Built from the same tensors as `save_taia_model` (written to a temporary folder and loaded back), so it is
        one model copy in the model's dtype."""
        keep = keep or self.args.keep
        _check_keep(keep)
        with tempfile.TemporaryDirectory() as directory:
            folder = Path(directory) / "model"
            with atomic_folder(folder) as tmp:
                self._write(tmp, keep, DEFAULT_SHARD_SIZE)
            return AutoModelForCausalLM.from_pretrained(folder, dtype="auto")
