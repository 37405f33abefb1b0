"""Safety realignment by subspace-oriented model fusion (Yi et al. 2024, arXiv 2405.09055).

Fine-tuning an aligned model, even on benign data, erodes its safety. Treat the fine-tune as a task vector
`tau = W_ft - W_safe` and learn a mask `m` over it that keeps the task-useful part and drops the part that breaks
safety: the realigned weights are `W_safe + m * tau / mean(m)` (per tensor). The mask is a Concrete (relaxed
Bernoulli) variable per element (or per row, or per tensor), trained with DPO on safety preference pairs while every
model weight stays frozen ([`SafetyRealignTrainer`]). Several masked task vectors can then be fused with PEFT's
merge utilities (task arithmetic, TIES, DARE, magnitude pruning).

The mask is attached with `torch.nn.utils.parametrize` (public torch API): each masked weight is computed from the
frozen original and its mask on access, so the model stays an ordinary transformers / PEFT model that TRL's
`DPOTrainer` (fused LM head included) drives unchanged.
"""

from __future__ import annotations

import copy
import gzip
import json
import logging
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset
from peft import PeftModel
from peft.utils import merge_utils
from torch import nn
from torch.nn.utils import parametrize
from transformers import PreTrainedModel
from trl import DPOConfig, DPOTrainer

from .data import DataFormatError, load_examples
from .trainer import apply_device_defaults

logger = logging.getLogger(__name__)

GRANULARITIES = ("element", "row", "tensor")
EXPORT_MODES = ("threshold", "expected")
REPORT_FILE = "realign_report.json"


# ------------------------------------------------------------------------------------------------ task vectors
def _safetensors_files(folder: str | os.PathLike, single: str, index: str) -> dict[str, str]:
    """tensor name -> file, for a folder with one safetensors file or a sharded one with an index."""
    folder = Path(folder)
    if (folder / index).is_file():
        weight_map = json.loads((folder / index).read_text())["weight_map"]
        return {name: str(folder / file) for name, file in weight_map.items()}
    if (folder / single).is_file():
        from safetensors import safe_open

        with safe_open(str(folder / single), "pt") as handle:
            return dict.fromkeys(handle.keys(), str(folder / single))
    raise FileNotFoundError(f"{folder} has neither {single} nor {index}: not a safetensors model/adapter folder.")


def _read_tensor(path: str, name: str) -> torch.Tensor:
    from safetensors import safe_open

    with safe_open(path, "pt") as handle:
        return handle.get_tensor(name)


def task_vector_from_models(
    safe: str | os.PathLike,
    finetuned: str | os.PathLike,
    include: str | None = r"\.(layers|h|blocks)\.\d+\.",
    dtype: torch.dtype = torch.float32,
) -> dict[str, torch.Tensor]:
    """`W_ft - W_safe` for every matrix that differs, read tensor by tensor from two safetensors model folders.

    Only one tensor of each model is in memory at a time, so the cost is the task vector itself (no full copies of
    the two models). `include` is a regular expression on tensor names (default: the transformer blocks; `None` for
    every tensor); 1-D tensors (norms, biases) are skipped.
    """
    safe_files = _safetensors_files(safe, "model.safetensors", "model.safetensors.index.json")
    ft_files = _safetensors_files(finetuned, "model.safetensors", "model.safetensors.index.json")
    vector = {}
    for name, path in ft_files.items():
        if include is not None and not re.search(include, name):
            continue
        if name not in safe_files:
            raise ValueError(f"{finetuned} has tensor {name} that {safe} lacks: are they the same architecture?")
        tuned = _read_tensor(path, name).to(dtype)
        if tuned.dim() < 2:
            continue
        difference = tuned - _read_tensor(safe_files[name], name).to(dtype)
        if torch.count_nonzero(difference):
            vector[name] = difference
    if not vector:
        raise ValueError(f"{finetuned} and {safe} do not differ in any tensor matching {include!r}.")
    return vector


