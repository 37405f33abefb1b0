"""Shared fixtures: tiny in-process models, and the embedded model converted once per test session."""

import os

import pytest
import torch

torch.set_num_threads(2)
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

SHARED_DATA = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data")


@pytest.fixture(scope="session")
def tiny_tokenizer():
    from robust_sft.testing import make_tiny_tokenizer

    return make_tiny_tokenizer()


@pytest.fixture
def tokenizer(tiny_tokenizer):
    return tiny_tokenizer


@pytest.fixture
def tiny_model(tiny_tokenizer):
    from robust_sft.testing import make_tiny_model

    return make_tiny_model("llama", tiny_tokenizer)


@pytest.fixture(scope="session")
def embedded_home(tmp_path_factory):
    """A fresh robust_sft cache for the session, so the test run converts the embedded model itself.

    Set ROBUST_SFT_TEST_HOME to reuse a converted cache between local runs (CI leaves it unset)."""
    home = os.environ.get("ROBUST_SFT_TEST_HOME") or str(tmp_path_factory.mktemp("robust_sft_home"))
    previous = os.environ.get("ROBUST_SFT_HOME")
    os.environ["ROBUST_SFT_HOME"] = home
    yield home
    if previous is None:
        os.environ.pop("ROBUST_SFT_HOME", None)
    else:
        os.environ["ROBUST_SFT_HOME"] = previous


@pytest.fixture(scope="session")
def embedded(embedded_home):
    """(model, tokenizer) of the embedded SmolLM2-135M-Instruct, loaded once for the session."""
    from robust_sft import load_model_and_tokenizer

    return load_model_and_tokenizer()


def train_args(output_dir, **overrides):
    """A small, CPU-friendly config for tests."""
    from robust_sft import RobustSFTConfig

    values = dict(
        output_dir=str(output_dir),
        max_steps=2,
        per_device_train_batch_size=2,
        learning_rate=1e-2,
        report_to=[],
        logging_steps=1,
        save_strategy="no",
        gradient_checkpointing=False,
        seed=0,
        dataloader_num_workers=0,
    )
    values.update(overrides)
    config_class = values.pop("config_class", RobustSFTConfig)
    return config_class(**values)
