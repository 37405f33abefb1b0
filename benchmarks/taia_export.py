"""TAIA export memory: peak resident memory of an export against the size of the model, streaming vs deep copy.

    python benchmarks/taia_export.py            # embedded SmolLM2-135M-Instruct, bfloat16 and float32
    python benchmarks/taia_export.py --quick    # tiny in-process llama (the CI smoke run)

Each row runs in a fresh process: set up the trained model (LoRA r=16 on every attention and MLP layer with random
updates, or a full fine-tune with its snapshot of the pre-trained MLP), read every weight once (a float32 checkpoint
loaded without a cast stays memory-mapped until touched, as it is in training), reset the kernel's peak-RSS counter
(`/proc/self/clear_refs`), export with keep="attention", read the peak (`VmHWM`). The figure is the peak *beyond* the
resident memory before the export, over the bytes of the model's tensors. Rows:

- `stream`: `save_taia` (what `TAIATrainer.save_taia_model` does), one shard at the default size (5GB: the whole
  model here) and with 20MB shards;
- `deepcopy`: what the export did before: a deep copy of the PEFT model, merged, then `save_pretrained`.

Memory does not depend on CPU load, so one run is enough. Writes `results/taia-export[-quick].json` and `.md`.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

from common import RESULTS, machine, write_report

ROWS = [
    ("lora", "stream", None),
    ("lora", "stream", "20MB"),
    ("lora", "deepcopy", None),
    ("full", "stream", None),
    ("full", "stream", "20MB"),
]


def _memory() -> dict[str, int]:
    status = Path("/proc/self/status").read_text()
    return {key: int(value) * 1024 for key, value in re.findall(r"(VmHWM|VmRSS):\s+(\d+) kB", status)}


def _model(quick: bool, dtype):
    import torch

    from robust_sft.testing import make_tiny_model

    if quick:
        return make_tiny_model("llama", dtype=dtype)
    from transformers import AutoModelForCausalLM

    from robust_sft.modeling import ensure_embedded_model

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_pretrained(ensure_embedded_model(), dtype=dtype)


def worker(training: str, export: str, shard: str | None, dtype_name: str, quick: bool) -> dict:
    """One measurement, in this (fresh) process."""
    import gc

    import torch
    from peft import LoraConfig, get_peft_model

    from robust_sft.taia import base_tensors, merge_taia, save_taia, split_modules
    from robust_sft.trl_internals import copy_model

    torch.set_num_threads(2)
    dtype = getattr(torch, dtype_name)
    model = _model(quick, dtype)
    split = split_modules(model)
    unique = {t.data_ptr(): t for t in model.state_dict().values()}  # a tied LM head counts once
    model_bytes = sum(t.numel() * t.element_size() for t in unique.values())
    pretrained = None
    if training == "lora":
        config = LoraConfig(r=16, lora_alpha=32, target_modules=split.lora_targets())
        model = get_peft_model(model, config)
        with torch.no_grad():
            for name, parameter in model.named_parameters():
                if "lora_B" in name:
                    parameter.normal_(0, 0.01)
    else:
        pretrained = base_tensors(model, split.mlp)  # the trainer's snapshot (part of training memory)
        with torch.no_grad():
            for parameter in model.parameters():
                parameter.add_(0.01)
    with torch.no_grad():  # page in every weight: a checkpoint loaded without a cast is memory-mapped
        for tensor in model.state_dict().values():
            tensor.sum()
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak-RSS counter
    before = _memory()
    with tempfile.TemporaryDirectory() as directory:
        output = Path(directory) / "taia"
        kwargs = {"max_shard_size": shard} if shard else {}
        if export == "stream":
            save_taia(model, output, "attention", pretrained=pretrained, split=split, **kwargs)
        else:
            merge_taia(copy_model(model), "attention", split).save_pretrained(output)
        after = _memory()
        written = sum(path.stat().st_size for path in output.glob("*.safetensors"))
    return {
        "training": training,
        "export": export,
        "shard": shard or "5GB (default)",
        "dtype": dtype_name,
        "model_bytes": model_bytes,
        "written_bytes": written,
        "rss_before": before["VmRSS"],
        "peak_during_export": after["VmHWM"],
        "peak_extra_bytes": after["VmHWM"] - before["VmRSS"],
        "peak_extra_over_model": round((after["VmHWM"] - before["VmRSS"]) / model_bytes, 3),
    }


def run_row(training: str, export: str, shard: str | None, dtype: str, quick: bool) -> dict:
    command = [sys.executable, __file__, "--worker", training, export, shard or "-", dtype]
    command += ["--quick"] if quick else []
    result = subprocess.run(command, capture_output=True, text=True, timeout=1800)
    if result.returncode != 0:
        raise RuntimeError(result.stderr[-3000:])
    return json.loads(result.stdout.strip().splitlines()[-1])


def table(rows: list[dict]) -> str:
    lines = [
        "| training | export | shard | dtype | model MB | written MB | peak extra MB | peak extra / model |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['training']} | {row['export']} | {row['shard']} | {row['dtype']} "
            f"| {row['model_bytes'] / 1e6:.0f} | {row['written_bytes'] / 1e6:.0f} "
            f"| {row['peak_extra_bytes'] / 1e6:.0f} | {row['peak_extra_over_model']:.2f}x |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    import argparse

    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--worker":
        training, export, shard, dtype = argv[1:5]
        print(json.dumps(worker(training, export, None if shard == "-" else shard, dtype, "--quick" in argv)))
        return 0
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="The tiny in-process model (seconds).")
    parser.add_argument("--output-dir", default=str(RESULTS))
    parser.add_argument("--dtypes", nargs="+", default=None, help="Default: bfloat16 float32 (float32 for --quick).")
    args = parser.parse_args(argv)
    dtypes = args.dtypes or (["float32"] if args.quick else ["bfloat16", "float32"])
    rows = []
    for dtype in dtypes:
        for training, export, shard in ROWS:
            rows.append(run_row(training, export, shard, dtype, args.quick))
            print(table(rows[-1:]).splitlines()[-1], flush=True)
    name = "taia-export-quick" if args.quick else "taia-export"
    report = {
        "model": "tiny llama (in-process)" if args.quick else "SmolLM2-135M-Instruct (embedded)",
        "command": " ".join(["python", "benchmarks/taia_export.py", *argv]),
        "machine": machine(),
        "rows": rows,
    }
    path = write_report(args.output_dir, name, report)
    (Path(args.output_dir) / f"{name}.md").write_text(table(rows))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
