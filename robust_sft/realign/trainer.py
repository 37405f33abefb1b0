"""SafetyRealignTrainer: a DPO-trained mask over a fine-tune's task vector."""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset
from peft import PeftModel
from torch import nn
from transformers import PreTrainedModel
from trl import DPOTrainer

from ..methods import REALIGN_PAPER
from .config import SafetyRealignConfig
from .masks import (
    MASK_DTYPES,
    MASKS_FILE,
    ConcreteMask,
    MaskSet,
    _parametrized,
    attach_masks,
    exported_state_dict,
    load_masks,
    mask_report,
    masks_forced_to_one,
    remove_masks,
    save_masks,
)
from .preferences import load_preference_pairs
from .task_vectors import check_lora_compatibility, combine_task_vectors

logger = logging.getLogger(__name__)


REPORT_FILE = "realign_report.json"


# Files that mark a folder as holding an export (a model, an adapter or a realignment report).
_EXPORT_FILES = (
    "config.json",
    "model.safetensors",
    "model.safetensors.index.json",
    "adapter_config.json",
    "adapter_model.safetensors",
    REPORT_FILE,
    MASKS_FILE,
)


# ------------------------------------------------------------------------------------------------ the reference
class UnmaskedReference(nn.Module):
    """DPO's reference without a second model: the trainer's own model with every mask forced to 1, i.e. the
    unmasked fine-tune `W_ft`, computed through the same model.

    The policy is held outside the module tree (no parameters of its own, nothing moved or copied by `.to()` or
    `accelerate`); TRL's fused LM head patch on this wrapper is unused, since the call goes to the policy, which
    carries its own patch. `state_dict()` exposes the policy's weights and the masks' `W_ft`, which TRL hashes to key
    its `precompute_ref_log_probs` cache.
    """

    def __init__(self, model: nn.Module, masks: Mapping[str, ConcreteMask]):
        super().__init__()
        self.__dict__["policy"] = model
        self.__dict__["masks"] = masks
        self.config = model.config

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        with masks_forced_to_one(self.masks):
            return self.policy(*args, **kwargs)

    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, torch.Tensor]:
        state = dict(self.policy.state_dict())
        state.update({f"finetuned.{name}": mask.finetuned for name, mask in self.masks.items()})
        return state


# ------------------------------------------------------------------------------------------------ writing folders
def _has_export(folder: Path) -> bool:
    return folder.is_dir() and any((folder / name).exists() for name in _EXPORT_FILES)


def write_folder_atomically(output_dir: str | os.PathLike, write: Callable[[Path], None], overwrite: bool) -> Path:
    """Run `write(folder)` into a temporary sibling folder, then move the result to `output_dir`.

    A missing or empty `output_dir` is replaced in one rename. A folder holding other files (checkpoints, logs) keeps
    them: the new files are moved in one by one with `os.replace`, the realignment report last. A folder that already
    holds an export raises unless `overwrite=True`.
    """
    output_dir = Path(output_dir)
    if _has_export(output_dir) and not overwrite:
        raise FileExistsError(
            f"{output_dir} already holds an exported model; pass overwrite=True or choose another folder."
        )
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    temporary = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.", dir=output_dir.parent))
    try:
        write(temporary)
        if output_dir.is_dir() and not any(output_dir.iterdir()):
            output_dir.rmdir()
        if not output_dir.exists():
            os.replace(temporary, output_dir)
            return output_dir
        entries = sorted(temporary.iterdir(), key=lambda entry: entry.name == REPORT_FILE)
        for entry in entries:
            target = output_dir / entry.name
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target)
            os.replace(entry, target)
    finally:
        shutil.rmtree(temporary, ignore_errors=True)
    return output_dir


def _write_json(path: Path, value: Any) -> None:
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(json.dumps(value, indent=2))
    os.replace(temporary, path)


