"""SafetyRealignTrainer: a DPO-trained mask over a fine-tune's task vector."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset
from peft import PeftModel
from transformers import PreTrainedModel
from trl import DPOTrainer

from ..methods import REALIGN_PAPER
from ..trl_internals import copy_model
from .config import SafetyRealignConfig
from .masks import attach_masks, mask_report, remove_masks
from .preferences import load_preference_pairs
from .task_vectors import apply_task_vector

logger = logging.getLogger(__name__)


REPORT_FILE = "realign_report.json"


class SafetyRealignTrainer(DPOTrainer):
    """[`~trl.DPOTrainer`] that trains only a mask over a fine-tune's task vector, on safety preference pairs.

    Overrides of [`~trl.DPOTrainer`]: `__init__` only (masks attached, the reference built); the rest is DPO.

    Args:
        model: The **safe** model (`W_safe`): a transformers model, or a `PeftModel` carrying the safe adapter (LoRA
            mode, the task vector then holds `lora_A` / `lora_B` differences).
        task_vector: `{name: W_ft - W_safe}` from [`task_vector_from_models`] or [`task_vector_from_adapters`].
        ref_model: DPO's reference. Default: the unmasked fine-tuned model (a copy of `model` plus the task vector; in
            LoRA mode merged into a plain model, as is a `PeftModel` given here).
        train_dataset: Preference pairs (`prompt` / `chosen` / `rejected`), e.g. from [`load_hh_rlhf`].

    Every model weight is frozen; the optimiser sees only the mask logits. [`export`] writes the realigned model (or
    adapter) with the deterministic mask and a report of the kept fraction per tensor.
    """

    _tag_names = ["trl", "dpo", "robust_sft", "realign", "safety-realignment"]
    _name = "Safety realignment"
    _paper = REALIGN_PAPER.as_trl_paper()

    def __init__(
        self,
        model: PreTrainedModel | PeftModel,
        task_vector: dict[str, torch.Tensor],
        ref_model: PreTrainedModel | PeftModel | None = None,
        args: SafetyRealignConfig | None = None,
        train_dataset: Dataset | str | os.PathLike | None = None,
        eval_dataset: Dataset | None = None,
        processing_class: Any | None = None,
        **kwargs: Any,
    ):
        args = args if args is not None else SafetyRealignConfig(output_dir="realign-output")
        if not isinstance(args, SafetyRealignConfig):
            raise TypeError(f"SafetyRealignTrainer needs a SafetyRealignConfig, got {type(args).__name__}.")
        if kwargs.get("peft_config") is not None:
            raise ValueError("SafetyRealignTrainer trains a mask, not an adapter: do not pass peft_config.")
        if not task_vector:
            raise ValueError("The task vector is empty: nothing to realign.")
        if ref_model is None:
            # The unmasked fine-tuned model; copied before TRL patches the forward (a copy would keep the patch).
            ref_model = apply_task_vector(copy_model(model), task_vector)
        if isinstance(ref_model, PeftModel):
            # TRL's fused LM head patches the reference's own forward, which must be a transformers model's.
            ref_model = ref_model.merge_and_unload()
        if isinstance(train_dataset, (str, os.PathLike)):
            train_dataset = load_preference_pairs(train_dataset)
        self.masks = attach_masks(
            model,
            task_vector,
            granularity=args.mask_granularity,
            temperature=args.mask_temperature,
            init_logit=args.mask_init_logit,
            export_mode=args.export_mode,
        )
        super().__init__(
            model=model,
            ref_model=ref_model,
            args=args,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            **kwargs,
        )

    def mask_report(self) -> dict[str, Any]:
        """Kept fraction of the task vector, overall and per tensor, under the export mask."""
        return mask_report(self.masks)

    def export(
        self, output_dir: str | os.PathLike, export_mode: str | None = None, merge: bool = False
    ) -> dict[str, Any]:
        """Write the realigned model (LoRA mode: the realigned adapter, or with `merge=True` the merged model) and
        `realign_report.json`; return the report.

        The masks are baked into the trainer's model, which becomes the plain realigned model (no more training).
        """
        output_dir = Path(output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
        mode = export_mode or self.args.export_mode
        for mask in self.masks.values():
            mask.export_mode = mode
        report = {"export_mode": mode, **self.mask_report()}
        model = self.accelerator.unwrap_model(self.model)
        remove_masks(model, self.masks, mode)
        if merge and isinstance(model, PeftModel):
            model = model.merge_and_unload()
        model.save_pretrained(str(output_dir))
        if self.processing_class is not None:
            self.processing_class.save_pretrained(str(output_dir))
        temporary = output_dir / f".{REPORT_FILE}.tmp"
        temporary.write_text(json.dumps(report, indent=2))
        os.replace(temporary, output_dir / REPORT_FILE)
        logger.info(
            "Realigned model written to %s (kept %.1f%% of the task vector).",
            output_dir,
            100 * report["kept_fraction"],
        )
        return report