def task_vector_from_adapters(
    finetuned_adapter: str | os.PathLike, safe_adapter: str | os.PathLike | None = None
) -> dict[str, torch.Tensor]:
    """The element-wise difference of the `lora_A` / `lora_B` tensors of two LoRA adapters (the paper's LoRA mode).

    Without `safe_adapter` the safe model is the base itself (its adapter is zero), so the vector is the fine-tuned
    adapter's tensors. Names are those of the adapter file (`...q_proj.lora_A.weight`).
    """
    ft_files = _safetensors_files(
        finetuned_adapter, "adapter_model.safetensors", "adapter_model.safetensors.index.json"
    )
    safe_files = (
        _safetensors_files(safe_adapter, "adapter_model.safetensors", "adapter_model.safetensors.index.json")
        if safe_adapter is not None
        else {}
    )
    vector = {}
    for name, path in ft_files.items():
        if ".lora_A." not in name and ".lora_B." not in name:
            continue
        tuned = _read_tensor(path, name).float()
        if safe_adapter is not None and name not in safe_files:
            raise ValueError(f"{safe_adapter} has no tensor {name}: the two adapters must share their LoRA targets.")
        vector[name] = tuned - (_read_tensor(safe_files[name], name).float() if safe_files else 0.0)
    if not vector:
        raise ValueError(f"{finetuned_adapter} holds no lora_A / lora_B tensors.")
    return vector


def _parameter_names(model: nn.Module, names: Iterable[str]) -> dict[str, str]:
    """Map task-vector names to the model's parameter names (adapter files omit the adapter name `default`)."""
    parameters = {name for name, _ in model.named_parameters()}
    mapping = {}
    for name in names:
        candidates = [name, re.sub(r"\.(lora_[AB])\.weight$", r".\1.default.weight", name)]
        candidates += [f"base_model.model.{candidate}" for candidate in candidates]
        found = next((candidate for candidate in candidates if candidate in parameters), None)
        if found is None:
            raise KeyError(f"The task vector's tensor {name} matches no parameter of the model.")
        mapping[name] = found
    return mapping


def apply_task_vector(model: nn.Module, vector: dict[str, torch.Tensor], scale: float = 1.0) -> nn.Module:
    """Add `scale * vector` to the model's weights in place (scale 1 on the safe model gives the fine-tuned one)."""
    names = _parameter_names(model, vector)
    with torch.no_grad():
        for name, delta in vector.items():
            parameter = model.get_parameter(names[name])
            parameter.add_((scale * delta).to(parameter.device, parameter.dtype))
    return model


# ------------------------------------------------------------------------------------------------ the mask
def scaled_mask(mask: torch.Tensor) -> torch.Tensor:
    """`m / mean(m)` per tensor, and 0 when the mask is all zeros (the realigned weight is then the safe one)."""
    mean = mask.mean()
    return torch.where(mean > 0, mask / mean.clamp(min=torch.finfo(mask.dtype).tiny), torch.zeros_like(mask))


class ConcreteMask(nn.Module):
    """A parametrization `weight -> weight + m * tau / mean(m)` with a Concrete (relaxed Bernoulli) mask `m`.

    In training mode `m = sigmoid((logits + log u - log(1 - u)) / temperature)` with `u ~ U(0, 1)`; in eval mode the
    deterministic export mask: `threshold` (`sigmoid(logit) > 0.5`) or `expected` (`sigmoid(logit)`).
    """

    def __init__(
        self,
        task_vector: torch.Tensor,
        granularity: str = "element",
        temperature: float = 0.5,
        init_logit: float = 0.0,
        export_mode: str = "threshold",
    ):
        super().__init__()
        if granularity not in GRANULARITIES:
            raise ValueError(f"mask granularity must be one of {GRANULARITIES}, got {granularity!r}.")
        if export_mode not in EXPORT_MODES:
            raise ValueError(f"export_mode must be one of {EXPORT_MODES}, got {export_mode!r}.")
        self.register_buffer("task_vector", task_vector.detach().float(), persistent=False)
        shape = {
            "element": tuple(task_vector.shape),
            "row": (task_vector.shape[0],) + (1,) * (task_vector.dim() - 1),
            "tensor": (1,) * task_vector.dim(),
        }[granularity]
        self.logits = nn.Parameter(torch.full(shape, float(init_logit)))
        self.temperature, self.export_mode = temperature, export_mode

    def mask(self) -> torch.Tensor:
        """The mask over the whole task vector (broadcast from the logits' shape)."""
        if self.training:
            noise = torch.rand_like(self.logits).clamp(1e-6, 1 - 1e-6)
            mask = torch.sigmoid((self.logits + torch.log(noise) - torch.log1p(-noise)) / self.temperature)
        elif self.export_mode == "threshold":
            mask = (self.logits > 0).float()  # sigmoid(logit) > 0.5
        else:
            mask = torch.sigmoid(self.logits)
        return mask.expand_as(self.task_vector)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        delta = scaled_mask(self.mask()) * self.task_vector
        return weight + delta.to(weight.dtype)

    def kept_fraction(self) -> float:
        """Share of the task vector the export keeps (threshold) or its expected share (expected)."""
        kept = (self.logits > 0).float() if self.export_mode == "threshold" else torch.sigmoid(self.logits)
        return kept.detach().expand_as(self.task_vector).mean().item()


