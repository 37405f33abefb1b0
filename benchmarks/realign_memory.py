"""Peak memory of safety realignment against the fine-tuned LoRA model it starts from.

    python benchmarks/realign_memory.py            # embedded SmolLM2-135M-Instruct, float32 on CPU
    python benchmarks/realign_memory.py --batch 1 --max-length 128 --rows lora-model lora-dpo realign-lora \
        realign-lora-copy                          # smaller activations: the LoRA rows only
    python benchmarks/realign_memory.py --quick    # tiny in-process model (the smoke run)

Every row runs in a fresh process, on the same preference batches (hh-rlhf harmless pairs, default batch 2 pairs,
max_length 256, gradient checkpointing on: DPOConfig's defaults otherwise, 2 optimiser steps). Two measures:
- peak RSS above the process's RSS after its imports (VmHWM, reset after the imports; memory does not depend on CPU
  contention, unlike time). glibc is told to serve blocks over 64 KiB with mmap and give freed memory back at once
  (MALLOC_MMAP_THRESHOLD_, MALLOC_TRIM_THRESHOLD_), so that the peak RSS follows the live tensors rather than the
  allocator's caching;
- exact tensor bytes: the model's parameters and buffers, and what the realignment adds (the masks' `W_ft`, the mask
  logits, their gradients and the optimiser states), to check the bytes-per-element formula of the docs.

Rows: the fine-tuned LoRA model itself (loaded, one forward on a batch of the same shape: the reference point); TRL's
DPOTrainer training that LoRA adapter (what a DPO run costs); SafetyRealignTrainer in LoRA mode with the default
reference (the same model with the masks forced to 1) and with a deep-copied reference (the former default); and in
full mode (the merged fine-tune's task vector over every changed tensor) with element masks in float32 and bfloat16
and row masks. Writes `results/realign-memory[-quick].json` and `.md`.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

from common import SHARED_DATA, benchmark_parser, machine, scratch_dir, write_report

ROWS = {
    "lora-model": "fine-tuned LoRA model (load + forward)",
    "lora-dpo": "TRL DPO on the LoRA adapter",
    "realign-lora": "realign, LoRA mode (reference through the masks)",
    "realign-lora-copy": "realign, LoRA mode (deep-copied reference)",
    "realign-full-element": "realign, full mode, element masks, float32 logits",
    "realign-full-element-bf16": "realign, full mode, element masks, bfloat16 logits",
    "realign-full-row": "realign, full mode, row masks",
}
STEPS = 2
ALLOCATOR = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0", "MALLOC_ARENA_MAX": "2"}


# ------------------------------------------------------------------------------------------------ one row (child)
def rss_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def reset_peak() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False where the kernel does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def dpo_values(output_dir: str, batch: int, max_length: int) -> dict:
    """The DPOConfig values every row shares (gradient checkpointing: DPOConfig's default, on)."""
    return dict(
        output_dir=output_dir,
        per_device_train_batch_size=batch,
        max_length=max_length,
        max_steps=STEPS,
        report_to=[],
        save_strategy="no",
        logging_steps=1,
        dataloader_num_workers=0,
        seed=0,
        bf16=False,
    )


def run_row(row: str, setup: Path, batch: int, max_length: int) -> dict:

    import torch
    from datasets import Dataset
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    from robust_sft.realign import (
        SafetyRealignConfig,
        SafetyRealignTrainer,
        task_vector_from_adapters,
        task_vector_from_models,
        zero_adapter,
    )

    torch.set_num_threads(2)
    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(setup / "base")
    pairs = Dataset.from_json(str(setup / "pairs.jsonl"))
    baseline = rss_kib("VmRSS")
    resettable = reset_peak()
    started = time.perf_counter()

    def base():
        return AutoModelForCausalLM.from_pretrained(setup / "base", dtype=torch.float32)

    result: dict = {"row": row}
    if row == "lora-model":
        model = PeftModel.from_pretrained(base(), setup / "adapter")
        input_ids = torch.randint(0, len(tokenizer), (2 * batch, max_length))
        with torch.no_grad():
            model(input_ids=input_ids)
        result["model_bytes"] = tensor_bytes([*model.parameters(), *model.buffers()])
    elif row == "lora-dpo":
        model = PeftModel.from_pretrained(base(), setup / "adapter", is_trainable=True)
        config = DPOConfig(**dpo_values(str(setup / "run"), batch, max_length))
        DPOTrainer(model=model, args=config, train_dataset=pairs, processing_class=tokenizer).train()
        result["model_bytes"] = tensor_bytes([*model.parameters(), *model.buffers()])
    else:
        if row.startswith("realign-lora"):
            vector = task_vector_from_adapters(setup / "adapter")
            model = zero_adapter(PeftModel.from_pretrained(base(), setup / "adapter"))
            reference = None
            if row == "realign-lora-copy":  # the former default: a merged deep copy of the fine-tune
                reference = PeftModel.from_pretrained(base(), setup / "adapter").merge_and_unload()
            overrides = {}
        else:
            vector = task_vector_from_models(setup / "base", setup / "full")
            model, reference = base(), None
            overrides = {
                "realign-full-element": {},
                "realign-full-element-bf16": {"mask_dtype": "bfloat16"},
                "realign-full-row": {"mask_granularity": "row"},
            }[row]
        masked_elements = sum(tensor.numel() for tensor in vector.values())
        trainer = SafetyRealignTrainer(
            model=model,
            task_vector=vector,
            ref_model=reference,
            args=SafetyRealignConfig(**dpo_values(str(setup / "run"), batch, max_length), **overrides),
            train_dataset=pairs,
            processing_class=tokenizer,
        )
        del vector  # the trainer keeps what it needs (each mask's W_ft)
        trainer.train()
        masks = trainer.masks.values()
        optimiser_state = [
            value for state in trainer.optimizer.state.values() for value in state.values() if torch.is_tensor(value)
        ]
        result.update(
            masked_elements=masked_elements,
            model_bytes=tensor_bytes([*model.parameters(), *model.buffers()])
            - tensor_bytes([mask.logits for mask in masks])
            - tensor_bytes([mask.finetuned for mask in masks]),
            finetuned_bytes=tensor_bytes([mask.finetuned for mask in masks]),
            logits_bytes=tensor_bytes([mask.logits for mask in masks]),
            gradient_bytes=tensor_bytes([mask.logits for mask in masks]),  # alive in each step, freed by zero_grad
            optimiser_bytes=tensor_bytes(optimiser_state),
            reference_bytes=tensor_bytes([*reference.parameters(), *reference.buffers()]) if reference else 0,
        )
        result["realign_bytes"] = sum(
            result[key] for key in ("finetuned_bytes", "logits_bytes", "gradient_bytes", "optimiser_bytes")
        )
    result["peak_above_imports_mib"] = (rss_kib("VmHWM") - baseline) / 1024 if resettable else None
    result["seconds"] = time.perf_counter() - started
    return result


# ------------------------------------------------------------------------------------------------ setup (parent)
def prepare(quick: bool, folder: Path, pairs: int, max_length: int) -> None:
    """base model, a LoRA fine-tune (r 16, all linear layers; random values: memory does not depend on them), the
    merged full fine-tune, and the preference pairs."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from robust_sft import load_model_and_tokenizer
    from robust_sft.modeling import ensure_embedded_model
    from robust_sft.realign import load_hh_rlhf
    from robust_sft.testing import save_tiny_model

    source = save_tiny_model(str(folder / "tiny")) if quick else str(ensure_embedded_model())
    model, tokenizer = load_model_and_tokenizer(source, dtype=torch.float32)
    model.save_pretrained(folder / "base")
    tokenizer.save_pretrained(folder / "base")
    torch.manual_seed(0)
    config = LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", init_lora_weights=False)
    adapter = get_peft_model(AutoModelForCausalLM.from_pretrained(folder / "base"), config)
    with torch.no_grad():  # a fine-tune-sized update (init_lora_weights=False draws large B)
        for name, parameter in adapter.named_parameters():
            if "lora_B" in name:
                parameter.mul_(0.01)
    adapter.save_pretrained(folder / "adapter")
    adapter.merge_and_unload().save_pretrained(folder / "full")
    candidates = load_hh_rlhf(SHARED_DATA / "hh_harmless" / "test.jsonl.gz", limit=200)
    fits = [  # the first pairs whose prompt leaves room for an answer (DPO drops fully truncated pairs)
        index
        for index, row in enumerate(candidates)
        if len(tokenizer.apply_chat_template(row["prompt"], add_generation_prompt=True)["input_ids"]) < max_length - 16
    ]
    candidates.select(fits[:pairs]).to_json(str(folder / "pairs.jsonl"))


def main(argv: list[str] | None = None) -> int:
    parser = benchmark_parser(__doc__)
    parser.add_argument("--batch", type=int, default=2, help="Preference pairs per batch.")
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--rows", nargs="+", choices=list(ROWS), default=list(ROWS))
    parser.add_argument("--row", choices=list(ROWS), help=argparse_hidden())
    parser.add_argument("--setup", help=argparse_hidden())
    args = parser.parse_args(argv)
    if "lora-model" not in args.rows:
        parser.error("--rows must include lora-model (the reference point of the ratios).")
    if args.row:  # a child process: one row, its JSON on the last line of stdout
        print(json.dumps(run_row(args.row, Path(args.setup), args.batch, args.max_length)))
        return 0
    setup = Path(scratch_dir("realign-memory"))
    prepare(args.quick, setup, args.batch * STEPS, args.max_length)
    results = {}
    for row in args.rows:
        command = [sys.executable, __file__, "--row", row, "--setup", str(setup)]
        command += ["--batch", str(args.batch), "--max-length", str(args.max_length)]
        completed = subprocess.run(command, capture_output=True, text=True, env=os.environ | ALLOCATOR)
        if completed.returncode != 0:
            raise RuntimeError(f"row {row} failed:\n{completed.stderr[-3000:]}")
        results[row] = json.loads(completed.stdout.strip().splitlines()[-1])
        print(f"{ROWS[row]:>52}: peak {results[row]['peak_above_imports_mib']:.0f} MiB above imports", flush=True)
    report = summarise(results, args)
    suffix = ("-quick" if args.quick else "") + (
        "" if (args.batch, args.max_length) == (2, 256) else f"-b{args.batch}-l{args.max_length}"
    )
    write_report(args.output_dir, f"realign-memory{suffix}", report)
    (Path(args.output_dir) / f"realign-memory{suffix}.md").write_text(table(report))
    print(table(report))
    return 0


def argparse_hidden() -> str:
    import argparse

    return argparse.SUPPRESS


def summarise(results: dict, args) -> dict:
    reference = results["lora-model"]["peak_above_imports_mib"]
    for row in results.values():
        peak = row["peak_above_imports_mib"]
        row["peak_over_lora_model"] = peak / reference if peak is not None and reference else None
        if "masked_elements" in row:  # the realignment's own tensors, per masked element
            row["realign_bytes_per_masked_element"] = row["realign_bytes"] / row["masked_elements"]
    return {
        "benchmark": "realign-memory",
        "command": "python benchmarks/realign_memory.py " + shlex.join(sys.argv[1:]),
        "machine": machine(),
        "model": "tiny llama (robust_sft.testing)" if args.quick else "SmolLM2-135M-Instruct (embedded), float32",
        "settings": {
            "batch_pairs": args.batch,
            "max_length": args.max_length,
            "steps": STEPS,
            "gradient_checkpointing": True,
        },
        "measure": "peak RSS above the RSS after imports (VmHWM reset after imports), one process per row",
        "allocator": ALLOCATOR,
        "rows": {ROWS[key]: value for key, value in results.items()},
    }


def table(report: dict) -> str:
    lines = [
        "| row | peak above imports (MiB) | / LoRA model | realignment tensors (MiB) | bytes / masked element |",
        "|---|---|---|---|---|",
    ]
    for name, row in report["rows"].items():
        extra = row.get("realign_bytes")
        per = row.get("realign_bytes_per_masked_element")
        lines.append(
            f"| {name} | {row['peak_above_imports_mib']:.0f} | {row['peak_over_lora_model']:.2f} | "
            f"{'' if extra is None else f'{extra / 2**20:.1f}'} | {'' if per is None else f'{per:.1f}'} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
