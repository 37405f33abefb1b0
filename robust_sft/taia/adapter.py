"""The TAIA adapter: a PEFT LoRA adapter folder with the dropped updates taken out (the MLP ones for TAIA).

It is what a LoRA server loads beside an untouched base model: `PeftModel.from_pretrained(base, folder)` computes
the TAIA model, and the folder keeps PEFT's file layout (`adapter_model.safetensors` with
`base_model.model.<module>.lora_A.weight` / `lora_B.weight` keys, `adapter_config.json` with `r`, `lora_alpha` and the
`target_modules` that remain), the layout vLLM's LoRA loader reads.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ..methods import TAIA_PAPER
from .export import _is_main_process, atomic_folder, check_output_dir
from .modules import Group, Keep, _check_keep, _matches, canonical_name, classify, dropped_groups

logger = logging.getLogger(__name__)

PEFT_PREFIX = "base_model.model."
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
# Files of the adapter folder that are carried over unchanged (the tokenizer a trainer saves beside the adapter).
_CARRIED = ("tokenizer*", "special_tokens_map.json", "vocab.*", "merges.txt", "chat_template.*", "added_tokens.json")

ADAPTER_CARD = """---
library_name: peft
tags: [robust_sft, taia, lora]
base_model: {base}
---

# TAIA adapter (keep={keep})

A LoRA adapter trained with robust_sft's `TAIATrainer`, with {what} Load it on the untouched base model with
`PeftModel.from_pretrained(base, this_folder)` (or serve it as a LoRA adapter); merged, it gives the TAIA model.

Removed: {removed} adapter tensors ({dropped} updates); kept: {kept} tensors. `target_modules`: {targets}.

Method: TAIA, *{title}* ({venue}, [arXiv {paper_id}]({url})).