def attach_masks(
    model: nn.Module, task_vector: dict[str, torch.Tensor], **mask_options: Any
) -> dict[str, ConcreteMask]:
    """Freeze every parameter of `model` and put a trainable [`ConcreteMask`] on each task-vector tensor.

    The model's weights must be the safe ones (`W_safe`); `mask_options` go to `ConcreteMask`. Returns the masks by
    the task vector's names.
    """
    names = _parameter_names(model, task_vector)
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    masks = {}
    for name, delta in task_vector.items():
        module_name, attribute = names[name].rsplit(".", 1)
        module = model.get_submodule(module_name)
        if tuple(delta.shape) != tuple(getattr(module, attribute).shape):
            raise ValueError(f"{name}: task vector shape {tuple(delta.shape)} != weight shape.")
        mask = ConcreteMask(delta.to(getattr(module, attribute).device), **mask_options)
        parametrize.register_parametrization(module, attribute, mask)
        masks[name] = mask
    return masks


def mask_report(masks: dict[str, ConcreteMask]) -> dict[str, Any]:
    """Kept fraction per masked tensor and overall (weighted by size)."""
    per_tensor = {name: mask.kept_fraction() for name, mask in masks.items()}
    sizes = {name: mask.task_vector.numel() for name, mask in masks.items()}
    total = sum(per_tensor[name] * sizes[name] for name in masks) / max(sum(sizes.values()), 1)
    return {"kept_fraction": total, "per_tensor": per_tensor}


def remove_masks(model: nn.Module, masks: dict[str, ConcreteMask], export_mode: str | None = None) -> nn.Module:
    """Bake the deterministic masks into the weights (`W_safe + m * tau / mean(m)`) and drop the parametrizations."""
    for mask in masks.values():
        mask.eval()
        if export_mode is not None:
            mask.export_mode = export_mode
    for module in list(model.modules()):
        if parametrize.is_parametrized(module):
            for attribute in list(module.parametrizations.keys()):
                with torch.no_grad():
                    parametrize.remove_parametrizations(module, attribute, leave_parametrized=True)
    return model


