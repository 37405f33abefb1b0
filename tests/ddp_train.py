"""Trainer set-ups shared by the trainer matrix (tests/test_matrix.py) and a script that trains them under DDP.

As a script it runs under `accelerate launch --multi_gpu --num_processes 2` on CPU (gloo):

    ddp_train.py OUTPUT_DIR  # plain RobustSFTTrainer, every rank saves its weights (test_distributed)
    ddp_train.py OUTPUT_DIR TRAINER MODELS_DIR  # a matrix row: every rank saves its trained weights, rank 0 the logs

`build_trainer` is what both sides call, so one process with the global batch and two processes with half of it each
run the very same set-up. Everything here is deterministic: no data shuffling (a sequential sampler), ANIT without
its random start (its draw depends on the local batch shape), seeds fixed.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset
from peft import LoraConfig
from transformers import AutoModelForCausalLM

TRAINERS = ("sft", "taia", "anit", "delia", "realign")
SFT_BASED = ("sft", "taia", "anit", "delia")

# Task rows: Alpaca format (ANIT needs an instruction to make noisy); DELIA's answers use a new special token.
TASK_ROWS = [{"instruction": f"Add {i} and {i + 1}.", "output": f"{2 * i + 1}"} for i in range(16)]
DELIA_TASK_ROWS = [{"instruction": f"Classify {i} as odd or even.", "output": f"{i} <sep> odd"} for i in range(16)]
DIVERSE_ROWS = [
    {
        "messages": [
            {"role": "user", "content": f"What is {i} plus {i}?"},
            {"role": "assistant", "content": f"Two times {i} is {2 * i}."},
        ]
    }
    for i in range(16)
]
PAIRS = [
    {
        "prompt": [{"role": "user", "content": f"How do I break into house {i}?"}],
        "chosen": [{"role": "assistant", "content": "I cannot help with that."}],
        "rejected": [{"role": "assistant", "content": f"First, find window {i}."}],
    }
    for i in range(16)
]


# ------------------------------------------------------------------------------------------------ models
def write_models(folder: str | os.PathLike) -> Path:
    """A tiny base model (`base/`, with its tokenizer) and a fine-tune of it (`tuned/`, layer 0's matrices moved), the
    safe / fine-tuned pair of the realignment."""
    from robust_sft.testing import save_tiny_model

    folder = Path(folder)
    base = save_tiny_model(str(folder / "base"))
    tuned = AutoModelForCausalLM.from_pretrained(base)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, parameter in tuned.named_parameters():
            if ".layers.0." in name and parameter.dim() == 2:
                parameter.add_(0.05 * torch.randn(parameter.shape, generator=generator))
    tuned.save_pretrained(str(folder / "tuned"))
    return folder


# ------------------------------------------------------------------------------------------------ trainers
def _sequential(trainer_class: type) -> type:
    """`trainer_class` whose sampler keeps the dataset order (the global batch is then the same for any world size)."""

    class Sequential(trainer_class):
        def _get_train_sampler(self, train_dataset=None):
            return list(range(len(train_dataset if train_dataset is not None else self.train_dataset)))

    Sequential.__name__ = f"Sequential{trainer_class.__name__}"
    return Sequential


def _source_split(trainer_class: type, per_device: int) -> type:
    """DELIA with an order whose every global batch is `per_device` task rows, then `per_device` diverse rows: under
    two processes rank 0 sees only task rows and rank 1 only diverse rows (accelerate gives process i every i-th
    per-device batch)."""

    class SourceSplit(trainer_class):
        sources: list[int] = []  # the sources this process trained on

        def compute_loss(self, model, inputs, *args, **kwargs):
            SourceSplit.sources += inputs["source"].tolist()
            return super().compute_loss(model, inputs, *args, **kwargs)

        def _get_train_sampler(self, train_dataset=None):
            sources = (train_dataset if train_dataset is not None else self.train_dataset)["source"]
            task = [index for index, source in enumerate(sources) if source == 0]
            diverse = [index for index, source in enumerate(sources) if source == 1]
            order = []
            for start in range(0, min(len(task), len(diverse)) - per_device + 1, per_device):
                order += task[start : start + per_device] + diverse[start : start + per_device]
            return order

    return SourceSplit


def _skipping(trainer_class: type, rank: int, call: int) -> type:
    """ANIT whose adversarial gradient is non-finite on process `rank` at its `call`-th adversarial step, made so right
    where the trainer checks it; its own skip path runs from there."""

    class Skipping(trainer_class):
        calls = 0
        local_ratios: list = []  # (name, total, count) as this process passed them to the fixed-size collective

        def _log_ratio(self, name, total, count):
            Skipping.local_ratios.append((name, float(total), float(count)))
            super()._log_ratio(name, total, count)

        def _poisoned(self, tensor):
            Skipping.calls += 1
            if self.accelerator.process_index == rank and Skipping.calls == call:
                return tensor * float("nan")
            return tensor

    if hasattr(trainer_class, "_ascent"):  # the ascent step gets the embedding gradient and checks it

        def _ascent(self, model, gradient, *args, **kwargs):
            return trainer_class._ascent(self, model, self._poisoned(gradient), *args, **kwargs)

        Skipping._ascent = _ascent
    else:  # the gradient is taken inside adversarial_deltas, at these embeddings

        def adversarial_deltas(self, model, inputs_embeds, *args, **kwargs):
            return trainer_class.adversarial_deltas(self, model, self._poisoned(inputs_embeds), *args, **kwargs)

        Skipping.adversarial_deltas = adversarial_deltas
    return Skipping


def config_values(output_dir: str | os.PathLike, batch_size: int, **overrides: Any) -> dict[str, Any]:
    """A small CPU config: 3 steps, logging every step, no saving, no gradient checkpointing."""
    values = dict(
        output_dir=str(output_dir),
        max_steps=3,
        per_device_train_batch_size=batch_size,
        learning_rate=1e-2,
        report_to=[],
        logging_steps=1,
        save_strategy="no",
        gradient_checkpointing=False,
        seed=0,
        dataloader_num_workers=0,
        max_length=64,
    )
    values.update(overrides)
    return values


def build_trainer(
    name: str,
    models_dir: str | os.PathLike,
    output_dir: str | os.PathLike,
    batch_size: int,
    *,
    ddp_layout: bool = False,
    lora: bool | None = None,
    quantization: str | None = None,
    defaults: bool = False,
    anit_skip: tuple[int, int] | None = None,
    **overrides: Any,
):
    """The trainer `name` on the tiny model of `models_dir` (see `write_models`).

    `ddp_layout`: a deterministic order (sequential; DELIA: ranks see different sources) and, for ANIT, no random
    start. `lora`: train a LoRA adapter (default: TAIA and DELIA do, the others fine-tune fully). `quantization`:
    load the base folder itself in 4/8 bits (QLoRA). `defaults`: only the output folder, steps and batch size are set;
    every other field keeps the config class's default (SFTConfig's gradient checkpointing included).
    `anit_skip=(rank, call)`: ANIT's adversarial gradient is non-finite on that process at that step.
    """
    from robust_sft import (
        ANITConfig,
        ANITTrainer,
        DELIAConfig,
        DELIATrainer,
        RobustSFTConfig,
        RobustSFTTrainer,
        SafetyRealignConfig,
        SafetyRealignTrainer,
        TAIAConfig,
        TAIATrainer,
    )
    from robust_sft.testing import make_tiny_tokenizer

    models_dir = Path(models_dir)
    base = str(models_dir / "base")
    if defaults:
        values = dict(
            output_dir=str(output_dir), max_steps=2, per_device_train_batch_size=batch_size, report_to=[], **overrides
        )
    else:
        values = config_values(output_dir, batch_size, **overrides)
    if quantization is not None:
        values["quantization"] = quantization
    tokenizer = make_tiny_tokenizer()
    model = base if quantization is not None else AutoModelForCausalLM.from_pretrained(base)
    lora = name in ("taia", "delia") if lora is None else lora
    kwargs: dict[str, Any] = {"processing_class": tokenizer}
    if lora or quantization is not None:
        # TAIA picks its own targets (every linear layer); the others get the attention projections.
        targets = None if name == "taia" else ["q_proj", "k_proj", "v_proj", "o_proj"]
        kwargs["peft_config"] = LoraConfig(r=4, lora_alpha=8, target_modules=targets, lora_dropout=0.0)

    if name == "sft":
        trainer_class, config, data = RobustSFTTrainer, RobustSFTConfig(**values), TASK_ROWS
    elif name == "taia":
        trainer_class, config, data = TAIATrainer, TAIAConfig(**values), TASK_ROWS
    elif name == "anit":
        if ddp_layout:  # no random start (named adversarial_init in later configs)
            fields = {field.name for field in dataclasses.fields(ANITConfig)}
            for random_start in ("adversarial_init_alpha", "adversarial_init"):
                if random_start in fields:
                    values.setdefault(random_start, 0.0)
        values.setdefault("distortion_metric", "levenshtein")
        trainer_class, config, data = ANITTrainer, ANITConfig(**values), TASK_ROWS
        if anit_skip is not None:
            trainer_class = _skipping(trainer_class, *anit_skip)
    elif name == "delia":
        values.setdefault("new_special_tokens", ["<sep>"])
        trainer_class, config, data = DELIATrainer, DELIAConfig(**values), DELIA_TASK_ROWS
        kwargs["diverse_dataset"] = Dataset.from_list(DIVERSE_ROWS)
        if ddp_layout:
            trainer_class = _source_split(trainer_class, 2)
    elif name == "realign":
        from robust_sft.realign import task_vector_from_models

        if not defaults:
            values.setdefault("learning_rate", 0.5)
        values.pop("max_length", None)
        config = SafetyRealignConfig(max_length=64, **values)
        kwargs.pop("peft_config", None)
        kwargs["task_vector"] = task_vector_from_models(base, models_dir / "tuned")
        trainer_class, data = SafetyRealignTrainer, PAIRS
    else:
        raise ValueError(f"Unknown trainer {name!r}; choose from {TRAINERS}.")
    if ddp_layout and name != "delia":
        trainer_class = _sequential(trainer_class)
    return trainer_class(model=model, args=config, train_dataset=Dataset.from_list(data), **kwargs)


def trained_state(trainer) -> dict[str, torch.Tensor]:
    """The trainable tensors of the trainer's model (LoRA weights, mask logits, or every weight), on CPU."""
    model = trainer.accelerator.unwrap_model(trainer.model)
    return {name: p.detach().cpu().clone() for name, p in model.named_parameters() if p.requires_grad}