```bibtex
{citation}
```
"""

_WHAT = {
    "attention": "only its attention updates kept (the MLP, expert and router adapters removed: TAIA).",
    "mlp": "only its MLP updates kept (the attention adapters removed: the TAIF ablation).",
    "all": "every update kept (a copy of the adapter).",
}


def _module_of(key: str) -> str | None:
    """The adapted module of an adapter tensor key (`...q_proj.lora_A.weight` -> `...q_proj`), None for a
    `modules_to_save` tensor (a full tensor, named as in the model)."""
    body = key.removeprefix(PEFT_PREFIX)
    marker = body.find(".lora_")
    if marker < 0:
        return None
    return canonical_name(body[:marker])


def _key_group(
    key: str,
    target_parameters: Sequence[str],
    attention_modules: Sequence[str] | None,
    mlp_modules: Sequence[str] | None,
) -> Group | None:
    module = _module_of(key)
    if module is None:  # a modules_to_save tensor
        return classify(key.removeprefix(PEFT_PREFIX), attention_modules, mlp_modules)
    # A `target_parameters` wrapper adapts a named parameter of the module (a fused expert tensor, a router weight).
    candidates = [
        f"{module}.{target.rsplit('.', 1)[-1]}"
        for target in target_parameters
        if _matches(f"{module}.{target.rsplit('.', 1)[-1]}", [target])
    ] or [f"{module}.weight"]
    groups = {classify(name, attention_modules, mlp_modules) for name in candidates}
    if len(groups) > 1:
        raise ValueError(f"The adapter tensor {key} adapts parameters of several groups ({sorted(map(str, groups))}).")
    return groups.pop()


def _filter_targets(targets: Any, kept: set[str], dropped: set[str]) -> list[str]:
    """`target_modules` that reach the kept LoRA modules and none of the dropped ones: each listed target that
    reaches only kept modules stays; one that also reached dropped ones (`"c_proj"`, `"all-linear"`, a regex) is
    replaced by the full names of the kept modules it reached."""
    if isinstance(targets, str):
        return sorted(kept)
    filtered = set()
    for target in targets or ():
        reached = {module for module in kept if _matches(module, [target])}
        if reached:
            filtered |= reached if any(_matches(module, [target]) for module in dropped) else {target}
    return sorted(filtered)


def _pattern_reaches(pattern: str, modules: set[str]) -> bool:
    # PEFT's rank_pattern / alpha_pattern matching
    return any(re.match(rf"(.*\.)?({pattern})$", module) for module in modules)


def _read_adapter(adapter_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    if (adapter_dir / ADAPTER_WEIGHTS).is_file():
        return load_file(adapter_dir / ADAPTER_WEIGHTS)
    if (adapter_dir / "adapter_model.bin").is_file():
        return torch.load(adapter_dir / "adapter_model.bin", map_location="cpu", weights_only=True)
    raise FileNotFoundError(f"{adapter_dir} holds no adapter_model.safetensors (or .bin).")


def export_taia_adapter(
    adapter_dir: str | os.PathLike,
    output_dir: str | os.PathLike,
    keep: Keep = "attention",
    *,
    attention_modules: Sequence[str] | None = None,
    mlp_modules: Sequence[str] | None = None,
    overwrite: bool = False,
) -> Path:
    """Copy a saved LoRA adapter folder keeping only the `keep` updates: the TAIA adapter for PEFT and LoRA servers.

    The dropped adapters are removed from `adapter_model.safetensors`, and from `target_modules`,
    `target_parameters`, `rank_pattern`, `alpha_pattern` and `modules_to_save` in `adapter_config.json`; no base
    model is loaded. The tokenizer files of the folder are carried over.

    Args:
        adapter_dir: A PEFT LoRA adapter folder (e.g. `TAIATrainer.save_model` output).
        output_dir: The new adapter folder (refused when not empty, unless `overwrite`; never `adapter_dir`).
        keep: `"attention"` (TAIA: MLP, expert and router adapters removed), `"mlp"` or `"all"`.
        attention_modules: Override of the architecture's attention parameters (name suffixes), as in training.
        mlp_modules: Override of the architecture's MLP parameters.
    """
    _check_keep(keep)
    adapter_dir = Path(adapter_dir)
    output_dir = check_output_dir(output_dir, overwrite, protected=[adapter_dir])
    config_path = adapter_dir / ADAPTER_CONFIG
    if not config_path.is_file():
        raise FileNotFoundError(f"{adapter_dir} holds no {ADAPTER_CONFIG}: pass a PEFT adapter folder.")
    config = json.loads(config_path.read_text())
    if config.get("peft_type") != "LORA":
        raise ValueError(f"{adapter_dir} is a {config.get('peft_type')} adapter; TAIA adapters are LoRA adapters.")
    if not _is_main_process():
        return output_dir
    tensors = _read_adapter(adapter_dir)
    target_parameters = config.get("target_parameters") or []
    dropped = dropped_groups(keep)
    groups = {key: _key_group(key, target_parameters, attention_modules, mlp_modules) for key in tensors}
    kept_tensors = {key: tensor for key, tensor in tensors.items() if groups[key] not in dropped}
    lora_modules = {key: _module_of(key) for key in tensors if _module_of(key) is not None}
    kept_modules = {module for key, module in lora_modules.items() if key in kept_tensors}
    dropped_modules = {module for key, module in lora_modules.items() if key not in kept_tensors}
    wrapped = {module for module in kept_modules | dropped_modules if _is_parameter_target(module, target_parameters)}

    config["target_modules"] = _filter_targets(
        config.get("target_modules"), kept_modules - wrapped, dropped_modules - wrapped
    )
    kept_parameters = [t for t in target_parameters if classify(t, attention_modules, mlp_modules) not in dropped]
    config["target_parameters"] = kept_parameters or None
    for field in ("rank_pattern", "alpha_pattern"):
        config[field] = {p: v for p, v in (config.get(field) or {}).items() if _pattern_reaches(p, kept_modules)}
    if config.get("modules_to_save"):
        kept_saved = [m for m in config["modules_to_save"] if classify(f"{m}.weight") not in dropped]
        config["modules_to_save"] = kept_saved or None
    _warn_serving_limits(config, kept_tensors)

    from safetensors.torch import save_file

    with atomic_folder(output_dir) as tmp:
        save_file(kept_tensors, str(tmp / ADAPTER_WEIGHTS), metadata={"format": "pt"})
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True))
        for pattern in _CARRIED:
            for path in adapter_dir.glob(pattern):
                if path.is_file():
                    shutil.copy2(path, tmp / path.name)
        (tmp / "README.md").write_text(
            ADAPTER_CARD.format(
                base=config.get("base_model_name_or_path") or "unknown",
                keep=keep,
                what=_WHAT[keep],
                removed=len(tensors) - len(kept_tensors),
                dropped=" and ".join(dropped) or "no",
                kept=len(kept_tensors),
                targets=config["target_modules"],
                title=TAIA_PAPER.title,
                venue=TAIA_PAPER.venue,
                paper_id=TAIA_PAPER.id,
                url=TAIA_PAPER.url,
                citation=TAIA_PAPER.citation,
            )
        )
        facts = {"method": "TAIA", "paper": f"arXiv:{TAIA_PAPER.id}", "keep": keep, "artifact": "LoRA adapter"}
        (tmp / "taia.json").write_text(json.dumps(facts, indent=2))
    return output_dir


def _is_parameter_target(module: str, target_parameters: Sequence[str]) -> bool:
    return any(_matches(f"{module}.{t.rsplit('.', 1)[-1]}", [t]) for t in target_parameters)


def _warn_serving_limits(config: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
    """What vLLM's LoRA loader refuses (checked against its source; see docs/trainers/taia.md)."""
    problems = []
    if config.get("modules_to_save"):
        problems.append(f"modules_to_save={config['modules_to_save']}")
    if config.get("use_dora"):
        problems.append("use_dora=True")
    if config.get("target_parameters"):
        problems.append(f"target_parameters={config['target_parameters']} (PEFT's fused-expert LoRA)")
    if any(not key.startswith(PEFT_PREFIX) for key in tensors):
        problems.append("tensor keys without the base_model.model. prefix")
    if problems:
        logger.warning(
            "The TAIA adapter loads with PEFT, but LoRA servers such as vLLM refuse %s; serve the merged TAIA model "
            "(save_taia_model / export_taia) instead.",
            ", ".join(problems),
        )
