"""DDP on CPU: two processes train the tiny model through the shared path and end with the same weights."""

import os
import shutil
import socket
import subprocess
import sys

import torch

from robust_sft.testing import make_tiny_model, make_tiny_tokenizer


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_two_cpu_processes_agree(tmp_path):
    accelerate = shutil.which("accelerate") or os.path.join(os.path.dirname(sys.executable), "accelerate")
    script = os.path.join(os.path.dirname(__file__), "ddp_train.py")
    command = [
        # On a CPU-only machine the torchrun-based launcher (--multi_gpu) starts the processes; the config's
        # use_cpu makes them join a gloo group. (`--cpu` alone starts a single process unless MPI is set up.)
        accelerate,
        "launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_ip",
        "127.0.0.1",
        "--main_process_port",
        str(_free_port()),
        script,
        str(tmp_path),
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert rank0["world_size"] == rank1["world_size"] == 2
    assert rank0["state"].keys() == rank1["state"].keys()
    for name, tensor in rank0["state"].items():
        assert torch.equal(tensor, rank1["state"][name]), f"ranks disagree on {name}"
    initial = make_tiny_model("llama", make_tiny_tokenizer(), seed=0).state_dict()
    assert not torch.equal(
        initial["model.layers.0.mlp.down_proj.weight"], rank0["state"]["model.layers.0.mlp.down_proj.weight"]
    )
