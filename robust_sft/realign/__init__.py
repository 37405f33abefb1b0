"""Safety realignment by subspace-oriented model fusion (Yi et al. 2024, arXiv 2405.09055).

Fine-tuning an aligned model, even on benign data, erodes its safety. Treat the fine-tune as a task vector
`tau = W_ft - W_safe` and learn a mask `m` over it that keeps the task-useful part and drops the part that breaks
safety: the realigned weights are `W_safe + m * tau / mean(m)` (per tensor). The mask is a Concrete (relaxed
Bernoulli) variable per element (or per row, or per tensor), trained with DPO on safety preference pairs while every
model weight stays frozen ([`SafetyRealignTrainer`]). Several masked task vectors can then be fused with PEFT's
merge utilities (task arithmetic, TIES, DARE, magnitude pruning).

The mask is attached with `torch.nn.utils.parametrize` (public torch API): each masked weight is computed from the
frozen original and its mask on access, so the model stays an ordinary transformers / PEFT model that TRL's
`DPOTrainer` (fused LM head included) drives unchanged.

Files: `task_vectors.py`, `masks.py` (the masks, saved and loaded as safetensors), `fusion.py` (fusion and RESTA),
`safelora.py` (the SafeLoRA baseline), `preferences.py` (safety preference data), `config.py`, `trainer.py`.
"""

from .config import SafetyRealignConfig
from .fusion import FUSION_DEFAULTS, FUSION_METHODS, fuse_task_vectors, masked_task_vector, resta
from .masks import (
    GRANULARITIES,
    MASKS_FILE,
    ConcreteMask,
    apply_mask,
    attach_masks,
    exported_state_dict,
    load_masks,
    mask_report,
    mask_values,
    masks_forced_to_one,
    remove_masks,
    save_masks,
    scaled_mask,
)
from .preferences import hh_to_preference, load_hh_rlhf, load_preference_pairs, parse_hh_dialogue
from .safelora import SafeLoRAReport, alignment_projection, safe_lora
from .task_vectors import (
    TaskVector,
    apply_task_vector,
    check_lora_compatibility,
    combine_task_vectors,
    task_vector_from_adapters,
    task_vector_from_models,
    zero_adapter,
)
from .trainer import REPORT_FILE, SafetyRealignTrainer, UnmaskedReference

__all__ = [
    "FUSION_DEFAULTS",
    "FUSION_METHODS",
    "GRANULARITIES",
    "MASKS_FILE",
    "REPORT_FILE",
    "ConcreteMask",
    "SafeLoRAReport",
    "SafetyRealignConfig",
    "SafetyRealignTrainer",
    "TaskVector",
    "UnmaskedReference",
    "alignment_projection",
    "apply_mask",
    "apply_task_vector",
    "attach_masks",
    "check_lora_compatibility",
    "combine_task_vectors",
    "exported_state_dict",
    "fuse_task_vectors",
    "hh_to_preference",
    "load_hh_rlhf",
    "load_masks",
    "load_preference_pairs",
    "mask_report",
    "mask_values",
    "masked_task_vector",
    "masks_forced_to_one",
    "parse_hh_dialogue",
    "remove_masks",
    "resta",
    "safe_lora",
    "save_masks",
    "scaled_mask",
    "task_vector_from_adapters",
    "task_vector_from_models",
    "zero_adapter",
]
