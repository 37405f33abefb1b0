"""ANIT: adversarial noisy instruction tuning (Bai et al., AAAI 2025, doi:10.1609/aaai.v39i22.34513).

Two parts, each can be switched off for the ablations:

1. Noisy instructions: with probability `noise_rate`, an example's instruction (the instruction span found by the
   shared data layer; the answer is untouched) is replaced by a perturbed copy from one of `noise_operators`
   ([`robust_sft.anit.noise`]); each example carries the semantic distortion of its instruction (0 when clean).
2. Adversarial embedding perturbation with the Noise Response Method: on every `adversarial_every`-th step, a random
   start and one per-token normalised ascent step on the input embeddings of the prompt tokens (by default), sized
   relative to the model's embedding scale and projected onto a per-token ball, every length multiplied by
   `h(d_i)` for an example of distortion `d_i`. The loss is `clean + adversarial_weight * adversarial`, both TRL
   1.16's own loss (token sum / tokens in the global batch, its loss type), computed in two forward and two backward
   passes with one graph alive at a time, the ascent gradient coming from the clean term's backward.

Files: `noise.py` (the instruction perturbations), `distortion.py` (their semantic distortion), `config.py`,
`trainer.py`.
"""

from .config import ANIT_OPERATORS, ANITConfig
from .distortion import EmbeddingDistortion, SentenceEncoder, describe_perturbations, levenshtein_distortion
from .noise import OPERATORS, NoiseContext, get_operator, operators_for, perturb
from .perturbation import anit_perturbation, nrm_scale
from .trainer import ANITTrainer

# The names of earlier releases.
NoisyInstructionConfig = ANITConfig
NoisyInstructionTrainer = ANITTrainer

__all__ = [
    "ANITConfig",
    "ANITTrainer",
    "ANIT_OPERATORS",
    "EmbeddingDistortion",
    "NoiseContext",
    "NoisyInstructionConfig",
    "NoisyInstructionTrainer",
    "OPERATORS",
    "SentenceEncoder",
    "describe_perturbations",
    "get_operator",
    "levenshtein_distortion",
    "anit_perturbation",
    "nrm_scale",
    "operators_for",
    "perturb",
]
