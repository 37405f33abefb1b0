"""robust_sft: drop-in robust replacements for TRL's `SFTTrainer`."""

from .anit import NoisyInstructionConfig, NoisyInstructionTrainer
from .data import (
    DataFormatError,
    RobustDataCollator,
    detect_format,
    load_examples,
    prepare_dataset,
)
from .delia import DSFTConfig, DSFTTrainer, build_cache
from .modeling import (
    embedded_model_dir,
    ensure_embedded_model,
    is_quantized,
    load_model_and_tokenizer,
    load_tokenizer,
)
from .realign import SafetyRealignConfig, SafetyRealignTrainer
from .trainer import RobustSFTConfig, RobustSFTTrainer
from .version import __version__

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
