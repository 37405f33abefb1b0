"""TAIA: train all parameters, infer with the attention updates only (Jiang et al., NeurIPS 2024, arXiv 2405.20192).

Fine-tuning on data outside the pre-training distribution damages the knowledge held in the feed-forward (MLP) layers.
TAIA trains as usual (LoRA on every attention and MLP weight, or full fine-tuning) and, at inference, keeps only the
updates of the attention parameters: the MLP (experts and routers of MoE models included) stays the pre-trained one.
Training cost is that of plain SFT.

`keep` selects what is kept at inference: `"attention"` (TAIA), `"mlp"` (TAIF, the paper's ablation) or `"all"`
(vanilla). `train_modules="attention"` trains the attention parameters only from the start (TOA, the other ablation).

Files: `modules.py` (which parameters are attention / MLP / neither), `lora.py` (LoRA layers and PEFT's per-layer
merge), `export.py` (the streaming merged-model export), `adapter.py` (the TAIA adapter), `view.py` (in-memory
views), `config.py`, `trainer.py`.
"""

from .adapter import export_taia_adapter
from .config import TAIAConfig
from .export import base_tensors, export_taia, merge_taia, save_taia, taia_state_dict
from .modules import KEEP_CHOICES, ModuleSplit, UnknownArchitectureError, classify, split_modules
from .trainer import TAIATrainer
from .view import taia_view

__all__ = [
    "KEEP_CHOICES",
    "ModuleSplit",
    "TAIAConfig",
    "TAIATrainer",
    "UnknownArchitectureError",
    "base_tensors",
    "classify",
    "export_taia",
    "export_taia_adapter",
    "merge_taia",
    "save_taia",
    "split_modules",
    "taia_state_dict",
    "taia_view",
]
