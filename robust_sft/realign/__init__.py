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

Files: `task_vectors.py`, `masks.py`, `fusion.py` (fusion and RESTA), `preferences.py` (safety preference data),
`config.py`, `trainer.py`.
"""

from .config import SafetyRealignConfig
from .fusion import FUSION_DEFAULTS, FUSION_METHODS, fuse_task_vectors, masked_task_vector, resta
from .masks import GRANULARITIES, ConcreteMask, attach_masks, mask_report, remove_masks, scaled_mask
from .preferences import hh_to_preference, load_hh_rlhf, load_preference_pairs, parse_hh_dialogue
from .task_vectors import apply_task_vector, task_vector_from_adapters, task_vector_from_models, zero_adapter
from .trainer import REPORT_FILE, SafetyRealignTrainer

__all__ = [
    "FUSION_DEFAULTS",
    "FUSION_METHODS",
    "GRANULARITIES",
    "REPORT_FILE",
    "ConcreteMask",
    "SafetyRealignConfig",
    "SafetyRealignTrainer",
    "apply_task_vector",
    "attach_masks",
    "fuse_task_vectors",
    "hh_to_preference",
    "load_hh_rlhf",
    "load_preference_pairs",
    "mask_report",
    "masked_task_vector",
    "parse_hh_dialogue",
    "remove_masks",
    "resta",
    "scaled_mask",
    "task_vector_from_adapters",
    "task_vector_from_models",
    "zero_adapter",
]
