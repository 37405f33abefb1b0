"""The example scripts run as users run them (a subprocess, TrlParser arguments) on a tiny local model."""

import os
import subprocess
import sys

from robust_sft.testing import save_tiny_model

EXAMPLES = os.path.join(os.path.dirname(__file__), "..", "examples")


# What every example run here shares: a 2-step LoRA run without checkpoints or reporting.
QUICK_RUN = ["--max_steps", "2", "--train_size", "8", "--per_device_train_batch_size", "4", "--use_peft",
             "--gradient_checkpointing", "false", "--report_to", "none", "--save_strategy", "no"]  # fmt: skip


def run_example(script, *args, timeout=600):
    command = [sys.executable, os.path.join(EXAMPLES, script), *args]
    result = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def test_sft_baseline_example(tmp_path):
    model = save_tiny_model(str(tmp_path / "tiny"))
    out = tmp_path / "out"
    run_example("sft_baseline.py", "--model_name_or_path", model, "--output_dir", str(out), *QUICK_RUN)
    assert (out / "adapter_config.json").is_file()


def test_taia_example(tmp_path):
    model = save_tiny_model(str(tmp_path / "tiny"))
    out = tmp_path / "out"
    args = [
        "--model_name_or_path",
        model,
        "--output_dir",
        str(out),
        *QUICK_RUN,
        "--lora_r",
        "4",
        "--learning_rate",
        ".01",
    ]
    run_example("taia_sft.py", *args)
    assert (out / "adapter_config.json").is_file()
    assert "taia" in (out / "taia-model" / "taia.json").read_text().lower()