# ------------------------------------------------------------------------------------------------ the trainer
@dataclass
class SafetyRealignConfig(DPOConfig):
    r"""
    Configuration for [`SafetyRealignTrainer`] ([Yi et al. 2024, arXiv 2405.09055](https://arxiv.org/abs/2405.09055)).

    Everything of [`~trl.DPOConfig`] applies (`beta` 0.1 and the sigmoid loss, as the paper). Differences: a learning
    rate for mask logits, and `bf16` / `use_cpu` set from the hardware.

    Parameters:
        mask_granularity (`str`, *optional*, defaults to `"element"`):
            One mask logit per task-vector `element` (the paper), per `row`, or per `tensor` (cheaper options).
        mask_temperature (`float`, *optional*, defaults to `0.5`):
            Temperature of the Concrete relaxation.
        mask_init_logit (`float`, *optional*, defaults to `0.0`):
            Initial logit (0 gives p = 0.5, the paper's init).
        export_mode (`str`, *optional*, defaults to `"threshold"`):
            Deterministic mask of the export: `threshold` (sigmoid(logit) > 0.5) or `expected` (sigmoid(logit)).
    """

    learning_rate: float = field(
        default=5e-3, metadata={"help": "Learning rate of the mask logits (paper: 1e-3..1e-2)."}
    )
    mask_granularity: str = field(
        default="element", metadata={"help": "Mask logits per element, row or tensor.", "choices": list(GRANULARITIES)}
    )
    mask_temperature: float = field(default=0.5, metadata={"help": "Concrete relaxation temperature."})
    mask_init_logit: float = field(default=0.0, metadata={"help": "Initial mask logit (0 = keep with p 0.5)."})
    export_mode: str = field(
        default="threshold",
        metadata={"help": "Export mask: threshold (sigmoid > 0.5) or expected.", "choices": list(EXPORT_MODES)},
    )

    def __post_init__(self):
        apply_device_defaults(self)
        if self.mask_granularity not in GRANULARITIES:
            raise ValueError(f"mask_granularity must be one of {GRANULARITIES}, got {self.mask_granularity!r}.")
        if self.export_mode not in EXPORT_MODES:
            raise ValueError(f"export_mode must be one of {EXPORT_MODES}, got {self.export_mode!r}.")
        if self.mask_temperature <= 0:
            raise ValueError(f"mask_temperature must be > 0, got {self.mask_temperature}.")
        super().__post_init__()


