"""robust_sft: drop-in robust replacements for TRL's `SFTTrainer`.

Every public name loads on first use, so `import robust_sft` (and the CLI's `--help`) imports no torch. The trainer
and config classes come from the method registry ([`robust_sft.methods`]).
"""

from __future__ import annotations

import importlib
from typing import Any

from .methods import METHODS, get_method, register_method
from .version import __version__

# Public names that are not a registered trainer or config: name -> module.
_LAZY = {
    "DataFormatError": "data",
    "RobustDataCollator": "data",
    "detect_format": "data",
    "load_examples": "data",
    "prepare_dataset": "data",
    "embedded_model_dir": "modeling",
    "ensure_embedded_model": "modeling",
    "is_quantized": "modeling",
    "load_model_and_tokenizer": "modeling",
    "load_tokenizer": "modeling",
    "build_cache": "delia",
    "read_queries": "data",
    "export_taia": "taia",
    "fuse_task_vectors": "realign",
}


def _class_paths() -> dict[str, str]:
    paths = {}
    for method in METHODS.values():
        paths.update(method.class_names)
    return paths


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    path = _class_paths().get(name)
    if path is not None:
        module, _, attribute = path.partition(":")
        return getattr(importlib.import_module(module), attribute)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


# Static, so that tools see it; tests/test_package.py checks it against the registry and _LAZY.
__all__ = [
    "ANITConfig",
    "ANITTrainer",
    "DELIAConfig",
    "DELIATrainer",
    "DSFTConfig",
    "DSFTTrainer",
    "DataFormatError",
    "METHODS",
    "NoisyInstructionConfig",
    "NoisyInstructionTrainer",
    "RobustDataCollator",
    "RobustSFTConfig",
    "RobustSFTTrainer",
    "SafetyRealignConfig",
    "SafetyRealignTrainer",
    "TAIAConfig",
    "TAIATrainer",
    "__version__",
    "build_cache",
    "detect_format",
    "embedded_model_dir",
    "ensure_embedded_model",
    "export_taia",
    "fuse_task_vectors",
    "get_method",
    "is_quantized",
    "load_examples",
    "load_model_and_tokenizer",
    "load_tokenizer",
    "prepare_dataset",
    "read_queries",
    "register_method",
]
