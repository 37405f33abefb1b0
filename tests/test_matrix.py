"""The trainer matrix (#12): every trainer (RobustSFT, TAIA, ANIT, DELIA, SafetyRealign) on a tiny model, through the
paths of real use that a single-process, hand-configured test never takes.

- Two CPU processes (DDP over gloo) train to the end (a hang fails the timeout) and log what one process logs on the
  same global batch; DELIA with one rank seeing only task rows and the other only diverse rows; ANIT with an
  adversarial step skipped on one rank only.
- `save_model()` then the documented loader gives the trained model's logits.
- A checkpoint then `resume_from_checkpoint` ends with the weights of the uninterrupted run.
- SFTConfig's defaults (gradient checkpointing on) train, to the weights of the same run without checkpointing; a
  4-bit QLoRA base trains.

The set-ups are in tests/ddp_train.py, which the DDP rows also launch as a script, so both sides run the same code.
"""

import json
import math
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from .ddp_train import SFT_BASED, TRAINERS, build_trainer, trained_state, write_models

SCRIPT = Path(__file__).with_name("ddp_train.py")
DDP_TIMEOUT_S = 420  # two processes importing torch and training 3 tiny steps take ~30 s; a hang waits forever
# Log entries that measure time or are summed per process, not training.
VOLATILE = {"train_runtime", "train_samples_per_second", "train_steps_per_second", "total_flos"}
# Metrics each trainer must log (beyond Trainer's grad_norm and learning_rate).
METRICS = {
    "sft": {"loss", "entropy", "mean_token_accuracy", "num_tokens"},
    "taia": {"loss", "entropy", "mean_token_accuracy", "num_tokens"},
    "anit": {"loss", "clean_loss", "adversarial_loss", "distortion", "adversarial_skipped"},
    "delia": {"loss", "task_loss", "diverse_loss"},
    "realign": {"loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies"},
}


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory):
    return write_models(tmp_path_factory.mktemp("matrix-models"))


