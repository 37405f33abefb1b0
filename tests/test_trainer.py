"""RobustSFTTrainer: plain SFT on the shared data layer, carrying extra fields, refusing what it cannot do."""

import pytest
import torch
from datasets import Dataset
from peft import LoraConfig
from trl import SFTTrainer

from robust_sft import RobustSFTConfig, RobustSFTTrainer

from .conftest import train_args

ROWS = [{"instruction": f"Add {i} and {i + 1}.", "input": "", "output": f"{2 * i + 1}"} for i in range(8)]


def test_config_works_on_cpu_without_bf16_flags(tmp_path):
    config = RobustSFTConfig(output_dir=str(tmp_path))
    assert config.bf16 is (torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    with pytest.raises(ValueError, match="quantization must be None"):
        RobustSFTConfig(output_dir=str(tmp_path), quantization="2bit")


def test_is_a_drop_in_sft_trainer(tmp_path, tiny_model, tokenizer):
    trainer = RobustSFTTrainer(
        model=tiny_model, args=train_args(tmp_path), train_dataset=Dataset.from_list(ROWS), processing_class=tokenizer
    )
    assert isinstance(trainer, SFTTrainer)
    # Prepared labels mask the prompt: the first trained token comes after the assistant header.
    row = trainer.train_dataset[0]
    first = next(i for i, label in enumerate(row["labels"]) if label != -100)
    assert tokenizer.decode(row["input_ids"][:first]).endswith("<|im_start|>assistant\n")


def test_lora_training_changes_adapters_only(tmp_path, tiny_model, tokenizer):
    base_before = {n: p.detach().clone() for n, p in tiny_model.named_parameters()}
    trainer = RobustSFTTrainer(
        model=tiny_model,
        args=train_args(tmp_path, max_steps=3),
        train_dataset=Dataset.from_list(ROWS),
        processing_class=tokenizer,
        peft_config=LoraConfig(r=4, target_modules="all-linear"),
    )
    trainer.train()
    assert "loss" in trainer.state.log_history[0]
    for name, param in trainer.model.named_parameters():
        if param.requires_grad:
            assert "lora_" in name
            if "lora_B" in name:
                assert param.abs().sum() > 0, f"{name} did not train"
        else:
            key = name.replace("base_model.model.", "").replace(".base_layer", "")
            assert torch.equal(param, base_before[key]), f"frozen {name} changed"


def test_full_finetune_changes_every_parameter(tmp_path, tiny_model, tokenizer):
    before = {n: p.detach().clone() for n, p in tiny_model.named_parameters()}
    trainer = RobustSFTTrainer(
        model=tiny_model, args=train_args(tmp_path), train_dataset=Dataset.from_list(ROWS), processing_class=tokenizer
    )
    trainer.train()
    unchanged = [n for n, p in trainer.model.named_parameters() if torch.equal(p, before[n])]
    # Embedding rows of tokens never seen do not move; every weight matrix does.
    assert all("embed_tokens" in n for n in unchanged)


class WeightedTrainer(RobustSFTTrainer):
    """A subclass that needs a per-example weight and the instruction mask in compute_loss."""

    _token_fields = ("instruction_mask",)
    _example_fields = ("weight",)
    seen: list

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        model_inputs, extras = self._split_extras(inputs)
        assert "weight" not in model_inputs and "instruction_mask" not in model_inputs
        self.seen.append((extras["weight"].tolist(), extras["instruction_mask"].shape == inputs["input_ids"].shape))
        self._log_metric("mean_weight", extras["weight"].float().mean())
        return super().compute_loss(model, model_inputs, return_outputs, num_items_in_batch)


def test_extra_fields_reach_compute_loss(tmp_path, tiny_model, tokenizer):
    rows = [dict(row, weight=float(i)) for i, row in enumerate(ROWS)]
    trainer = WeightedTrainer(
        model=tiny_model,
        args=train_args(tmp_path, max_steps=2, shuffle_dataset=False, per_device_train_batch_size=4),
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
    )
    trainer.seen = []
    trainer.train()
    weights = sorted(w for batch, _ in trainer.seen for w in batch)
    assert weights == [float(i) for i in range(8)]
    assert all(shape_ok for _, shape_ok in trainer.seen)
    assert "mean_weight" in trainer.state.log_history[0]


def test_packing_refused_when_fields_are_needed(tmp_path, tiny_model, tokenizer):
    with pytest.raises(ValueError, match="packing=False and padding_free=False"):
        WeightedTrainer(
            model=tiny_model,
            args=train_args(tmp_path, packing=True),
            train_dataset=Dataset.from_list([dict(r, weight=1.0) for r in ROWS]),
            processing_class=tokenizer,
        )


def test_packing_works_for_plain_sft(tmp_path, tiny_model, tokenizer):
    trainer = RobustSFTTrainer(
        model=tiny_model,
        args=train_args(tmp_path, packing=True, max_length=64, max_steps=1),
        train_dataset=Dataset.from_list(ROWS),
        processing_class=tokenizer,
    )
    trainer.train()
    assert trainer.state.global_step == 1


def test_evaluate_takes_raw_rows_and_file_paths(tmp_path, tiny_model, tokenizer):
    path = tmp_path / "train.jsonl"
    Dataset.from_list(ROWS).to_json(str(path))
    trainer = RobustSFTTrainer(
        model=tiny_model, args=train_args(tmp_path), train_dataset=str(path), processing_class=tokenizer
    )
    metrics = trainer.evaluate(Dataset.from_list(ROWS[:4]))
    assert metrics["eval_loss"] > 0


# ------------------------------------------------------------------------------------------------ loading
def test_fields_reach_compute_loss_without_processing_class(tmp_path, tokenizer):
    """No processing_class: the tokenizer is loaded from the model's folder (as SFTTrainer does), and the per-example
    fields still reach compute_loss."""
    from transformers import AutoModelForCausalLM

    from robust_sft.testing import save_tiny_model

    folder = save_tiny_model(str(tmp_path / "tiny"))
    trainer = WeightedTrainer(
        model=AutoModelForCausalLM.from_pretrained(folder),
        args=train_args(tmp_path / "out", max_steps=1, per_device_train_batch_size=4),
        train_dataset=Dataset.from_list([dict(row, weight=float(i)) for i, row in enumerate(ROWS)]),
    )
    trainer.seen = []
    trainer.train()
    assert len(trainer.seen[0][0]) == 4 and trainer.seen[0][1]


def test_custom_collator_that_drops_the_fields_is_refused(tmp_path, tiny_model, tokenizer):
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    from robust_sft import RobustDataCollator

    rows = Dataset.from_list([dict(row, weight=1.0) for row in ROWS])
    with pytest.raises(ValueError, match=r"data_collator drops \['instruction_mask', 'weight'\].*RobustDataCollator"):
        WeightedTrainer(
            model=tiny_model,
            args=train_args(tmp_path),
            train_dataset=rows,
            processing_class=tokenizer,
            data_collator=DataCollatorForLanguageModeling(pad_token_id=tokenizer.pad_token_id),
        )
    collator = RobustDataCollator(
        pad_token_id=tokenizer.pad_token_id, token_fields=("instruction_mask",), example_fields=("weight",)
    )
    trainer = WeightedTrainer(
        model=tiny_model,
        args=train_args(tmp_path),
        train_dataset=rows,
        processing_class=tokenizer,
        data_collator=collator,
    )
    assert trainer.data_collator is collator


def test_pad_token_from_the_config_is_used(tmp_path, tiny_model, tokenizer):
    import copy

    own = copy.deepcopy(tokenizer)
    trainer = WeightedTrainer(
        model=tiny_model,
        args=train_args(tmp_path, pad_token="<|endoftext|>"),
        train_dataset=Dataset.from_list([dict(row, weight=1.0) for row in ROWS]),
        processing_class=own,
    )
    assert trainer.data_collator.pad_token_id == own.convert_tokens_to_ids("<|endoftext|>")


def test_quantization_with_a_loaded_model_is_refused(tmp_path, tiny_model, tokenizer):
    with pytest.raises(ValueError, match="already-loaded full-precision model.*quantization='4bit'"):
        RobustSFTTrainer(
            model=tiny_model,
            args=train_args(tmp_path, quantization="4bit"),
            train_dataset=Dataset.from_list(ROWS),
            processing_class=tokenizer,
        )


def test_dataset_preparation_runs_main_process_first(tmp_path, tiny_model, tokenizer, monkeypatch):
    import contextlib

    import robust_sft.preparation as trainer_module

    entered = []

    @contextlib.contextmanager
    def recording():
        entered.append(True)
        yield

    monkeypatch.setattr(trainer_module, "global_then_local_main_first", recording)
    WeightedTrainer(
        model=tiny_model,
        args=train_args(tmp_path),
        train_dataset=Dataset.from_list([dict(row, weight=1.0) for row in ROWS]),
        processing_class=tokenizer,
    )
    assert len(entered) == 2  # our steps before TRL's (which has its own) and the instruction span after


def test_eval_dataset_as_a_dict_of_paths(tmp_path, tiny_model, tokenizer):
    paths = {}
    for name in ("a", "b"):
        paths[name] = str(tmp_path / f"{name}.jsonl")
        Dataset.from_list(ROWS[:2]).to_json(paths[name])
    trainer = RobustSFTTrainer(
        model=tiny_model,
        args=train_args(tmp_path),
        train_dataset=Dataset.from_list(ROWS),
        eval_dataset=paths,
        processing_class=tokenizer,
    )
    assert sorted(trainer.eval_dataset) == ["a", "b"] and len(trainer.eval_dataset["a"]) == 2


def test_plain_training_arguments_are_accepted(tmp_path, tiny_model, tokenizer):
    from transformers import TrainingArguments

    args = TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True, bf16=False)
    trainer = RobustSFTTrainer(
        model=tiny_model, args=args, train_dataset=Dataset.from_list(ROWS), processing_class=tokenizer
    )
    assert trainer.train_dataset[0]["labels"][0] == -100
