"""ANITTrainer: noisy instructions plus a distortion-scaled adversarial embedding perturbation."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from accelerate.utils import DistributedType
from datasets import Dataset
from transformers.training_args import OptimizerNames

from ..data import detect_format
from ..methods import ANIT_PAPER
from ..trainer import RobustSFTTrainer
from ..trl_internals import muted_metrics
from .config import ANITConfig
from .noisy_data import NoisyDataMixin, _EpochNoise, _EpochNoiseCallback
from .perturbation import anit_perturbation, nrm_scale

logger = logging.getLogger(__name__)


class ANITTrainer(NoisyDataMixin, RobustSFTTrainer):
    """[`~trl.SFTTrainer`] with ANIT: noisy instructions plus a distortion-scaled adversarial embedding term.

    Overrides of the base: `_prepare_model` (keeps the model for the distortion encoder), `_prepare_dataset` (noise
    before tokenization; refusals of data with nothing to perturb), `get_train_dataloader` (`noise_per_epoch`),
    `training_step` (the two-pass adversarial step) and `compute_loss` (the clean loss in evaluation; the
    single-backward adversarial loss in training).

    Use it exactly like `SFTTrainer`, with a [`ANITConfig`]. After construction, `noise_log` is a `Dataset` with, per
    training row, the original and the trained instruction, the operator (`""` when the text is unchanged) and the
    distortion (`noise_logs[epoch]` for every epoch with `noise_per_epoch`). Logged metrics: `clean_loss`,
    `adversarial_loss` (on the steps that take the term), `distortion` (batch mean) and `adversarial_skipped`
    (micro-batches whose ascent was not finite, cumulative, summed over processes).
    """

    _tag_names = ["trl", "sft", "robust_sft", "anit"]
    _name = "ANIT"
    _paper = ANIT_PAPER.as_trl_paper()
    _token_fields = ("instruction_mask",)
    _example_fields = ("distortion",)

    def __init__(self, model=None, args: ANITConfig | None = None, *positional: Any, **kwargs: Any):
        args = args if args is not None else ANITConfig(output_dir="anit-output")
        if not isinstance(args, ANITConfig):
            raise TypeError(f"ANITTrainer needs a ANITConfig, got {type(args).__name__}.")
        self.noise_logs: dict[int, Dataset] = {}
        self.adversarial_skipped = 0
        self._distortion_model = None  # the loaded model before SFTTrainer wraps it, for the `model` encoder
        self._embedding_unit: float | None = args.adversarial_embedding_scale
        self._epoch_source: tuple | None = None  # what `noise_per_epoch` needs to prepare a later epoch's rows
        self._epoch_noise: _EpochNoise | None = None
        super().__init__(model, args, *positional, **kwargs)
        if args.noise_per_epoch and args.use_noise:
            self.add_callback(_EpochNoiseCallback(self))
        if args.use_adversarial:
            # Measured now, on the pre-trained embeddings: a run resumed from a checkpoint is built on the same base,
            # so it gets the same scale as the uninterrupted run (measured lazily, it read the trained embeddings).
            self.embedding_scale(self.model)
            logger.info(
                "ANIT: adversarial term on every %s step(s), %s; per-token sizes relative to the embedding scale: "
                "start %g, step %g, ball %g.",
                args.adversarial_every,
                "one backward (both graphs)" if self._single_backward() else "two passes",
                args.adversarial_init,
                args.adversarial_eta,
                args.adversarial_epsilon,
            )

    @property
    def noise_log(self) -> Dataset | None:
        """The first epoch's noise: per training row, instruction, noisy_instruction, operator and distortion."""
        return self.noise_logs.get(0)

    def _prepare_model(self, model, processing_class, args, kwargs):
        # Called for every model, passed or loaded by the base (a hub id, a folder or None): the `model` encoder of
        # the embedding distortion needs it, and PEFT's zero-initialised adapters do not change its outputs.
        self._distortion_model = model
        return super()._prepare_model(model, processing_class, args, kwargs)

    # ----------------------------------------------------------------------------------------------- data
    def _prepare_dataset(self, dataset, processing_class, args, packing, formatting_func, dataset_name):
        raw = isinstance(dataset, Dataset) and "input_ids" not in dataset.column_names
        if raw and "distortion" not in dataset.column_names:
            if dataset_name == "train":
                self._refuse_unperturbable_format(dataset, args)
            if dataset_name == "train" and args.use_noise:
                self._epoch_source = (dataset, processing_class, args, packing, formatting_func)
                dataset = self._noisy_rows(dataset, 0)
            else:  # evaluation stays clean; the column keeps the collator's fields uniform
                dataset = dataset.add_column("distortion", [0.0] * len(dataset))
        prepared = super()._prepare_dataset(dataset, processing_class, args, packing, formatting_func, dataset_name)
        if dataset_name == "train" and raw and args.use_adversarial:
            self._refuse_empty_masks(prepared, args)
        return prepared

    def _refuse_unperturbable_format(self, dataset: Dataset, args: ANITConfig) -> None:
        if detect_format(dataset.column_names) != "text":
            return
        if args.use_adversarial and args.adversarial_scope != "all":
            raise ValueError(
                f"`text` rows train every token and have no instruction, so adversarial_scope="
                f"'{args.adversarial_scope}' leaves nothing to perturb. Give prompt/completion, Alpaca or messages "
                "rows, or set adversarial_scope='all'."
            )
        if args.use_noise:
            raise ValueError(
                "`text` rows have no instruction span, so use_noise=True would train on clean rows only. Give "
                "prompt/completion, Alpaca or messages rows, or set use_noise=False."
            )

    def _refuse_empty_masks(self, dataset: Dataset, args: ANITConfig) -> None:
        """No training row has a token in the perturbation scope: the adversarial term would be the clean loss."""
        scope = args.adversarial_scope
        if scope == "all" or not isinstance(dataset, Dataset):
            return
        column = "labels" if scope == "prompt" else "instruction_mask"
        for row in dataset.select_columns([column]):  # stops at the first row with a token to perturb
            values = row[column]
            if (-100 in values) if scope == "prompt" else any(values):
                return
        fix = {
            "prompt": "give rows with a prompt that is not trained (prompt/completion or Alpaca rows with the "
            "completion-only loss, the default; messages rows with assistant_only_loss=True)",
            "instruction": "give rows with an instruction (an Alpaca `instruction`, a user turn, a `prompt`)",
        }[scope]
        raise ValueError(
            f"No training row has a token in adversarial_scope='{scope}', so the adversarial term would only repeat "
            f"the clean loss. Either {fix}, or set adversarial_scope='all' (or use_adversarial=False)."
        )

    def _instruction_transform(self, dataset: Dataset, dataset_name: str):
        if "noisy_instruction" not in dataset.column_names:
            return None
        noisy = dataset["noisy_instruction"]
        return lambda instruction, index: noisy[index]

    def _keep_columns(self, dataset: Dataset, dataset_name: str) -> tuple[str, ...]:
        return ("distortion",) if "distortion" in dataset.column_names else ()

    # ----------------------------------------------------------------------------------------------- loss
    def _adversarial_now(self) -> bool:
        """Whether this optimiser step takes the adversarial term (every micro-batch of a step decides alike)."""
        return self.args.use_adversarial and self.state.global_step % self.args.adversarial_every == 0

    def _single_backward(self) -> bool:
        choice = self.args.adversarial_passes
        if choice != "auto":
            return choice == "one"
        # DeepSpeed steps its optimizer inside the backward of a sync micro-step, LOMO inside every backward.
        lomo = self.args.optim in (OptimizerNames.LOMO, OptimizerNames.ADALOMO)
        return self.accelerator.distributed_type == DistributedType.DEEPSPEED or lomo

    def perturbation_mask(self, inputs: dict[str, Any]) -> torch.Tensor:
        """(batch, length) 0/1 float mask of the tokens the adversarial step may move (`adversarial_scope`)."""
        attention = inputs.get("attention_mask")
        if attention is None:
            attention = torch.ones_like(inputs["input_ids"])
        scope = self.args.adversarial_scope
        if scope == "all":
            mask = attention.bool()
        elif scope == "prompt":
            mask = attention.bool() & (inputs["labels"] == -100)
        else:
            mask = attention.bool() & inputs["instruction_mask"].bool()
        return mask.float()

    def embedding_scale(self, model) -> float:
        """The embedding scale s: `adversarial_embedding_scale`, else the mean L2 norm of the input-embedding rows
        (measured once, when the trainer is built; the same on every process)."""
        if self._embedding_unit is None:
            weight = self.accelerator.unwrap_model(model).get_input_embeddings().weight
            if weight.numel() == 0:  # a ZeRO-3 partitioned embedding
                raise ValueError(
                    "The input embeddings are partitioned (DeepSpeed ZeRO-3), so their scale cannot be measured; set "
                    "adversarial_embedding_scale (the mean L2 norm of the embedding rows)."
                )
            with torch.no_grad():
                self._embedding_unit = weight.detach().float().norm(dim=-1).mean().item()
            logger.info("ANIT: embedding scale s = %.4f (mean L2 norm of the embedding rows).", self._embedding_unit)
        return self._embedding_unit

    def adversarial_deltas(
        self, model, gradient: torch.Tensor, inputs: dict[str, Any], noise: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(delta0, delta1) for a batch, from the loss gradient with respect to its input embeddings.

        The NRM: example i's lengths are in units of `s * h(d_i)` (see [`anit_perturbation`]).
        """
        args = self.args
        distortion = inputs.get("distortion")
        if distortion is None:
            distortion = torch.zeros(gradient.shape[0])
        budget = nrm_scale(distortion.to(gradient.device, torch.float32), args.nrm_map, args.nrm_gamma)
        radius = self.embedding_scale(model) * budget
        mask = self.perturbation_mask(inputs).to(gradient.device)
        return anit_perturbation(
            gradient.detach(),
            mask,
            radius,
            init=args.adversarial_init,
            eta=args.adversarial_eta,
            epsilon=args.adversarial_epsilon,
            noise=noise,
        )

    @contextmanager
    def perturbed_embeddings(self, model, delta: torch.Tensor | None = None) -> Iterator[dict[str, torch.Tensor]]:
        """Within the block, the model's input embeddings are moved by `delta`; with `delta=None` by a zero leaf
        tensor (yielded as `probe`) whose `.grad` after a backward is the gradient of the loss w.r.t. the embeddings.

        A forward hook on the input-embedding module, so the model is still called with `input_ids` and TRL's
        `compute_loss` runs unchanged (its loss type, label smoothing, `compute_loss_func`, auxiliary losses).
        """
        state: dict[str, torch.Tensor] = {}

        def hook(module, args, output):
            if delta is not None:
                return output + delta.to(output.dtype)
            if "probe" not in state:  # one leaf for every forward of the block (e.g. TRL's metrics pass)
                state["probe"] = torch.zeros_like(output, requires_grad=True)
            return output + state["probe"]

        handle = self.accelerator.unwrap_model(model).get_input_embeddings().register_forward_hook(hook)
        try:
            yield state
        finally:
            handle.remove()

    def _ascent(self, model, gradient: torch.Tensor | None, inputs: dict[str, Any]) -> torch.Tensor | None:
        """delta1 from the embedding gradient of the clean loss, or None (counted) when it is not finite."""
        if gradient is not None and torch.isfinite(gradient).all():
            delta1 = self.adversarial_deltas(model, gradient, inputs)[1]
            if torch.isfinite(delta1).all():
                return delta1
        self.adversarial_skipped += 1
        logger.warning("ANIT: the embedding gradient is not finite; the adversarial term is skipped for this batch.")
        return None

    def _log_step(self, clean: torch.Tensor, extras: dict[str, Any], num_items_in_batch) -> None:
        self._log_metric("clean_loss", self.step_share(clean.detach(), num_items_in_batch))
        if "distortion" in extras:
            self._log_metric("distortion", extras["distortion"].float().mean())

    def _clean_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

    def _adversarial_term(self, model, inputs, delta1, num_items_in_batch) -> torch.Tensor:
        """TRL's loss at the perturbed embeddings; its pass records none of TRL's metrics (entropy, tokens)."""
        with self.perturbed_embeddings(model, delta1), muted_metrics(self):
            return super().compute_loss(model, dict(inputs), False, num_items_in_batch)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """TRL's loss in evaluation and on steps without the adversarial term; on the others, in training,
        `clean + w * adversarial` in one graph (the single-backward path; `training_step` uses two passes unless
        `adversarial_passes` says otherwise)."""
        if not (model.training and self.args.use_adversarial):
            return self._clean_loss(model, inputs, return_outputs, num_items_in_batch)
        _, extras = self._split_extras(inputs)
        if not self._adversarial_now():
            result = self._clean_loss(model, inputs, return_outputs, num_items_in_batch)
            self._log_step(result[0] if return_outputs else result, extras, num_items_in_batch)
            self._log_total("adversarial_skipped", self.adversarial_skipped)
            return result
        with self.perturbed_embeddings(model) as state:
            result = self._clean_loss(model, inputs, return_outputs, num_items_in_batch)
        loss, outputs = result if return_outputs else (result, None)
        self._log_step(loss, extras, num_items_in_batch)
        (gradient,) = torch.autograd.grad(loss, state["probe"], retain_graph=True)
        delta1 = self._ascent(model, gradient, inputs)
        adversarial = None
        if delta1 is not None:
            # On the unwrapped model: under DDP the one backward of the sum then reduces each gradient once.
            unwrapped = self.accelerator.unwrap_model(model)
            adversarial = self._adversarial_term(unwrapped, inputs, delta1, num_items_in_batch)
            loss = loss + self.args.adversarial_weight * adversarial
        self._log_adversarial(adversarial, num_items_in_batch)
        return (loss, outputs) if return_outputs else loss

    def _log_adversarial(self, adversarial: torch.Tensor | None, num_items_in_batch) -> None:
        # Fixed-size collectives on every process, whether or not its batch skipped the term.
        value = self.step_share(adversarial.detach(), num_items_in_batch) if adversarial is not None else 0.0
        self._log_ratio("adversarial_loss", value, 0 if adversarial is None else 1)
        self._log_total("adversarial_skipped", self.adversarial_skipped)

    # ----------------------------------------------------------------------------------------------- step
    def _backward_loss(self, loss: torch.Tensor, num_items_in_batch) -> torch.Tensor:
        """The loss as `Trainer.training_step` hands it to `accelerator.backward` (transformers 5.23)."""
        if self.args.n_gpu > 1:
            loss = loss.mean()
        scaled = self.loss_is_scaled_for_ga
        if scaled is None:
            scaled = (self.model_accepts_loss_kwargs and num_items_in_batch is not None) or (
                self.compute_loss_func is not None
            )
        return loss if scaled else loss / self.current_gradient_accumulation_steps

    def _backward(self, loss: torch.Tensor) -> None:
        kwargs = {}
        if self.accelerator.distributed_type == DistributedType.DEEPSPEED:
            kwargs["scale_wrt_gas"] = False
        self.accelerator.backward(loss, **kwargs)

    def training_step(self, model, inputs, num_items_in_batch=None):
        """SFT's step, or on the adversarial steps two forward and two backward passes, one graph at a time:

        1. TRL's clean loss with a zero probe on the input embeddings; its backward gives the parameter gradients of
           the clean term and, on the probe, dL/dx (under `no_sync`: nothing is reduced yet).
        2. delta1 from dL/dx (per-token ascent from a random start, NRM budget); TRL's loss at x + delta1 and its
           backward adds the adversarial term's parameter gradients (and, on a sync step, DDP reduces the sum once).
        """
        if not self._adversarial_now() or self._single_backward():
            return super().training_step(model, inputs, num_items_in_batch)
        cp_context, inputs = self._prepare_context_parallel_inputs(model, inputs)
        with cp_context(), self.maybe_activation_offload_context:
            model.train()
            if hasattr(self.optimizer, "train") and callable(self.optimizer.train):
                self.optimizer.train()
            inputs = self._prepare_inputs(inputs)
            _, extras = self._split_extras(inputs)
            with self.accelerator.no_sync(model):  # DDP decides at forward time: both must be inside
                with self.perturbed_embeddings(model) as state, self.compute_loss_context_manager():
                    clean = self._clean_loss(model, dict(inputs), False, num_items_in_batch)
                clean_backward = self._backward_loss(clean, num_items_in_batch)
                self._backward(clean_backward)
            self._log_step(clean, extras, num_items_in_batch)
            probe = state.pop("probe")
            delta1 = self._ascent(model, probe.grad, inputs)
            skipped, weight = delta1 is None, self.args.adversarial_weight
            if skipped and self.accelerator.num_processes > 1 and self.accelerator.sync_gradients:
                # Every process must run the reducing backward: a zero-weighted pass at the clean embeddings.
                delta1, weight = torch.zeros_like(probe), 0.0
            total, adversarial = clean_backward.detach(), None
            if delta1 is not None:
                with self.compute_loss_context_manager():
                    adversarial = self._adversarial_term(model, inputs, delta1, num_items_in_batch)
                adversarial_backward = self._backward_loss(weight * adversarial, num_items_in_batch)
                self._backward(adversarial_backward)
                total = total + adversarial_backward.detach()
            self._log_adversarial(None if skipped else adversarial, num_items_in_batch)
            return total