# ------------------------------------------------------------------------------------------------ the trainer
class SafetyRealignTrainer(DPOTrainer):
    """[`~trl.DPOTrainer`] that trains only a mask over a fine-tune's task vector, on safety preference pairs.

    Overrides of [`~trl.DPOTrainer`]: `__init__` (masks attached, the reference set up), `_save` (what
    `save_model()`, checkpoints and `push_to_hub()` write), `_load_from_checkpoint` / `_load_best_model` (the mask
    logits come back); the rest is DPO.

    Args:
        model: The **safe** model (`W_safe`): a transformers model, or a `PeftModel` carrying the safe adapter (LoRA
            mode, the task vector then holds `lora_A` / `lora_B` differences).
        task_vector: `{name: W_ft - W_safe}` from [`task_vector_from_models`] or [`task_vector_from_adapters`]; or a
            list of such vectors, trained under one shared mask (weights: `args.task_vector_weights`, default their
            mean).
        ref_model: DPO's reference. Default: the unmasked fine-tune `W_ft`, computed through `model` itself
            with every mask forced to 1 (no second copy). A model given here is frozen (and merged if a `PeftModel`).
        train_dataset: Preference pairs (`prompt` / `chosen` / `rejected`), e.g. from [`load_hh_rlhf`].
        masks: A masks file or a folder written by `save_model()` / [`save_masks`]: start from those logits (to
            continue training).

    Every model weight is frozen; the optimiser sees only the mask logits. `save_model()` writes the realigned model
    (or adapter) under the current export mask, loadable with plain `from_pretrained`, plus the mask logits
    (`realign_masks.safetensors`); [`export`] bakes the mask into the model and writes it with a report of the kept
    fraction per tensor.
    """

    _tag_names = ["trl", "dpo", "robust_sft", "realign", "safety-realignment"]
    _name = "Safety realignment"
    _paper = REALIGN_PAPER.as_trl_paper()

    def __init__(
        self,
        model: PreTrainedModel | PeftModel,
        task_vector: Mapping[str, torch.Tensor] | Sequence[Mapping[str, torch.Tensor]],
        ref_model: PreTrainedModel | PeftModel | None = None,
        args: SafetyRealignConfig | None = None,
        train_dataset: Dataset | str | os.PathLike | None = None,
        eval_dataset: Dataset | None = None,
        processing_class: Any | None = None,
        masks: str | os.PathLike | None = None,
        **kwargs: Any,
    ):
        args = args if args is not None else SafetyRealignConfig(output_dir="realign-output")
        if not isinstance(args, SafetyRealignConfig):
            raise TypeError(f"SafetyRealignTrainer needs a SafetyRealignConfig, got {type(args).__name__}.")
        if kwargs.get("peft_config") is not None:
            raise ValueError("SafetyRealignTrainer trains a mask, not an adapter: do not pass peft_config.")
        if args.deepspeed or args.fsdp:
            raise ValueError(
                "SafetyRealignTrainer does not run under DeepSpeed or FSDP: the masks are torch parametrizations of "
                "whole weights, which sharding replaces. Use DDP (one model per device)."
            )
        vector = self._task_vector(task_vector, args)
        self._check_model(model, vector)
        if ref_model is not None:
            if isinstance(ref_model, PeftModel):
                # TRL's fused LM head patches the reference's own forward, which must be a transformers model's.
                ref_model = ref_model.merge_and_unload()
            ref_model.requires_grad_(False)
        if isinstance(train_dataset, (str, os.PathLike)):
            train_dataset = load_preference_pairs(train_dataset)
        self.masks: MaskSet = attach_masks(
            model,
            vector,
            granularity=args.mask_granularity,
            temperature=args.mask_temperature,
            init_logit=args.mask_init_logit,
            export_mode=args.export_mode,
            dtype=MASK_DTYPES[args.mask_dtype],
            unmasked=args.unmasked_parameters,
        )
        if not self.masks:
            raise ValueError(
                f"unmasked_parameters={args.unmasked_parameters!r} matches every task-vector tensor: nothing to train."
            )
        if masks is not None:
            load_masks(masks, into=self.masks)
        self._exported = False
        super().__init__(
            model=model,
            ref_model=ref_model if ref_model is not None else UnmaskedReference(model, self.masks),
            args=args,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            **kwargs,
        )

    @staticmethod
    def _task_vector(
        task_vector: Mapping[str, torch.Tensor] | Sequence[Mapping[str, torch.Tensor]], args: SafetyRealignConfig
    ) -> Mapping[str, torch.Tensor]:
        """One vector (several are combined under the shared mask)."""
        vectors = [task_vector] if isinstance(task_vector, Mapping) else list(task_vector)
        if not vectors or not all(vectors):
            raise ValueError("The task vector is empty: nothing to realign.")
        if len(vectors) == 1 and args.task_vector_weights is None:
            return vectors[0]
        return combine_task_vectors(vectors, args.task_vector_weights)

    @staticmethod
    def _check_model(model: nn.Module, vector: Mapping[str, torch.Tensor]) -> None:
        """Clear errors for a LoRA vector on a plain model, and LoRA settings that differ from the model's adapter."""
        is_lora_vector = any(".lora_A." in name or ".lora_B." in name for name in vector)
        if is_lora_vector and not isinstance(model, PeftModel):
            raise ValueError(
                "The task vector holds LoRA tensors but the model is not a PeftModel: pass the safe model with the "
                "safe adapter (PeftModel.from_pretrained(base, adapter); zero_adapter() when the safe model is the "
                "base)."
            )
        settings = getattr(vector, "lora_config", None)
        if settings is not None and isinstance(model, PeftModel):
            check_lora_compatibility(
                settings, model.peft_config[model.active_adapter], names=["the task vector", "the model's adapter"]
            )

    # -------------------------------------------------------------------------------------------- reports and files
    def mask_report(self) -> dict[str, Any]:
        """Kept fraction of the task vector, overall and per tensor, under the export mask."""
        return mask_report(self.masks)

    def _masked(self) -> bool:
        return not self._exported and bool(_parametrized(self.accelerator.unwrap_model(self.model)))

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        """Write the realigned model under the current export mask (plain weights: no `parametrizations.*` keys; an
        adapter in LoRA mode), the tokenizer and training args, plus the mask logits (`realign_masks.safetensors`)
        and the kept-fraction report, from which training continues (`masks=` or `resume_from_checkpoint`)."""
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        masked = self._masked()
        if masked:
            model = self.accelerator.unwrap_model(self.model)
            state_dict = exported_state_dict(model, self.masks, self.args.export_mode)
        super()._save(output_dir, state_dict=state_dict)
        if masked and self.args.should_save:
            save_masks(self.masks, Path(output_dir) / MASKS_FILE)
            _write_json(Path(output_dir) / REPORT_FILE, {"export_mode": self.args.export_mode, **self.mask_report()})

    def _load_masks_from(self, folder: str | os.PathLike) -> None:
        if not (Path(folder) / MASKS_FILE).is_file():
            raise FileNotFoundError(
                f"{folder} holds no {MASKS_FILE}: not a checkpoint of SafetyRealignTrainer, whose checkpoints carry "
                "the mask logits beside the realigned weights."
            )
        load_masks(folder, into=self.masks)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        self._load_masks_from(resume_from_checkpoint)

    def _load_best_model(self) -> None:
        self._load_masks_from(self.state.best_model_checkpoint)

    def export(
        self,
        output_dir: str | os.PathLike,
        export_mode: str | None = None,
        merge: bool = False,
        overwrite: bool = False,
    ) -> dict[str, Any]:
        """Write the realigned model (LoRA mode: the realigned adapter, or with `merge=True` the merged model) and
        `realign_report.json`; return the report.

        The masks are baked into the trainer's model, which becomes the plain realigned model (no more training).
        Only the main process writes, into a temporary folder moved into place at the end; a folder that already
        holds an export raises unless `overwrite=True` (checked before anything changes).
        """
        output_dir = Path(output_dir)
        if _has_export(output_dir) and not overwrite:
            raise FileExistsError(
                f"{output_dir} already holds an exported model; pass overwrite=True or choose another folder."
            )
        mode = export_mode or self.args.export_mode
        for mask in self.masks.values():
            mask.export_mode = mode
        report = {"export_mode": mode, **self.mask_report()}
        model = self.accelerator.unwrap_model(self.model)
        remove_masks(model, self.masks, mode)
        self._exported = True
        if merge and isinstance(model, PeftModel):
            model = model.merge_and_unload()

        def write(folder: Path) -> None:
            model.save_pretrained(str(folder))
            if self.processing_class is not None:
                self.processing_class.save_pretrained(str(folder))
            (folder / REPORT_FILE).write_text(json.dumps(report, indent=2))

        if self.accelerator.is_main_process:
            write_folder_atomically(output_dir, write, overwrite)
            logger.info(
                "Realigned model written to %s (kept %.1f%% of the task vector).",
                output_dir,
                100 * report["kept_fraction"],
            )
        self.accelerator.wait_for_everyone()
        return report
