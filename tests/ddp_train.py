"""Trained by tests/test_distributed.py under `accelerate launch` with 2 CPU processes; each rank saves its weights."""

import sys

import torch
from datasets import Dataset

from robust_sft import RobustSFTConfig, RobustSFTTrainer
from robust_sft.testing import make_tiny_model, make_tiny_tokenizer


def main(output_dir: str) -> None:
    torch.set_num_threads(1)
    tokenizer = make_tiny_tokenizer()
    model = make_tiny_model("llama", tokenizer, seed=0)
    rows = [{"instruction": f"Add {i} and {i + 1}.", "output": f"{2 * i + 1}"} for i in range(16)]
    args = RobustSFTConfig(
        output_dir=output_dir,
        max_steps=3,
        per_device_train_batch_size=2,
        learning_rate=1e-2,
        report_to=[],
        save_strategy="no",
        gradient_checkpointing=False,
        seed=0,
    )
    trainer = RobustSFTTrainer(
        model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer
    )
    trainer.train()
    state = {name: tensor.detach().cpu() for name, tensor in trainer.model.state_dict().items()}
    rank = trainer.accelerator.process_index
    torch.save({"world_size": trainer.accelerator.num_processes, "state": state}, f"{output_dir}/rank{rank}.pt")


if __name__ == "__main__":
    main(sys.argv[1])