# ---------------------------------------------------------------------------------------------- DDP
def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch_two_processes(output_dir: Path, name: str, models_dir: Path) -> str | None:
    """`accelerate launch` two CPU processes on tests/ddp_train.py. Returns None when they finished, else what went
    wrong: an error, or a hang (a collective that one rank never joins) past the timeout, after which every process
    of the launch is killed (torch's launcher starts its workers in sessions of their own)."""
    accelerate = shutil.which("accelerate") or os.path.join(os.path.dirname(sys.executable), "accelerate")
    command = [
        accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no",
        "--main_process_ip", "127.0.0.1", "--main_process_port", str(_free_port()),
        str(SCRIPT), str(output_dir), name, str(models_dir),
    ]  # fmt: skip
    root = str(Path(__file__).resolve().parent.parent)
    env = dict(
        os.environ,
        OMP_NUM_THREADS="1",
        TOKENIZERS_PARALLELISM="false",
        PYTHONPATH=os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])),
    )
    log_path = output_dir / "launch.log"
    with open(log_path, "w") as log:  # a file, not a pipe: a surviving worker cannot block the read
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
        try:
            process.wait(timeout=DDP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            for child in [*psutil.Process(process.pid).children(recursive=True), process]:
                child.kill()
            process.wait()
            return f"{name}: the two DDP processes did not finish in {DDP_TIMEOUT_S} s (a hang?):\n" + _tail(log_path)
    if process.returncode != 0:
        return f"{name} under DDP failed (exit {process.returncode}):\n" + _tail(log_path)
    return None


def _tail(path: Path, characters: int = 4000) -> str:
    return path.read_text(errors="replace")[-characters:]


@pytest.fixture(scope="module")
def ddp_run(models_dir, tmp_path_factory):
    """name -> (folder, failure or None) of its two-process run, launched once per trainer and module."""
    runs: dict[str, tuple[Path, str | None]] = {}

    def run(name: str) -> tuple[Path, str | None]:
        if name not in runs:
            folder = tmp_path_factory.mktemp(f"ddp-{name}")
            runs[name] = folder, launch_two_processes(folder, name, models_dir)
        return runs[name]

    return run


def read_run(ddp_run, name: str, run: str) -> tuple[list[dict], list[dict]]:
    """(rank records, rank 0's log history) of one run of a launch; fails with the launch's error when the run did
    not finish (a launch trains ANIT's skip run after its main run: a hang there leaves the main run's files)."""
    launch, failure = ddp_run(name)
    folder = launch / run
    paths = [folder / "rank0.pt", folder / "rank1.pt", folder / "log_history.json"]
    if not all(path.is_file() for path in paths):
        pytest.fail(failure or f"{name}: the launch finished without writing {run}/")
    ranks = [torch.load(path, weights_only=False) for path in paths[:2]]
    assert [record["world_size"] for record in ranks] == [2, 2]
    return ranks, json.loads(paths[2].read_text())


def assert_same_tensors(actual: dict, expected: dict, atol: float, what: str) -> None:
    assert actual.keys() == expected.keys(), what
    for name, tensor in expected.items():
        torch.testing.assert_close(actual[name], tensor, rtol=0, atol=atol, msg=lambda m, n=name: f"{what} {n}: {m}")


def assert_logs_match(actual: list[dict], expected: list[dict]) -> None:
    assert [entry.get("step") for entry in actual] == [entry.get("step") for entry in expected]
    for got, want in zip(actual, expected):
        assert got.keys() == want.keys(), f"step {want.get('step')}: logged keys differ"
        for key in want.keys() - VOLATILE:
            assert got[key] == pytest.approx(want[key], rel=1e-4, abs=1e-6), f"step {want.get('step')}: {key}"


@pytest.mark.slow
@pytest.mark.parametrize("name", TRAINERS)
def test_two_processes_log_what_one_process_logs(name, models_dir, ddp_run, tmp_path):
    """Two processes with 2 rows each vs one with the same 4: the same log lines and the same trained weights."""
    (rank0, rank1), logged = read_run(ddp_run, name, "main")
    assert_same_tensors(rank1["state"], rank0["state"], atol=0, what="ranks disagree on")
    single = build_trainer(name, models_dir, tmp_path, batch_size=4, ddp_layout=True)
    single.train()
    steps = [entry for entry in logged if "loss" in entry]
    assert len(steps) == 3 and METRICS[name] <= set().union(*steps), logged
    assert_logs_match(logged, single.state.log_history)
    # Adam turns a last-bit difference of a near-zero gradient into a visible one: 1% of one step (lr 1e-2).
    assert_same_tensors(rank0["state"], trained_state(single), atol=1e-4, what="two processes vs one:")
    if name == "delia":  # the layout really split the sources: one rank per source
        assert [set(rank0["sources"]), set(rank1["sources"])] == [{0}, {1}]


@pytest.mark.slow
def test_anit_step_skipped_on_one_rank_logs_and_finishes(ddp_run):
    """Rank 1's adversarial gradient is non-finite at its second adversarial step: that rank skips the term, both
    ranks still join every collective (no hang), stay in sync, and the logged adversarial loss of that step is rank
    0's alone (a fixed-size sum and count, 0 on the skipping rank)."""
    (rank0, rank1), logged = read_run(ddp_run, "anit", "skip")
    assert [rank0["adversarial_skipped"], rank1["adversarial_skipped"]] == [0, 1]
    # the logged count is the total over processes (one skip on 2 ranks logs 1, not the mean 0.5)
    assert max(entry.get("adversarial_skipped", 0) for entry in logged) == 1.0
    assert_same_tensors(rank1["state"], rank0["state"], atol=0, what="ranks disagree on")
    local = [[pair for name, *pair in rank["local_ratios"] if name == "adversarial_loss"] for rank in (rank0, rank1)]
    assert len(local[0]) == len(local[1]) >= 2  # the same collectives on both ranks
    assert [count for _, count in local[0]] == [1] * len(local[0])
    assert [count for _, count in local[1]] == [1, 0] + [1] * (len(local[1]) - 2)
    adversarial = [entry["adversarial_loss"] for entry in logged if "adversarial_loss" in entry]
    assert len(adversarial) == len(local[0]) and all(math.isfinite(value) for value in adversarial)
    for index, ((total0, _), (total1, count1)) in enumerate(zip(*local)):  # one micro-batch per step
        assert adversarial[index] == pytest.approx((total0 + total1) / (1 + count1), rel=1e-6), index


# ---------------------------------------------------------------------------------------------- save and reload
def logits(model, input_ids: torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=input_ids).logits


def load_saved(name: str, folder: Path, models_dir: Path):
    """The documented way to load what `save_model()` wrote."""
    if name in ("sft", "anit", "realign"):  # full weights (realign: the plain realigned model)
        model, info = AutoModelForCausalLM.from_pretrained(folder, output_loading_info=True)
        # A missing weight would be initialised at random with only a load report (the parametrized realign save).
        assert not info["missing_keys"] and not info["mismatched_keys"], info
        assert name == "realign" or not info["unexpected_keys"], info
        return model
    if name == "taia":
        return PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(models_dir / "base"), folder)
    from robust_sft.delia import load_dsft_model

    return load_dsft_model(str(models_dir / "base"), folder)[0]