class SafetyRealignTrainer(DPOTrainer):
    """[`~trl.DPOTrainer`] that trains only a mask over a fine-tune's task vector, on safety preference pairs.

    Args:
        model: The **safe** model (`W_safe`): a transformers model, or a `PeftModel` carrying the safe adapter (LoRA
            mode, the task vector then holds `lora_A` / `lora_B` differences).
        task_vector: `{name: W_ft - W_safe}` from [`task_vector_from_models`] or [`task_vector_from_adapters`].
        ref_model: DPO's reference. Default: the unmasked fine-tuned model (a copy of `model` plus the task vector; in
            LoRA mode merged into a plain model, as is a `PeftModel` given here).
        train_dataset: Preference pairs (`prompt` / `chosen` / `rejected`), e.g. from [`load_hh_rlhf`].

    Every model weight is frozen; the optimiser sees only the mask logits. [`export`] writes the realigned model (or
    adapter) with the deterministic mask and a report of the kept fraction per tensor.
    """

    _tag_names = ["trl", "dpo", "robust_sft", "safety-realignment"]
    _name = "Safety realignment"
    _paper = {
        "title": "A Safety Realignment Framework via Subspace-Oriented Model Fusion for Large Language Models",
        "id": "2405.09055",
    }

    def __init__(
        self,
        model: PreTrainedModel | PeftModel,
        task_vector: dict[str, torch.Tensor],
        ref_model: PreTrainedModel | PeftModel | None = None,
        args: SafetyRealignConfig | None = None,
        train_dataset: Dataset | str | os.PathLike | None = None,
        eval_dataset: Dataset | None = None,
        processing_class: Any | None = None,
        **kwargs: Any,
    ):
        args = args if args is not None else SafetyRealignConfig(output_dir="realign-output")
        if not isinstance(args, SafetyRealignConfig):
            raise TypeError(f"SafetyRealignTrainer needs a SafetyRealignConfig, got {type(args).__name__}.")
        if kwargs.get("peft_config") is not None:
            raise ValueError("SafetyRealignTrainer trains a mask, not an adapter: do not pass peft_config.")
        if not task_vector:
            raise ValueError("The task vector is empty: nothing to realign.")
        if ref_model is None:
            # The unmasked fine-tuned model; copied before TRL patches the forward (a copy would keep the patch).
            ref_model = apply_task_vector(copy.deepcopy(model), task_vector)
        if isinstance(ref_model, PeftModel):
            # TRL's fused LM head patches the reference's own forward, which must be a transformers model's.
            ref_model = ref_model.merge_and_unload()
        if isinstance(train_dataset, (str, os.PathLike)):
            train_dataset = load_preference_pairs(train_dataset)
        self.masks = attach_masks(
            model,
            task_vector,
            granularity=args.mask_granularity,
            temperature=args.mask_temperature,
            init_logit=args.mask_init_logit,
            export_mode=args.export_mode,
        )
        super().__init__(
            model=model,
            ref_model=ref_model,
            args=args,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            **kwargs,
        )

    def mask_report(self) -> dict[str, Any]:
        """Kept fraction of the task vector, overall and per tensor, under the export mask."""
        return mask_report(self.masks)

    def export(
        self, output_dir: str | os.PathLike, export_mode: str | None = None, merge: bool = False
    ) -> dict[str, Any]:
        """Write the realigned model (LoRA mode: the realigned adapter, or with `merge=True` the merged model) and
        `realign_report.json`; return the report.

        The masks are baked into the trainer's model, which becomes the plain realigned model (no more training).
        """
        output_dir = Path(output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
        mode = export_mode or self.args.export_mode
        for mask in self.masks.values():
            mask.export_mode = mode
        report = {"export_mode": mode, **self.mask_report()}
        model = self.accelerator.unwrap_model(self.model)
        remove_masks(model, self.masks, mode)
        if merge and isinstance(model, PeftModel):
            model = model.merge_and_unload()
        model.save_pretrained(str(output_dir))
        if self.processing_class is not None:
            self.processing_class.save_pretrained(str(output_dir))
        temporary = output_dir / f".{REPORT_FILE}.tmp"
        temporary.write_text(json.dumps(report, indent=2))
        os.replace(temporary, output_dir / REPORT_FILE)
        logger.info(
            "Realigned model written to %s (kept %.1f%% of the task vector).",
            output_dir,
            100 * report["kept_fraction"],
        )
        return report


# ------------------------------------------------------------------------------------------------ fusion
FUSION_METHODS = ("task_arithmetic", "ties", "dare_linear", "dare_ties", "magnitude_prune")
FUSION_DEFAULTS = {  # the paper's settings
    "task_arithmetic": {"weight": 0.3},
    "ties": {"weight": 0.4, "density": 0.2},
    "dare_linear": {"weight": 0.3, "density": 0.8},
    "dare_ties": {"weight": 0.3, "density": 0.8},
    "magnitude_prune": {"weight": 0.3, "density": 0.2},
}


def masked_task_vector(vector: dict[str, torch.Tensor], masks: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`m * tau / mean(m)` per tensor (tensors without a mask are kept whole)."""
    return {
        name: scaled_mask(masks[name].float().expand_as(delta)) * delta if name in masks else delta
        for name, delta in vector.items()
    }


def fuse_task_vectors(
    vectors: Sequence[dict[str, torch.Tensor]],
    method: str = "task_arithmetic",
    weights: Sequence[float] | None = None,
    density: float | None = None,
    masks: Sequence[dict[str, torch.Tensor] | None] | None = None,
    majority_sign_method: str = "total",
) -> dict[str, torch.Tensor]:
    """Fuse several task vectors tensor by tensor with `peft.utils.merge_utils`, after applying each one's mask.

    Defaults are the paper's: task arithmetic lambda 0.3; TIES density 0.2 (top 20%) lambda 0.4; DARE drop 20%
    (density 0.8). The result is a task vector: add it to the safe model with [`apply_task_vector`].
    """
    if method not in FUSION_METHODS:
        raise ValueError(f"Unknown fusion method {method!r}; expected one of {FUSION_METHODS}.")
    defaults = FUSION_DEFAULTS[method]
    weights = list(weights) if weights is not None else [defaults["weight"]] * len(vectors)
    density = density if density is not None else defaults.get("density")
    if len(weights) != len(vectors):
        raise ValueError(f"Got {len(weights)} weights for {len(vectors)} task vectors.")
    if masks is not None:
        vectors = [masked_task_vector(vector, mask or {}) for vector, mask in zip(vectors, masks, strict=True)]
    names = set(vectors[0])
    if any(set(vector) != names for vector in vectors[1:]):
        raise ValueError("The task vectors do not cover the same tensors; fuse vectors of the same model and targets.")
    weight_tensor = torch.tensor(weights, dtype=torch.float32)
    function = getattr(merge_utils, method)
    fused = {}
    for name in vectors[0]:
        tensors = [vector[name].float() for vector in vectors]
        if method == "task_arithmetic":
            fused[name] = function(tensors, weight_tensor)
        elif method in ("ties", "dare_ties"):
            fused[name] = function(tensors, weight_tensor, density, majority_sign_method)
        else:
            fused[name] = function(tensors, weight_tensor, density)
    return fused


def resta(finetuned: nn.Module, safety_vector: dict[str, torch.Tensor], coefficient: float = 1.0) -> nn.Module:
    """RESTA baseline: add back a safety vector, `W_ft + b * (W_aligned - W_unaligned)`, in place."""
    return apply_task_vector(finetuned, safety_vector, coefficient)


# ------------------------------------------------------------------------------------------------ preference data
_HH_TURN = re.compile(r"\n\n(Human|Assistant): ")


def parse_hh_dialogue(text: str) -> list[dict[str, str]]:
    """`\\n\\nHuman: ...\\n\\nAssistant: ...` into chat turns."""
    parts = _HH_TURN.split("\n\n" + text.lstrip("\n") if not text.startswith("\n\n") else text)
    turns = []
    for speaker, content in zip(parts[1::2], parts[2::2]):
        turns.append({"role": "user" if speaker == "Human" else "assistant", "content": content.strip()})
    return turns


def hh_to_preference(row: dict[str, str], index: int | None = None) -> dict[str, Any]:
    """An hh-rlhf row (`chosen`, `rejected`: whole dialogues) as a conversational preference pair."""
    chosen, rejected = parse_hh_dialogue(row["chosen"]), parse_hh_dialogue(row["rejected"])
    where = f"Row {index}" if index is not None else "A row"
    if not chosen or chosen[-1]["role"] != "assistant" or not rejected or rejected[-1]["role"] != "assistant":
        raise DataFormatError(f"{where}: a dialogue does not end with an Assistant turn.")
    if chosen[:-1] != rejected[:-1]:
        raise DataFormatError(f"{where}: the chosen and rejected dialogues differ before their last turn.")
    return {"prompt": chosen[:-1], "chosen": [chosen[-1]], "rejected": [rejected[-1]]}


def load_hh_rlhf(path: str | os.PathLike, limit: int | None = None, skip_invalid: bool = True) -> Dataset:
    """hh-rlhf pairs (`.jsonl` or `.jsonl.gz` with `chosen` / `rejected` dialogues) as `prompt` / `chosen` /
    `rejected` conversational rows. Pairs whose dialogues differ before the last turn, or whose answers are equal,
    are skipped (and counted in the log) unless `skip_invalid=False`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Preference file {path} does not exist.")
    opener = gzip.open if path.suffix == ".gz" else open
    rows, skipped = [], 0
    with opener(path, "rt", encoding="utf-8") as handle:
        for index, line in enumerate(handle):
            if limit is not None and len(rows) >= limit:
                break
            try:
                pair = hh_to_preference(json.loads(line), index)
                if pair["chosen"][0]["content"] == pair["rejected"][0]["content"]:
                    raise DataFormatError(f"Row {index}: chosen and rejected answers are the same.")
            except DataFormatError:
                if not skip_invalid:
                    raise
                skipped += 1
                continue
            rows.append(pair)
    if skipped:
        logger.info("%s: skipped %d pairs that are not a clean preference between two last turns.", path, skipped)
    return Dataset.from_list(rows)


def load_preference_pairs(source: Dataset | str | os.PathLike) -> Dataset:
    """`prompt` / `chosen` / `rejected` rows (text or conversational) from a Dataset or a file; hh-rlhf files (only
    `chosen` / `rejected` dialogues) are converted."""
    if isinstance(source, (str, os.PathLike)) and str(source).endswith(".gz"):
        return load_hh_rlhf(source)
    data = load_examples(source)
    columns = set(data.column_names)
    if columns >= {"prompt", "chosen", "rejected"}:
        return data
    if columns >= {"chosen", "rejected"}:
        return Dataset.from_list([hh_to_preference(row, index) for index, row in enumerate(data)])
    raise DataFormatError(
        f"Preference data needs `prompt`, `chosen` and `rejected` columns (or hh-rlhf `chosen` / `rejected` "
        f"dialogues); got {sorted(columns)}."
    )
