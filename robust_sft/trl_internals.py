"""What the trainers need to know of TRL 1.16's internals, in one place.

- The fused LM head: `SFTTrainer.compute_loss` calls `model(**inputs, fused_lm_head=True)`, whose output has per-token
  `log_probs` (0 on ignored positions) and `label_mask`, and no `logits`.
- The loss normalisation: TRL's loss is a token sum divided by `num_items_in_batch` (the tokens of the whole optimiser
  step, over every process when `average_tokens_across_devices`), then multiplied by the number of processes, because
  DDP averages gradients over them. An extra loss term must be normalised the same way.
- The metrics: `SFTTrainer.compute_loss` records entropy, token accuracy and the token count on every call; an extra
  pass over the same batch runs it inside [`muted_metrics`].
- The forward patch: `add_fused_lm_head` stores a closure over the *original* model's forward on the instance; a deep
  copy keeps that closure, so the copy would silently run the original's weights.

[`TRLLossMixin`] is part of `RobustSFTTrainer`, the base of every method trainer; the functions serve code that has
no trainer (exports, references).
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn


def unwrap_peft(model: nn.Module) -> nn.Module:
    """The transformers model inside a PEFT model (the model itself otherwise)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def without_forward_patch(model: nn.Module) -> nn.Module:
    """Drop an instance-level `forward` (TRL's fused-LM-head patch) so the class forward runs again."""
    vars(unwrap_peft(model)).pop("forward", None)
    return model


def copy_model(model: nn.Module) -> nn.Module:
    """A deep copy that runs its own weights (see the module docstring)."""
    return without_forward_patch(copy.deepcopy(model))


def fused_forward(model: nn.Module, inputs: dict[str, Any], **overrides: Any) -> Any:
    """The model's forward through TRL's fused LM head: an output with per-token `log_probs` and `label_mask`."""
    return model(**{**inputs, **overrides}, use_cache=False, fused_lm_head=True)


@contextmanager
def captured_outputs(model: nn.Module) -> Iterator[list[Any]]:
    """Collect the outputs of `model`'s forward calls made within the block (e.g. TRL's fused forward)."""
    captured: list[Any] = []
    handle = model.register_forward_hook(lambda module, args, output: captured.append(output))
    try:
        yield captured
    finally:
        handle.remove()


def fused_output(captured: list[Any]) -> Any | None:
    """The first captured output that carries fused per-token log-probabilities, or None."""
    return next((output for output in captured if getattr(output, "log_probs", None) is not None), None)


@contextmanager
def muted_metrics(trainer: Any) -> Iterator[None]:
    """Run `SFTTrainer.compute_loss` again on a batch without recording its metrics a second time.

    TRL 1.16 appends `entropy` and `mean_token_accuracy` to `trainer._metrics[mode]` and adds the batch's tokens to
    `trainer._total_train_tokens` (the logged `num_tokens`) on every call; both are restored when the block ends.
    Its collectives still run, the same number of times on every process.
    """
    saved = {mode: {name: list(values) for name, values in kept.items()} for mode, kept in trainer._metrics.items()}
    tokens = getattr(trainer, "_total_train_tokens", None)
    try:
        yield
    finally:
        for mode, metrics in trainer._metrics.items():
            metrics.clear()
            metrics.update(saved.get(mode, {}))
        if tokens is not None:
            trainer._total_train_tokens = tokens


class TRLLossMixin:
    """Loss and metric arithmetic that matches `SFTTrainer.compute_loss` (needs `self.args` and `self.accelerator`)."""

    def _process_factor(self, num_items_in_batch: Any) -> int:
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            return self.accelerator.num_processes // self.get_tp_size()
        return 1

    def normalise_token_sum(
        self, token_sum: torch.Tensor, num_items_in_batch: Any, fallback_count: torch.Tensor
    ) -> torch.Tensor:
        """A token sum as a loss term normalised exactly like TRL's loss (`fallback_count`: the micro-batch's own
        tokens, used when Trainer gives no `num_items_in_batch`, e.g. in evaluation)."""
        count = fallback_count if num_items_in_batch is None else num_items_in_batch
        return token_sum / torch.as_tensor(count).clamp(min=1) * self._process_factor(num_items_in_batch)

    def step_share(self, loss: torch.Tensor, num_items_in_batch: Any) -> torch.Tensor:
        """A micro-batch's normalised loss as the whole step's loss would read, for logging: normalised by the step's
        tokens it is a share of that loss; times the number of micro-batches, the logged mean is the step's loss.

        The loss already carries TRL's factor of the number of processes, so the mean over processes that
        `_log_metric` takes is the step's loss (as Trainer's own logged loss): it must not be divided again.
        """
        if num_items_in_batch is None:
            return loss
        # Set by Trainer's loop; a direct compute_loss call falls back to the configured accumulation.
        scale = getattr(self, "current_gradient_accumulation_steps", self.args.gradient_accumulation_steps)
        return loss * scale

    def _log_metric(self, name: str, value: torch.Tensor | float) -> None:
        """Record a scalar for the next log line, averaged over processes (as SFTTrainer does for its metrics).

        A collective: every process must call it the same number of times (never under a data-dependent branch).
        """
        mode = "train" if self.model.training else "eval"
        if not isinstance(value, torch.Tensor):
            value = torch.tensor(float(value), device=self.accelerator.device)
        value = value.detach().float().reshape(1).to(self.accelerator.device)
        self._metrics[mode][name].append(self.accelerator.gather_for_metrics(value).mean().item())

    def _log_total(self, name: str, value: torch.Tensor | float) -> None:
        """Record the sum of a per-process count over every process (a collective, like `_log_metric`)."""
        mode = "train" if self.model.training else "eval"
        value = torch.tensor([float(value)], device=self.accelerator.device)
        self._metrics[mode][name].append(self.accelerator.gather(value).sum().item())

    def _log_ratio(self, name: str, total: torch.Tensor | float, count: torch.Tensor | float) -> None:
        """Record sum(total) / sum(count) over every process: a fixed-size collective, safe when a process has no
        item of this kind (count 0); nothing is recorded when no process has one."""
        mode = "train" if self.model.training else "eval"
        pair = torch.tensor([float(total), float(count)], device=self.accelerator.device)
        summed = self.accelerator.gather(pair.reshape(1, 2)).sum(0)
        if summed[1] > 0:
            self._metrics[mode][name].append((summed[0] / summed[1]).item())
