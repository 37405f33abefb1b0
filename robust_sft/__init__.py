"""robust_sft: drop-in robust replacements for TRL's `SFTTrainer`."""

from .data import (
    DataFormatError,
    RobustDataCollator,
    detect_format,
    load_examples,
    prepare_dataset,
)
from .modeling import (
    embedded_model_dir,
    ensure_embedded_model,
    is_quantized,
    load_model_and_tokenizer,
    load_tokenizer,
)
from .trainer import RobustSFTConfig, RobustSFTTrainer
from .version import __version__

# The method modules load on first use (realignment pulls in TRL's DPOTrainer): `robust-sft env` and the data layer
# do not pay for them.
_LAZY = {
    "NoisyInstructionConfig": "anit",
    "NoisyInstructionTrainer": "anit",
    "DSFTConfig": "delia",
    "DSFTTrainer": "delia",
    "build_cache": "delia",
    "SafetyRealignConfig": "realign",
    "SafetyRealignTrainer": "realign",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "DSFTConfig",
    "DSFTTrainer",
    "DataFormatError",
    "NoisyInstructionConfig",
    "NoisyInstructionTrainer",
    "RobustDataCollator",
    "RobustSFTConfig",
    "RobustSFTTrainer",
    "SafetyRealignConfig",
    "SafetyRealignTrainer",
    "__version__",
    "build_cache",
    "detect_format",
    "embedded_model_dir",
    "ensure_embedded_model",
    "is_quantized",
    "load_examples",
    "load_model_and_tokenizer",
    "load_tokenizer",
    "prepare_dataset",
]
