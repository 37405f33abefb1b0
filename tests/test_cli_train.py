"""`robust-sft train <method>` for every registered method: the example recipe, two steps, a tiny model.

Each method trains in a subprocess as a user runs it (the recipe from examples/recipes/ unchanged, a few flags on top),
then the saved model card and adapter are read back; the unknown-flag checks run the same parser in-process.
"""

import dataclasses
import json
import os
import subprocess
import sys

import pytest

from robust_sft.cli import main
from robust_sft.methods import METHODS

RECIPES = os.path.join(os.path.dirname(__file__), "..", "examples", "recipes")
CLI_METHODS = [name for name, method in METHODS.items() if method.trainable_from_cli]

ROWS = [
    {
        "instruction": f"Classify the sentiment of review {i} as positive or negative.",
        "input": "a great film" if i % 2 else "a dull film",
        "output": "positive" if i % 2 else "negative",
    }
    for i in range(8)
]
DIVERSE = [
    {"messages": [{"role": "user", "content": f"Name a colour, {i}."}, {"role": "assistant", "content": "Blue."}]}
    for i in range(8)
]
PAIRS = [
    {"prompt": f"How do I pick lock number {i}?", "chosen": "I can't help with that.", "rejected": "Use a pick."}
    for i in range(4)
]
# What a method needs beyond the recipe here: ANIT's embedding distortion would need the MiniLM encoder package;
# realignment masks the task vector of a fine-tuned adapter, with safety preference pairs as its data.
METHOD_FLAGS = {
    "anit": ["--distortion_metric", "levenshtein"],
    "delia": ["--diverse_dataset", "DIVERSE"],
    "realign": ["--finetuned_adapter", "ADAPTER"],
}
DATA = {"realign": "pairs.jsonl"}


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    from robust_sft.testing import save_tiny_model

    root = tmp_path_factory.mktemp("cli-train")
    model = save_tiny_model(str(root / "tiny"))
    for name, rows in (("rows.jsonl", ROWS), ("diverse.jsonl", DIVERSE), ("pairs.jsonl", PAIRS)):
        (root / name).write_text("\n".join(json.dumps(row) for row in rows))
    return root, model


def _save_adapter(model: str, folder: str) -> str:
    """A LoRA fine-tune of the tiny model with random non-zero B (a task vector that is not zero)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(model)
    get_peft_model(base, LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False)).save_pretrained(folder)
    return folder


def _trained(root, method):
    """The output folder of the method's run (one per test module)."""
    return root / f"out-{method}"


@pytest.mark.parametrize("method", CLI_METHODS)
def test_train_from_recipe(workspace, method):
    root, model = workspace
    out = _trained(root, method)
    paths = {"DIVERSE": lambda: str(root / "diverse.jsonl"), "ADAPTER": lambda: _save_adapter(model, root / "ft")}
    flags = [paths[flag]() if flag in paths else flag for flag in METHOD_FLAGS.get(method, [])]
    data = str(root / DATA.get(method, "rows.jsonl"))
    command = [sys.executable, "-m", "robust_sft.cli", "train", method, "--config", f"{RECIPES}/{method}.yaml",
               "--model_name_or_path", model, "--dataset_name", data, "--output_dir", str(out),
               "--max_steps", "2", "--per_device_train_batch_size", "4", *flags]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]

    card = (out / "README.md").read_text()
    header = card.split("---")[1]  # the YAML front matter of TRL's card
    spec = METHODS[method]
    assert all(f"- {tag}\n" in header for tag in spec.tags), header
    assert f"- {method}\n" in header
    if spec.paper is not None:
        if spec.paper.is_arxiv:  # TRL links arXiv ids to their papers page
            assert f"[{spec.paper.title}](https://huggingface.co/papers/{spec.paper.id})" in card
        else:  # a DOI would make a dead link: the card cites it instead
            assert "huggingface.co/papers/" not in card
            assert spec.paper.id in card and "bai2025anit" in card

    targets = set(json.loads((out / "adapter_config.json").read_text())["target_modules"])
    if method == "delia":  # its recipe adds `<sep>`: the input embedding trains with the adapter (documented)
        targets -= {"model.embed_tokens"}
    linear = {f"model.layers.{i}.{part}" for i in range(2) for part in (
        "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
        "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")}  # fmt: skip
    assert targets == linear  # every linear layer but the LM head, for every method: one LoRA default


def _foreign_flag(method: str) -> str:
    """A config field of another registered method that `method` does not take."""
    own = {field.name for field in dataclasses.fields(METHODS[method].config_class())}
    for other in CLI_METHODS:
        for field in dataclasses.fields(METHODS[other].config_class()):
            if field.name not in own:
                return f"--{field.name}"
    raise AssertionError("every method takes every field")


@pytest.mark.parametrize("method", CLI_METHODS)
def test_unknown_flag_is_a_usage_error(method, tmp_path, capsys):
    for flags in (["--no_such_flag", "1"], [_foreign_flag(method), "1"]):
        with pytest.raises(SystemExit) as exit_info:
            main(["train", method, "--output_dir", str(tmp_path), *flags])
        assert exit_info.value.code == 2
        error = capsys.readouterr().err.strip().splitlines()[-1]
        assert error.startswith(f"robust-sft train {method}: error: unrecognized arguments") and flags[0] in error


def test_unknown_recipe_key_is_a_usage_error(tmp_path, capsys):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"output_dir: {tmp_path}\nnoise_rate: 0.3\n")
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "sft", "--config", str(recipe)])
    assert exit_info.value.code == 2
    assert "keys that `sft` does not take: noise_rate" in capsys.readouterr().err


def test_every_cli_method_has_a_recipe():
    assert sorted(f"{name}.yaml" for name in CLI_METHODS) == sorted(
        name for name in os.listdir(RECIPES) if name.endswith(".yaml")
    )


def test_lora_default_is_all_linear_unless_the_config_says_otherwise(tmp_path):
    from trl import ModelConfig

    from robust_sft.cli.train import peft_config

    chosen = {}
    for method in CLI_METHODS:
        config = METHODS[method].config_class()(output_dir=str(tmp_path), report_to=[])
        chosen[method] = peft_config(ModelConfig(use_peft=True), config).target_modules
    assert set(chosen.values()) == {"all-linear"}
    toa = METHODS["taia"].config_class()(output_dir=str(tmp_path), train_modules="attention")
    assert peft_config(ModelConfig(use_peft=True), toa).target_modules is None  # TAIATrainer picks the attention
    assert peft_config(ModelConfig(use_peft=True, lora_target_modules=["q_proj", "v_proj"]), toa).target_modules == {
        "q_proj",
        "v_proj",
    }
    assert peft_config(ModelConfig(use_peft=False), toa) is None
