"""Run by tests/test_taia_distributed.py under `accelerate launch` with 2 CPU processes: train TAIA LoRA, then every
rank calls the exports (only the main process may write)."""

import json
import sys
from pathlib import Path

import torch
from datasets import Dataset
from peft import LoraConfig

from robust_sft.taia import TAIAConfig, TAIATrainer


def main(base_dir: str, output_dir: str) -> None:
    torch.set_num_threads(1)
    output = Path(output_dir)
    rows = [{"instruction": f"Add {i} and {i + 1}.", "output": f"{2 * i + 1}"} for i in range(8)]
    args = TAIAConfig(
        output_dir=str(output / "run"),
        max_steps=2,
        per_device_train_batch_size=2,
        learning_rate=1e-2,
        report_to=[],
        save_strategy="no",
        gradient_checkpointing=False,
        seed=0,
    )
    trainer = TAIATrainer(
        model=base_dir, args=args, train_dataset=Dataset.from_list(rows), peft_config=LoraConfig(r=4, lora_alpha=8)
    )
    trainer.train()
    trainer.save_model(str(output / "adapter"))
    model = trainer.save_taia_model(output / "taia-model")
    adapter = trainer.save_taia_adapter(output / "taia-adapter")
    rank = trainer.accelerator.process_index
    seen = {"world_size": trainer.accelerator.num_processes, "model": sorted(p.name for p in model.iterdir())}
    seen["adapter"] = sorted(p.name for p in adapter.iterdir())
    (output / f"rank{rank}.json").write_text(json.dumps(seen))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
