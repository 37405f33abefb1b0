"""The collator that carries per-token and per-example fields to `compute_loss`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from trl.trainer.sft_trainer import DataCollatorForLanguageModeling


@dataclass
class RobustDataCollator(DataCollatorForLanguageModeling):
    """TRL's language-modelling collator that also carries extra fields to `compute_loss`.

    Args:
        token_fields: Per-token fields (lists as long as `input_ids`, e.g. `instruction_mask`), right-padded with 0.
        example_fields: Per-example fields (a number or a string per row, e.g. a weight, a distortion score, a source
            tag): numbers become a tensor of shape `(batch,)`, strings a list.
    """

    token_fields: tuple[str, ...] = ()
    example_fields: tuple[str, ...] = ()

    def torch_call(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        if self.padding_free and self.token_fields:
            raise ValueError(
                "Per-token extra fields cannot be carried with padding_free=True; set padding_free=False."
            )
        output = super().torch_call(examples)
        length = output["input_ids"].shape[1]
        for name in self.token_fields:
            if name not in examples[0]:
                raise KeyError(
                    f"The collator was asked to carry `{name}` but the examples only have {list(examples[0])}."
                )
            padded = torch.zeros((len(examples), length), dtype=torch.long)
            for row, example in enumerate(examples):
                values = torch.as_tensor(example[name][:length], dtype=torch.long)
                padded[row, : len(values)] = values
            output[name] = padded
        for name in self.example_fields:
            if name not in examples[0]:
                raise KeyError(
                    f"The collator was asked to carry `{name}` but the examples only have {list(examples[0])}."
                )
            values = [example[name] for example in examples]
            output[name] = values if isinstance(values[0], str) else torch.as_tensor(values)
        return output
