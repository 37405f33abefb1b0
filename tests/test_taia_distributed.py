"""TAIA exports under DDP (2 CPU processes): only the main process writes, every process returns the same folder."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

from robust_sft.taia import export_taia
from robust_sft.testing import save_tiny_model

from .test_distributed import _free_port


@pytest.mark.slow
def test_exports_under_ddp(tmp_path):
    base_dir = save_tiny_model(str(tmp_path / "base"))
    accelerate = shutil.which("accelerate") or os.path.join(os.path.dirname(sys.executable), "accelerate")
    script = os.path.join(os.path.dirname(__file__), "taia_ddp_export.py")
    command = [accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
               "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_ip", "127.0.0.1",
               "--main_process_port", str(_free_port()), script, base_dir, str(tmp_path / "out")]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    out = tmp_path / "out"
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0] == ranks[1] and ranks[0]["world_size"] == 2  # rank 1 waited for the folders rank 0 wrote
    assert "model.safetensors" in ranks[0]["model"] and "adapter_model.safetensors" in ranks[0]["adapter"]
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no second writer's temporary folder
    exported = AutoModelForCausalLM.from_pretrained(out / "taia-model").state_dict()
    reference = AutoModelForCausalLM.from_pretrained(export_taia(base_dir, out / "adapter", tmp_path / "ref"))
    assert all(torch.equal(exported[name], tensor) for name, tensor in reference.state_dict().items())
