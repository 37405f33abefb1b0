"""The registry of robust_sft's methods: one entry per method, read by the package, the CLI, the benchmarks and docs.

In the spirit of PEFT's `register_peft_method`: a method is a name, a trainer class and a config class (given as
import paths, so that reading the registry imports no torch), the paper it implements and its docs page. Adding a
method is one [`register_method`] call here plus its package.
"""

from __future__ import annotations

import importlib
import re
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Paper:
    """What TRL's model card shows of a paper (`BaseTrainer._paper`: title, id, citation)."""

    title: str
    id: str
    url: str
    venue: str = ""
    citation: str = ""

    @property
    def is_arxiv(self) -> bool:
        return re.fullmatch(r"\d{4}\.\d{4,5}", self.id) is not None

    def as_trl_paper(self) -> dict[str, str]:
        """The dict TRL's `create_model_card` reads from a trainer's `_paper`. TRL links the id as a Hugging Face
        papers page, which exists for arXiv ids only: another id (a DOI) is left to the citation."""
        paper = {"title": self.title}
        if self.is_arxiv:
            paper["id"] = self.id
        if self.citation:
            paper["citation"] = self.citation
        return paper


@dataclass(frozen=True)
class Method:
    """A registered method.

    Attributes:
        name: The CLI name (`robust-sft train <name>`) and the model-card tag.
        trainer: `"module:Class"` of the trainer.
        config: `"module:Class"` of its config dataclass.
        summary: One line for `--help` and the docs index.
        docs: The docs page, relative to `docs/`.
        paper: The paper the method implements (None for the plain baseline).
        aliases: Other public names of the trainer and config classes (kept for earlier releases).
        trainable_from_cli: Whether `robust-sft train <name>` runs it (a realignment needs a task vector first).
    """

    name: str
    trainer: str
    config: str
    summary: str
    docs: str
    paper: Paper | None = None
    aliases: dict[str, str] = field(default_factory=dict)
    trainable_from_cli: bool = True

    @property
    def tags(self) -> list[str]:
        """The tags of the model card."""
        return ["robust_sft", self.name] if self.name != "sft" else ["robust_sft"]

    def trainer_class(self) -> type:
        return _import(self.trainer)

    def config_class(self) -> type:
        return _import(self.config)

    @property
    def class_names(self) -> dict[str, str]:
        """Public name -> `"module:Class"`, aliases included."""
        names = {self.trainer.rpartition(":")[2]: self.trainer, self.config.rpartition(":")[2]: self.config}
        for alias, target in self.aliases.items():
            names[alias] = names[target]
        return names


def _import(path: str) -> Any:
    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)


METHODS: dict[str, Method] = {}


def register_method(method: Method) -> Method:
    """Add a method to the registry (its name must be new)."""
    if method.name in METHODS:
        raise ValueError(f"A method named {method.name!r} is already registered.")
    METHODS[method.name] = method
    return method


def get_method(name: str) -> Method:
    """The registered method `name`; a clear error listing the choices otherwise."""
    if name not in METHODS:
        raise KeyError(f"Unknown method {name!r}; registered methods: {', '.join(METHODS)}.")
    return METHODS[name]


TAIA_PAPER = Paper(
    title="TAIA: Large Language Models are Out-of-Distribution Data Learners",
    id="2405.20192",
    url="https://arxiv.org/abs/2405.20192",
    venue="NeurIPS 2024",
    citation="@inproceedings{jiang2024taia, title={{TAIA}: Large Language Models are Out-of-Distribution Data "
    "Learners}, author={Jiang, Shuyang and Liao, Yusheng and Zhang, Ya and Wang, Yanfeng and Wang, Yu}, "
    "booktitle={Advances in Neural Information Processing Systems}, year={2024}, eprint={2405.20192}, "
    "archivePrefix={arXiv}}",
)
DELIA_PAPER = Paper(
    title="DELIA: Diversity-Enhanced Learning for Instruction Adaptation in Large Language Models",
    id="2408.10841",
    url="https://arxiv.org/abs/2408.10841",
)
ANIT_PAPER = Paper(
    title="Enhancing NLU in Large Language Models Using Adversarial Noisy Instruction Tuning",
    id="10.1609/aaai.v39i22.34513",
    url="https://doi.org/10.1609/aaai.v39i22.34513",
    venue="AAAI 2025",
    citation="@inproceedings{bai2025anit, title={Enhancing {NLU} in Large Language Models Using Adversarial Noisy "
    "Instruction Tuning}, booktitle={Proceedings of the AAAI Conference on Artificial Intelligence}, volume={39}, "
    "number={22}, year={2025}, doi={10.1609/aaai.v39i22.34513}}",
)
REALIGN_PAPER = Paper(
    title="A Safety Realignment Framework via Subspace-Oriented Model Fusion for Large Language Models",
    id="2405.09055",
    url="https://arxiv.org/abs/2405.09055",
)

register_method(
    Method(
        name="sft",
        trainer="robust_sft.trainer:RobustSFTTrainer",
        config="robust_sft.config:RobustSFTConfig",
        summary="Plain SFT on the shared data layer: the baseline and the base class of every method.",
        docs="trainers/robust_sft.md",
    )
)
register_method(
    Method(
        name="taia",
        trainer="robust_sft.taia:TAIATrainer",
        config="robust_sft.taia:TAIAConfig",
        summary="TAIA: train LoRA on all linear layers, infer with the attention updates only.",
        docs="trainers/taia.md",
        paper=TAIA_PAPER,
    )
)
register_method(
    Method(
        name="anit",
        trainer="robust_sft.anit:ANITTrainer",
        config="robust_sft.anit:ANITConfig",
        summary="ANIT: noisy instructions plus a distortion-scaled adversarial embedding perturbation.",
        docs="trainers/anit.md",
        paper=ANIT_PAPER,
        aliases={"NoisyInstructionTrainer": "ANITTrainer", "NoisyInstructionConfig": "ANITConfig"},
    )
)
register_method(
    Method(
        name="delia",
        trainer="robust_sft.delia:DELIATrainer",
        config="robust_sft.delia:DELIAConfig",
        summary="DELIA: mix self-sampled diverse rows (build_cache) into a small task set.",
        docs="trainers/delia.md",
        paper=DELIA_PAPER,
        aliases={"DSFTTrainer": "DELIATrainer", "DSFTConfig": "DELIAConfig"},
    )
)
register_method(
    Method(
        name="realign",
        trainer="robust_sft.realign:SafetyRealignTrainer",
        config="robust_sft.realign:SafetyRealignConfig",
        summary="Safety realignment: a DPO-trained mask over a fine-tune's task vector; TIES/DARE fusion, RESTA.",
        docs="trainers/realign.md",
        paper=REALIGN_PAPER,
    )
)
