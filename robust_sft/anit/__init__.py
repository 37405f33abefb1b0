"""ANIT: adversarial noisy instruction tuning (Bai et al., AAAI 2025, doi:10.1609/aaai.v39i22.34513).

Two parts, each can be switched off for the ablations:

1. Noisy instructions: with probability `noise_rate`, an example's instruction (the instruction span found by the
   shared data layer; the answer is untouched) is replaced by a perturbed copy from one of `noise_operators`
   ([`robust_sft.anit.noise`]); each example carries the semantic distortion of its instruction (0 when clean).
2. Adversarial embedding perturbation with the Noise Response Method: from a random start on the input embeddings
   (NEFTune's scale), one normalised gradient-ascent step whose size grows with the example's distortion,
   `eta_i = adversarial_eta * h(d_i)`, applied to the prompt tokens only by default. The loss is
   `clean + adversarial_weight * adversarial`, both normalised like TRL 1.16's loss (token sum / tokens in the
   global batch), so gradient accumulation gives the same result as one large batch.

Files: `noise.py` (the instruction perturbations), `distortion.py` (their semantic distortion), `config.py`,
`trainer.py`.
"""

from .config import ANIT_OPERATORS, ANITConfig
from .distortion import EmbeddingDistortion, SentenceEncoder, describe_perturbations, levenshtein_distortion
from .noise import OPERATORS, NoiseContext, get_operator, operators_for, perturb
from .trainer import ANITTrainer, anit_perturbation, nrm_scale

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