@pytest.mark.parametrize("name", TRAINERS)
def test_save_model_then_load_gives_the_trained_logits(name, models_dir, tmp_path):
    trainer = build_trainer(name, models_dir, tmp_path / "run", batch_size=2, max_steps=2)
    trainer.train()
    trainer.save_model(str(tmp_path / "saved"))
    text = "Classify 3 as odd or even. <sep> odd" if name == "delia" else "Add 3 and 4. 7"
    input_ids = trainer.processing_class(text, return_tensors="pt")["input_ids"]
    expected = logits(trainer.accelerator.unwrap_model(trainer.model), input_ids)  # realign: the export mask
    loaded = load_saved(name, tmp_path / "saved", models_dir)
    torch.testing.assert_close(logits(loaded, input_ids), expected, rtol=0, atol=1e-5)


# ---------------------------------------------------------------------------------------------- resume
@pytest.mark.parametrize("name", TRAINERS)
def test_resume_from_checkpoint_reaches_the_uninterrupted_weights(name, models_dir, tmp_path):
    """4 steps with a checkpoint every 2 (shuffled data, ANIT's random start, DELIA's mix) vs a new trainer resumed
    from checkpoint-2: the same final weights and the same logged losses of steps 3 and 4."""
    options = dict(batch_size=2, max_steps=4, save_strategy="steps", save_steps=2, logging_steps=1)
    uninterrupted = build_trainer(name, models_dir, tmp_path / "full", **options)
    uninterrupted.train()
    checkpoint = tmp_path / "full" / "checkpoint-2"
    assert checkpoint.is_dir()
    resumed = build_trainer(name, models_dir, tmp_path / "resumed", **options)
    resumed.train(resume_from_checkpoint=str(checkpoint))
    assert resumed.state.global_step == 4
    assert_same_tensors(trained_state(resumed), trained_state(uninterrupted), atol=1e-6, what="resumed vs not:")

    def late_losses(trainer):
        return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry and entry["step"] > 2]

    assert late_losses(resumed) == pytest.approx(late_losses(uninterrupted), rel=1e-6)


# ---------------------------------------------------------------------------------------------- defaults, QLoRA
def checkpointing(model) -> bool:
    """Whether a layer of the model recomputes its activations (transformers' `gradient_checkpointing` flag)."""
    return any(getattr(module, "gradient_checkpointing", False) is True for module in model.modules())


@pytest.mark.parametrize("name", SFT_BASED)
def test_sftconfig_defaults_train_with_gradient_checkpointing(name, models_dir, tmp_path):
    """Only output folder, steps and batch size set: SFTConfig's gradient checkpointing is on and trains to the same
    weights as the same run without it (checkpointing recomputes, it does not change the maths)."""
    checkpointed = build_trainer(name, models_dir, tmp_path / "on", batch_size=2, defaults=True)
    assert checkpointed.args.gradient_checkpointing
    before = trained_state(checkpointed)
    checkpointed.train()
    after = trained_state(checkpointed)
    assert math.isfinite(checkpointed.state.log_history[-1]["train_loss"])
    assert any(not torch.equal(after[n], before[n]) for n in before)
    plain = build_trainer(
        name, models_dir, tmp_path / "off", batch_size=2, defaults=True, gradient_checkpointing=False
    )
    plain.train()
    assert [checkpointing(checkpointed.model), checkpointing(plain.model)] == [True, False]
    assert_same_tensors(after, trained_state(plain), atol=1e-7, what="checkpointing on vs off:")


@pytest.mark.parametrize("name", SFT_BASED)
def test_qlora_4bit_base_trains(name, models_dir, tmp_path):
    from robust_sft import is_quantized

    trainer = build_trainer(name, models_dir, tmp_path, batch_size=2, max_steps=2, quantization="4bit")
    assert is_quantized(trainer.model)
    before = trained_state(trainer)
    # Only adapter tensors train (PEFT names them after the adapter, "default"): LoRA, trainable tokens, no base.
    assert before and all(".default." in n or n.endswith(".default") for n in before), sorted(before)
    trainer.train()
    after = trained_state(trainer)
    assert all(math.isfinite(entry["loss"]) for entry in trainer.state.log_history if "loss" in entry)
    assert any(not torch.equal(after[n], before[n]) for n in before)


# ---------------------------------------------------------------------------------------------- public names
def test_every_public_name_and_readme_trainer_imports_from_the_package():
    import robust_sft

    missing = [name for name in robust_sft.__all__ if getattr(robust_sft, name, None) is None]
    assert not missing
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    listed = set(re.findall(r"^\| `(\w+Trainer)` \|", readme, flags=re.M))
    assert {"RobustSFTTrainer", "TAIATrainer", "ANITTrainer", "DELIATrainer", "SafetyRealignTrainer"} <= listed
    for name in listed:
        trainer = getattr(robust_sft, name)
        config = getattr(robust_sft, name.replace("Trainer", "Config"))
        assert name in robust_sft.__all__ and isinstance(trainer, type) and isinstance(config, type)