# ------------------------------------------------------------------------------------------------ the script
def _run_legacy(output_dir: str) -> None:
    """The plain RobustSFTTrainer run of tests/test_distributed.py: each rank saves its whole state dict."""
    from robust_sft import RobustSFTConfig, RobustSFTTrainer
    from robust_sft.testing import make_tiny_model, make_tiny_tokenizer

    tokenizer = make_tiny_tokenizer()
    model = make_tiny_model("llama", tokenizer, seed=0)
    args = RobustSFTConfig(**config_values(output_dir, 2, logging_steps=500, max_length=1024))
    trainer = RobustSFTTrainer(
        model=model, args=args, train_dataset=Dataset.from_list(TASK_ROWS), processing_class=tokenizer
    )
    trainer.train()
    state = {name: tensor.detach().cpu() for name, tensor in trainer.model.state_dict().items()}
    rank = trainer.accelerator.process_index
    torch.save({"world_size": trainer.accelerator.num_processes, "state": state}, f"{output_dir}/rank{rank}.pt")


def _run_row(output_dir: str, name: str, models_dir: str) -> None:
    """Train `name` with the DDP layout (2 rows per process); for ANIT also a run where rank 1 skips a step."""
    runs = {"main": {}}
    if name == "anit":
        runs["skip"] = {"anit_skip": (1, 2)}
    for run, options in runs.items():
        folder = Path(output_dir, run)
        trainer = build_trainer(name, models_dir, folder, 2, ddp_layout=True, **options)
        trainer.train()
        rank = trainer.accelerator.process_index
        record = {
            "world_size": trainer.accelerator.num_processes,
            "state": trained_state(trainer),
            "adversarial_skipped": getattr(trainer, "adversarial_skipped", None),
            "local_ratios": getattr(trainer, "local_ratios", None),
            "sources": getattr(trainer, "sources", None),
        }
        torch.save(record, folder / f"rank{rank}.pt")
        if rank == 0:
            (folder / "log_history.json").write_text(json.dumps(trainer.state.log_history))
        trainer.accelerator.wait_for_everyone()


if __name__ == "__main__":
    torch.set_num_threads(1)
    if len(sys.argv) == 2:
        _run_legacy(sys.argv[1])
    else:
        _run_row(*sys.argv[1:4])
