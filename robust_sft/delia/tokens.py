"""New special tokens for DELIA: added, initialised as the mean embedding, trained, saved and reloaded."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel
from transformers import PreTrainedModel, PreTrainedTokenizerBase

logger = logging.getLogger(__name__)


DSFT_FILE = "dsft.json"  # the new tokens and the base vocabulary size, saved next to the adapter


# ------------------------------------------------------------------------------------------------ new tokens
def add_special_tokens(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, tokens: Sequence[str], pad_to_multiple_of: int = 64
) -> list[int]:
    """Add `tokens` to the tokenizer, resize the embeddings and initialise the new rows as the mean embedding.

    The embedding matrix is resized to a multiple of `pad_to_multiple_of`. Every row past the tokens the tokenizer had
    (the new tokens' rows and the padding rows; input embeddings, and output embeddings when they are not tied) is
    set to the mean of the known tokens' rows, including when the matrix already had spare rows (the reference
    re-initialised from the wrong index and left the new token's own row untouched). A tokenizer that already has
    the tokens (e.g. saved by an earlier run) but more tokens than the model has rows is resized too, the rows new
    to the model initialised the same way. Returns the tokens' ids (tokens already in the vocabulary are not added
    again).
    """
    return add_tokens_and_rows(model, tokenizer, tokens, pad_to_multiple_of)[0]


def add_tokens_and_rows(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, tokens: Sequence[str], pad_to_multiple_of: int = 64
) -> tuple[list[int], int | None]:
    """[`add_special_tokens`], also returning the first row it initialised (None when it resized nothing)."""
    tokens = list(dict.fromkeys(tokens))
    known = len(tokenizer)
    rows = model.get_input_embeddings().weight.shape[0]
    added = [token for token in tokens if token not in tokenizer.get_vocab()]
    if added:
        tokenizer.add_special_tokens({"extra_special_tokens": added}, replace_extra_special_tokens=False)
    ids = tokenizer.convert_tokens_to_ids(tokens)
    if added:
        first = known
    elif len(tokenizer) > rows:  # the tokenizer knows the tokens, the model has no rows for them yet
        first = rows
    else:
        return ids, None
    model.resize_token_embeddings(len(tokenizer), pad_to_multiple_of=pad_to_multiple_of, mean_resizing=False)
    initialise_new_rows(model, first)
    logger.info(
        "Special tokens %s (ids %s): embeddings resized to %d rows, rows from %d initialised as the mean.",
        tokens,
        ids,
        model.get_input_embeddings().weight.shape[0],
        first,
    )
    return ids, first


def _embedding_matrices(model: PreTrainedModel) -> list[torch.Tensor]:
    matrices = [model.get_input_embeddings().weight]
    output = model.get_output_embeddings()
    if output is not None and output.weight is not matrices[0]:
        matrices.append(output.weight)
    return matrices


def initialise_new_rows(model: PreTrainedModel, known: int) -> None:
    """Set every embedding row from index `known` on (input, and untied output) to the mean of the rows before it."""
    with torch.no_grad():
        for weight in _embedding_matrices(model):
            weight[known:] = weight[:known].float().mean(0).to(weight.dtype)


def with_embedding_target(peft_config: Any, model: PreTrainedModel) -> Any:
    """Add the input embeddings to a LoRA config's targets, so the new tokens' rows can train.

    LoRA on the embedding gives every token, the new ones included, its own trainable coordinates. (PEFT's
    `trainable_token_indices` would train just the new rows, but it wraps the LM head, as PEFT does itself for tied
    embeddings, and TRL 1.16's fused LM head reads `lm_head.bias` around the wrapper: training fails.)
    `target_modules` given as `"all-linear"` or left unset (PEFT's default for the architecture) is resolved first.
    """
    from peft.tuners.tuners_utils import _maybe_include_all_linear_layers
    from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING

    embedding = model.get_input_embeddings()
    name = next(name for name, module in model.named_modules() if module is embedding)
    if peft_config.target_modules is None:
        defaults = TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING.get(model.config.model_type)
        if defaults is None:
            raise ValueError(
                f"PEFT has no default LoRA targets for model type {model.config.model_type!r}: set target_modules."
            )
        peft_config.target_modules = set(defaults)
    _maybe_include_all_linear_layers(peft_config, model)
    if isinstance(peft_config.target_modules, str):
        raise ValueError(
            f"target_modules is the pattern {peft_config.target_modules!r}; new tokens need the embedding "
            f"`{name}` trained: give target_modules as a list, or include the embedding in your pattern and set "
            "new_special_tokens=[] after adding the tokens yourself with robust_sft.delia.add_special_tokens."
        )
    peft_config.target_modules = set(peft_config.target_modules) | {name}
    return peft_config


def _module_name(model: PreTrainedModel, module: torch.nn.Module) -> str:
    return next(name for name, candidate in model.named_modules() if candidate is module)


def with_trainable_tokens(peft_config: Any, model: PreTrainedModel, token_ids: Sequence[int]) -> Any:
    """Train the new tokens' rows, input and output, through PEFT's `trainable_token_indices` (only those rows train;
    a tied LM head shares the input rows' update, an untied one gets its own), so a LoRA run learns to read *and*
    write them. Ids the config already lists for a layer are kept."""
    embedding = _module_name(model, model.get_input_embeddings())
    given = peft_config.trainable_token_indices
    layers = dict(given) if isinstance(given, dict) else {embedding: list(given)} if given else {}
    names = [embedding]
    if model.get_output_embeddings() is not None:
        names.append(_module_name(model, model.get_output_embeddings()))
    for name in names:
        layers[name] = sorted(set(layers.get(name, [])) | set(token_ids))
    peft_config.trainable_token_indices = layers
    return peft_config


def expose_head_bias(model: torch.nn.Module) -> None:
    """Let TRL's fused LM head read `lm_head.bias` through PEFT's trainable-tokens wrapper.

    TRL 1.16 computes the log-probabilities from `lm_head.weight` and `lm_head.bias` directly. The wrapper forwards
    `.weight` (the base weight with the trained rows merged in, so their gradient flows) but not `.bias`, and training
    fails with "'TrainableTokensWrapper' object has no attribute 'bias'". The wrapped head has no bias (checked), so
    the wrapper gets `bias = None`, which is what the fused head reads for an unbiased head.
    """
    from peft.utils.other import TrainableTokensWrapper

    head = model.get_output_embeddings()
    if not isinstance(head, TrainableTokensWrapper) or "bias" in vars(head):
        return
    base = head.token_adapter.base_layer
    if getattr(base, "bias", None) is not None:
        raise ValueError(
            "The LM head has a bias, which PEFT's trainable-tokens wrapper hides from TRL's fused LM head: train the "
            "new tokens with new_token_training='lora_embedding' or without peft_config (full fine-tuning)."
        )
    head.bias = None


def load_dsft_model(base: str | os.PathLike | None, adapter_dir: str | os.PathLike, **load_kwargs: Any):
    """Reload a DSFT LoRA run: the tokenizer saved with it (with the new tokens), the base model resized and
    initialised exactly as in training, and the adapter (its LoRA weights, the embedding's included).

    Returns (model, tokenizer).
    """
    from transformers import AutoTokenizer

    from ..modeling import load_model_and_tokenizer

    tokenizer = AutoTokenizer.from_pretrained(adapter_dir)
    model, _ = load_model_and_tokenizer(base, **load_kwargs)
    record_path = Path(adapter_dir, DSFT_FILE)
    if record_path.is_file():
        record = json.loads(record_path.read_text())
        if record["base_vocab_size"] is not None:  # training resized and initialised rows from there: do it again
            model.resize_token_embeddings(
                len(tokenizer), pad_to_multiple_of=record["embedding_pad_multiple"], mean_resizing=False
            )
            initialise_new_rows(model, record["base_vocab_size"])
    return PeftModel.from_pretrained(model, adapter_dir), tokenizer
