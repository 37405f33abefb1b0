"""The example scripts run as users run them (a subprocess, TrlParser arguments) on a tiny local model."""

import json
import os
import subprocess
import sys

import pytest

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


def test_anit_example_on_sst2_rows(tmp_path):
    model = save_tiny_model(str(tmp_path / "tiny"))
    out = tmp_path / "out"
    sst2 = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "sst2", "dev.tsv")
    args = ["--model_name_or_path", model, "--output_dir", str(out), *QUICK_RUN, "--lora_r", "4",
            "--lora_target_modules", "all-linear", "--dataset_name", sst2, "--eval_size", "6", "--noise_rate", "1.0",
            "--distortion_metric", "levenshtein", "--eval_operators", "cut,word_shuffle"]  # fmt: skip
    result = run_example("anit_sft.py", *args)
    assert (out / "adapter_config.json").is_file()
    report = result.stdout[result.stdout.index('{\n  "clean"') :]
    import json

    scores = json.loads(report)
    assert list(scores)[:3] == ["clean", "cut", "word_shuffle"]
    assert all(name.startswith("distortion:") for name in list(scores)[3:])
    assert result.stdout.count(", distortion ") == 3  # three noisy instructions shown


def test_delia_example(tmp_path):
    model = save_tiny_model(str(tmp_path / "tiny"))
    out = tmp_path / "out"
    args = ["--model_name_or_path", model, "--output_dir", str(out), *QUICK_RUN, "--lora_r", "4",
            "--lora_target_modules", "all-linear", "--num_queries", "4", "--cache_max_new_tokens", "4",
            "--diverse_ratio", "0.5", "--new_special_tokens", "<sep>", "--keep_truncated", "true"]  # fmt: skip
    result = run_example("delia_sft.py", *args)
    assert "Training rows: {'task': 8, 'diverse': 4}" in result.stdout
    assert "Format compliance on unseen phrasings:" in result.stdout
    table = ["base model (before)", "SFT (task rows only)", "DELIA (task + 4 diverse rows)"]
    assert all(f"\n{label} " in result.stdout and f"\n{label}:\n" in result.stdout for label in table)
    assert len((out / "diverse_cache.jsonl").read_text().splitlines()) == 4
    assert (out / "adapter_config.json").is_file()


def test_safety_realign_example(tmp_path):
    model = save_tiny_model(str(tmp_path / "tiny"))
    out = tmp_path / "out"
    pairs = tmp_path / "pairs.jsonl"  # preference pairs named as `robust-sft train realign` names them
    pairs.write_text(
        "".join(
            json.dumps({"prompt": f"How do I pick lock {i}?", "chosen": "I won't help.", "rejected": "Sure."}) + "\n"
            for i in range(4)
        )
    )
    args = ["--model_name_or_path", model, "--output_dir", str(out), "--max_steps", "1", "--finetune_steps", "1",
            "--finetune_rows", "8", "--per_device_train_batch_size", "4", "--gradient_checkpointing", "false",
            "--report_to", "none", "--save_strategy", "no", "--max_length", "64",
            "--dataset_name", str(pairs), "--num_pairs", "3"]  # fmt: skip
    result = run_example("safety_realign.py", *args)
    scores = json.loads(result.stdout[result.stdout.index('{\n  "safe"') :])
    assert list(scores) == ["safe", "fine-tuned", "realigned", "kept_fraction"]
    assert (out / "realigned-adapter" / "realign_report.json").is_file()
    assert (out / "finetuned-adapter" / "adapter_config.json").is_file()


@pytest.mark.parametrize(
    "script, method",
    [("sft_baseline.py", "sft"), ("taia_sft.py", "taia"), ("anit_sft.py", "anit"), ("delia_sft.py", "delia")],
)
def test_recipe_parses_the_same_in_the_example_and_the_cli(script, method):
    import importlib.util

    import yaml

    from robust_sft.cli.train import parse_args

    spec = importlib.util.spec_from_file_location(f"example_{method}", os.path.join(EXAMPLES, script))
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    recipe = os.path.join(EXAMPLES, "recipes", f"{method}.yaml")
    from_example = parse_args(method, ["--config", recipe], extra=(example.ExampleArguments,))
    from_cli = parse_args(method, ["--config", recipe])
    assert from_example[:4] == from_cli
    training_args, model_args = from_cli[1], from_cli[2]
    for key, value in yaml.safe_load(open(recipe)).items():
        parsed = getattr(training_args, key, getattr(model_args, key, None))
        assert parsed == value or key == "report_to", key  # report_to: "none" parses to []
