"""Where robust_sft keeps converted models, without importing torch (so `robust-sft env` stays fast)."""

from __future__ import annotations

import os
from pathlib import Path

EMBEDDED_MODEL_NAME = "SmolLM2-135M-Instruct"


def cache_dir() -> Path:
    """The folder where robust_sft keeps converted models: `$ROBUST_SFT_HOME`, else `$XDG_CACHE_HOME/robust_sft`, else
    `~/.cache/robust_sft`."""
    if os.environ.get("ROBUST_SFT_HOME"):
        return Path(os.environ["ROBUST_SFT_HOME"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "robust_sft"


def embedded_model_dir() -> Path:
    """Where the converted embedded model lives (it may not exist yet; see `ensure_embedded_model`)."""
    return cache_dir() / "models" / EMBEDDED_MODEL_NAME


def is_embedded_model_converted() -> bool:
    """True when the embedded model has already been converted into the cache."""
    target = embedded_model_dir()
    return (target / "config.json").is_file() and (target / "model.safetensors").is_file()
