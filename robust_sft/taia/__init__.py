"""TAIA: train all parameters, infer with the attention updates only (Jiang et al., NeurIPS 2024, arXiv 2405.20192).

Fine-tuning on data outside the pre-training distribution damages the knowledge held in the feed-forward (MLP) layers.
TAIA trains as usual (LoRA on every linear layer, or full fine-tuning) and, at inference, keeps only the updates of
the attention modules: the MLP stays the pre-trained one. Training cost is that of plain SFT.

`keep` selects what is kept at inference: `"attention"` (TAIA), `"mlp"` (TAIF, the paper's ablation) or `"all"`
(vanilla). `train_modules="attention"` trains the attention modules only from the start (TOA, the other ablation).

Files: `modules.py` (which parameters are attention / MLP), `export.py` (views and exports), `config.py`, `trainer.py`.
"""

from .config import TAIAConfig
from .export import base_tensors, export_taia, merge_taia, taia_state_dict, taia_view
from .modules import KEEP_CHOICES, ModuleSplit, UnknownArchitectureError, split_modules
from .trainer import TAIATrainer

__all__ = [
    "KEEP_CHOICES",
    "ModuleSplit",
    "TAIAConfig",
    "TAIATrainer",
    "UnknownArchitectureError",
    "base_tensors",
    "export_taia",
    "merge_taia",
    "split_modules",
    "taia_state_dict",
    "taia_view",
]
