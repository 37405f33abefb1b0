"""TAIA exports: a plain transformers model with only the kept updates, written tensor by tensor.

The export never builds a second model. Each tensor of the output is made when its shard is written (a LoRA merge by
PEFT into a copy of one base tensor, or the pre-trained tensor for a dropped update of a full fine-tune), moved to
the CPU, written into a safetensors shard with huggingface_hub's shard plan and transformers' own tied-weight and
checkpoint-format handling, then freed. Peak memory beyond the trained model is one shard (`max_shard_size`), and
the dtype is the model's own.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from ..methods import TAIA_PAPER
from ..modeling import is_quantized
from ..trl_internals import unwrap_peft, without_forward_patch
from .lora import adapted_parameters, is_peft_model, merged_tensors, saved_module_copies
from .modules import Keep, ModuleSplit, _check_keep, canonical_name, dropped_groups, split_modules

logger = logging.getLogger(__name__)

DEFAULT_SHARD_SIZE = "5GB"


# --------------------------------------------------------------------------------------------------- output folders
def check_output_dir(
    output_dir: str | os.PathLike, overwrite: bool = False, protected: Sequence[str | os.PathLike | None] = ()
) -> Path:
    """Refuse an output folder that is not empty (unless `overwrite`), and always one that is, or contains, a
    `protected` folder (the run's own output_dir, the adapter being exported): writing there would replace it."""
    output_dir = Path(output_dir)
    resolved = output_dir.resolve()
    for folder in protected:
        if folder is None:
            continue
        folder = Path(folder).resolve()
        if resolved == folder or resolved in folder.parents:
            raise ValueError(
                f"Refusing to export into {output_dir}: it holds {folder} (the run's checkpoints and adapter, or "
                "the adapter being exported), which the export would replace. Choose another folder, e.g. "
                f"{output_dir / 'taia-model'}."
            )
    if output_dir.exists() and not output_dir.is_dir():
        raise FileExistsError(f"{output_dir} is a file; the export needs a folder.")
    if output_dir.is_dir() and any(output_dir.iterdir()) and not overwrite:
        raise FileExistsError(
            f"{output_dir} is not empty. Pass overwrite=True to replace its contents, or choose an empty folder."
        )
    return output_dir


@contextmanager
def atomic_folder(output_dir: Path) -> Iterator[Path]:
    """A temporary folder beside `output_dir` that replaces it when the block succeeds (and is removed otherwise)."""
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}-", dir=output_dir.parent))
    try:
        yield tmp
        if output_dir.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}-old-", dir=output_dir.parent))
            output_dir.rename(old / output_dir.name)
            tmp.rename(output_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(output_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _is_main_process() -> bool:
    from accelerate import PartialState

    return PartialState().is_main_process


# --------------------------------------------------------------------------------------------------- tensor sources
TensorSource = tuple[PreTrainedModel, dict[str, torch.Tensor], Callable[[str], torch.Tensor]]


def _lora_source(peft_model: nn.Module, keep: Keep, split: ModuleSplit) -> TensorSource:
    """The plain model's tensors (by reference) and a function giving each one with only the kept LoRA updates."""
    if is_quantized(peft_model):
        raise ValueError(
            "Refusing to merge LoRA updates into 4/8-bit quantized weights (the result would be lossy). "
            "Load the base model in its own precision and attach the adapter (`export_taia` does this, and so does "
            "`TAIATrainer.save_taia_model`)."
        )
    base = unwrap_peft(peft_model)
    references = {}
    for name, tensor in base.state_dict().items():
        plain = canonical_name(name)
        if plain is not None:
            references[plain] = tensor
    adapted = adapted_parameters(peft_model)
    copies = saved_module_copies(peft_model)
    dropped = dropped_groups(keep)

    def tensor(name: str) -> torch.Tensor:
        if split.classify(name) in dropped:
            return references[name]
        if name in copies:
            return copies[name]
        if name in adapted:
            return merged_tensors(adapted[name])[name.rsplit(".", 1)[1]]
        return references[name]

    return base, references, tensor


def _full_source(
    model: nn.Module, pretrained: Mapping[str, torch.Tensor] | nn.Module, keep: Keep, split: ModuleSplit
) -> TensorSource:
    """A full fine-tune's tensors, with the dropped groups' tensors taken from the pre-trained ones."""
    if isinstance(pretrained, nn.Module):
        pretrained = pretrained.state_dict()
    references = model.state_dict()
    dropped = dropped_groups(keep)
    missing = [name for name in references if split.classify(name) in dropped and name not in pretrained]
    if missing:
        raise KeyError(
            f"The pre-trained weights lack {len(missing)} tensors the export restores (e.g. {missing[0]}); are they "
            "of the same architecture?"
        )

    def tensor(name: str) -> torch.Tensor:
        if split.classify(name) in dropped:
            return pretrained[name].to(dtype=references[name].dtype)
        return references[name]

    return model, references, tensor


def export_source(
    model: nn.Module,
    keep: Keep,
    split: ModuleSplit | None = None,
    pretrained: Mapping[str, torch.Tensor] | nn.Module | None = None,
) -> TensorSource:
    """(plain model, its tensors by reference, name -> exported tensor) for a PEFT model or a full fine-tune."""
    _check_keep(keep)
    split = split or split_modules(model)
    if is_peft_model(model):
        return _lora_source(model, keep, split)
    if pretrained is None and keep != "all":
        raise ValueError("A full fine-tune's export needs the pre-trained weights: pass `pretrained`.")
    return _full_source(model, pretrained if pretrained is not None else {}, keep, split)


# --------------------------------------------------------------------------------------------------- writing
def _state_dict_dtype(references: Mapping[str, torch.Tensor]) -> torch.dtype:
    return next((t.dtype for t in references.values() if t.is_floating_point()), torch.float32)


def write_weights(
    model: PreTrainedModel,
    references: Mapping[str, torch.Tensor],
    tensor: Callable[[str], torch.Tensor],
    directory: Path,
    max_shard_size: int | str = DEFAULT_SHARD_SIZE,
) -> dict[str, Any]:
    """Write `tensor(name)` for every name of `references` into safetensors shards in `directory`, one shard in
    memory at a time, as `save_pretrained` lays them out (tied weights once, the checkpoint's original key format).

    Returns the shard index (`{"metadata": ..., "weight_map": ...}`).
    """
    from huggingface_hub import split_torch_state_dict_into_shards
    from safetensors.torch import save_file
    from transformers.core_model_loading import revert_weight_conversion
    from transformers.modeling_utils import remove_tied_weights_from_state_dict

    references = remove_tied_weights_from_state_dict(dict(references), model)
    plan = split_torch_state_dict_into_shards(
        references, filename_pattern="model{suffix}.safetensors", max_shard_size=max_shard_size
    )
    weight_map = {}
    for filename, names in plan.filename_to_tensors.items():
        shard = {name: tensor(name).detach().to("cpu").contiguous() for name in names}
        # transformers 5 fuses some checkpoints' tensors at load (MoE experts); write them back in the original
        # layout, as `save_pretrained` does, shard by shard.
        shard = revert_weight_conversion(model, shard)
        save_file(shard, str(directory / filename), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, filename))
        del shard
    index = {
        "metadata": {"total_parameters": sum(t.numel() for t in references.values()), **plan.metadata},
        "weight_map": weight_map,
    }
    if plan.is_sharded:
        (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return index


MODEL_CARD = """---
library_name: transformers
tags: [robust_sft, taia, trl, sft]
base_model: {base}
---

# {title}

This model was fine-tuned with robust_sft's `TAIATrainer` and exported with **keep = `{keep}`**:
{what}

Method: TAIA, *{paper_title}* ({venue}, [arXiv {paper_id}]({paper_url})): train all parameters, infer with only
the attention updates. The fine-tune was {training}; at export only the kept updates were merged into the
pre-trained weights, in the model's own dtype (`{dtype}`). It is a plain transformers model: load it with
`AutoModelForCausalLM.from_pretrained` (robust_sft is not needed).

- base model: `{base}`
- kept updates: {kept} attention/MLP parameters; reset to pre-trained: {dropped} parameters; embeddings, norms
  outside attention and the LM head: as trained

## Citation

```bibtex
{citation}
```
"""


_KEEP_TEXT = {
    "attention": "only the attention updates are kept; every MLP weight (experts and routers included) is the "
    "pre-trained model's (TAIA).",
    "mlp": "only the MLP updates are kept; every attention weight is the pre-trained model's (TAIF ablation).",
    "all": "every update is kept (a plain merge, the vanilla baseline).",
}


def _write_metadata(
    model: PreTrainedModel,
    directory: Path,
    dtype: torch.dtype,
    tokenizer: Any,
    keep: Keep,
    split: ModuleSplit,
    training: str,
) -> None:
    config = copy.deepcopy(model.config)
    config.dtype = str(dtype).removeprefix("torch.")
    config.architectures = [type(model).__name__]
    if hasattr(config, "quantization_config"):  # the export is never quantized
        del config.quantization_config
    config.save_pretrained(directory)
    if model.can_generate() and getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(directory)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)
    base = getattr(model.config, "_name_or_path", "") or "unknown"
    card = MODEL_CARD.format(
        base=base,
        title=f"TAIA export (keep={keep})",
        keep=keep,
        what=_KEEP_TEXT[keep],
        paper_title=TAIA_PAPER.title,
        venue=TAIA_PAPER.venue,
        paper_id=TAIA_PAPER.id,
        paper_url=TAIA_PAPER.url,
        training=training,
        dtype=config.dtype,
        kept=len(split.names(keep)),
        dropped=len(split.dropped(keep)),
        citation=TAIA_PAPER.citation,
    )
    (directory / "README.md").write_text(card)
    facts = {"method": "TAIA", "paper": f"arXiv:{TAIA_PAPER.id}", "keep": keep, "training": training}
    (directory / "taia.json").write_text(json.dumps({**facts, "dtype": config.dtype}, indent=2))


def write_taia_folder(
    source: TensorSource,
    directory: Path,
    keep: Keep,
    split: ModuleSplit,
    *,
    tokenizer: Any = None,
    training: str = "LoRA",
    max_shard_size: int | str = DEFAULT_SHARD_SIZE,
) -> None:
    """Weights, config, generation config, tokenizer, model card and `taia.json` of an export into `directory`."""
    model, references, tensor = source
    write_weights(model, references, tensor, directory, max_shard_size)
    _write_metadata(model, directory, _state_dict_dtype(references), tokenizer, keep, split, training)


def save_taia(
    model: nn.Module,
    output_dir: str | os.PathLike,
    keep: Keep = "attention",
    *,
    pretrained: Mapping[str, torch.Tensor] | nn.Module | None = None,
    split: ModuleSplit | None = None,
    tokenizer: Any = None,
    overwrite: bool = False,
    max_shard_size: int | str = DEFAULT_SHARD_SIZE,
    training: str | None = None,
) -> Path:
    """Write a plain transformers model with only the `keep` updates, tensor by tensor, into `output_dir`.

    Args:
        model: A PEFT (LoRA) model, whose kept adapters are merged by PEFT into copies of the base tensors, or a
            fully fine-tuned model, whose dropped groups are taken from `pretrained`.
        output_dir: The folder; refused when not empty unless `overwrite`. Written atomically (a temporary folder
            renamed into place), by the main process only.
        keep: `"attention"` (TAIA), `"mlp"` (TAIF) or `"all"` (plain merge).
        pretrained: Full fine-tuning only: the pre-trained tensors (a state dict, or a model) of the dropped groups.
        split: The attention / MLP split (default: `split_modules(model)`).
        tokenizer: Saved beside the model.
        max_shard_size: The largest shard (`"5GB"`, or bytes); the most the export holds in memory at once.
    """
    _check_keep(keep)
    output_dir = check_output_dir(output_dir, overwrite)
    if not _is_main_process():
        return output_dir
    split = split or split_modules(model)
    source = export_source(model, keep, split, pretrained)
    training = training or ("LoRA" if is_peft_model(model) else "full fine-tuning")
    with atomic_folder(output_dir) as tmp:
        write_taia_folder(
            source, tmp, keep, split, tokenizer=tokenizer, training=training, max_shard_size=max_shard_size
        )
    return output_dir


def export_taia(
    base_model: str | os.PathLike | PreTrainedModel,
    adapter: str | os.PathLike,
    output_dir: str | os.PathLike,
    keep: Keep = "attention",
    *,
    tokenizer: Any | None = None,
    dtype: torch.dtype | str = "auto",
    attention_modules: Sequence[str] | None = None,
    mlp_modules: Sequence[str] | None = None,
    overwrite: bool = False,
    max_shard_size: int | str = DEFAULT_SHARD_SIZE,
) -> Path:
    """Merge a saved LoRA adapter into its base model keeping only the `keep` updates, and save a plain model.

    The base is loaded once, in its own dtype (`dtype="auto"`), the adapter attached, and the kept updates merged
    tensor by tensor into the output (see `save_taia`): peak memory is about one model plus one shard. Only the
    main process of a distributed run does anything.

    Args:
        base_model: The pre-trained model (a hub id, a folder or a loaded full-precision model).
        adapter: A PEFT adapter folder trained on that base (e.g. `TAIATrainer.save_model` output).
        output_dir: Where the merged model, tokenizer and a model card go (refused when not empty, unless
            `overwrite`; never the adapter folder itself).
        keep: `"attention"` (TAIA), `"mlp"` (TAIF) or `"all"` (plain merge).
        tokenizer: Saved next to the model; by default loaded from the adapter folder, else from the base.
        dtype: The dtype the base is loaded in, and so of the merge and the saved weights (`"auto"`: the
            checkpoint's).
        attention_modules: Override of the architecture's attention parameters (name suffixes).
        mlp_modules: Override of the architecture's MLP parameters (name suffixes).
    """
    from peft import PeftModel

    _check_keep(keep)
    output_dir = check_output_dir(output_dir, overwrite, protected=[adapter])
    if not (Path(adapter) / "adapter_config.json").is_file():
        raise FileNotFoundError(f"{adapter} holds no adapter_config.json: pass a PEFT adapter folder.")
    if not _is_main_process():
        return output_dir
    if isinstance(base_model, (str, os.PathLike)):
        base_path = str(base_model)
        base_model = AutoModelForCausalLM.from_pretrained(base_path, dtype=dtype)
    else:
        base_path = getattr(base_model.config, "_name_or_path", None)
    if is_quantized(base_model):
        raise ValueError("export_taia needs the base model in full precision; pass its hub id or folder instead.")
    if tokenizer is None:
        source = adapter if (Path(adapter) / "tokenizer_config.json").is_file() else base_path
        tokenizer = AutoTokenizer.from_pretrained(source) if source else None
    split = split_modules(base_model, attention_modules, mlp_modules)
    peft_model = PeftModel.from_pretrained(base_model, str(adapter))
    return save_taia(
        peft_model, output_dir, keep, split=split, tokenizer=tokenizer, overwrite=overwrite,
        max_shard_size=max_shard_size,
    )  # fmt: skip


# --------------------------------------------------------------------------------------------------- in memory
def merge_taia(peft_model: nn.Module, keep: Keep = "attention", split: ModuleSplit | None = None) -> PreTrainedModel:
    """Merge only the kept LoRA updates into the base weights and return the plain transformers model.

    The same tensors as `save_taia` writes, built in place: the PEFT model is consumed (no copy is made).
    """
    _check_keep(keep)
    split = split or split_modules(peft_model)
    base, references, tensor = _lora_source(peft_model, keep, split)
    adapted = set(adapted_parameters(peft_model))
    values = {name: tensor(name) for name in adapted if split.keeps(name, keep)}
    # `unload` puts the trained modules_to_save copies in place: a dropped one goes back to its original tensors.
    values |= {name: references[name] for name in saved_module_copies(peft_model) if not split.keeps(name, keep)}
    plain = peft_model.unload()  # removes every adapter without merging
    for name, value in values.items():
        plain.get_parameter(name).data = value
    return without_forward_patch(plain)


def taia_state_dict(
    tuned: nn.Module,
    base_state: Mapping[str, torch.Tensor],
    keep: Keep = "attention",
    split: ModuleSplit | None = None,
) -> dict[str, torch.Tensor]:
    """A full fine-tune's state dict with the dropped groups' tensors taken from the pre-trained `base_state`.

    Embeddings, norms outside attention and the LM head come from the tuned model, as in the paper's full
    fine-tuning variant. Kept tensors are the tuned model's own (not copies).
    """
    _, references, tensor = _full_source(tuned, base_state, keep, split or split_modules(tuned))
    return {name: tensor(name) for name in references}


def base_tensors(model: nn.Module, names: Sequence[str] | ModuleSplit) -> dict[str, torch.Tensor]:
    """CPU copies (in the model's dtype) of the named tensors: what a full fine-tune's export restores.

    `names` is a list of parameter names, or a split (then its attention and MLP parameters)."""
    if isinstance(names, ModuleSplit):
        names = names.attention + names.mlp
    wanted = set(names)
    return {
        name: tensor.detach().to("cpu", copy=True) for name, tensor in model.state_dict().items() if name in wanted
    }
