"""DELIATrainer: mix self-sampled diverse rows into a small task set (diverse-gradient buffering)."""

from __future__ import annotations

import functools
import json
import logging
import math
import os
from collections.abc import Sequence
from fractions import Fraction
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset, concatenate_datasets
from peft import PeftModel
from transformers import PreTrainedModel

from ..data import load_examples
from ..methods import DELIA_PAPER
from ..trainer import RobustSFTTrainer
from ..trl_internals import captured_outputs, fused_output
from .config import SOURCES, DELIAConfig
from .store import is_usable, meta_path, read_rows
from .tokens import DSFT_FILE, add_tokens_and_rows, expose_head_bias, with_embedding_target, with_trainable_tokens

logger = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------------ diverse data
def load_diverse_dataset(
    source: Dataset | str | os.PathLike | Sequence[str | os.PathLike], keep_truncated: bool = False
) -> Dataset:
    """The diverse rows: a Dataset, a cache file written by [`build_cache`], or a list of such files.

    Rows that [`build_cache`] flagged as cut off by `max_new_tokens` (`finish_reason: "length"`) and empty answers
    are dropped (counted in the log), unless `keep_truncated`: a truncated answer trained with an end-of-turn token
    appended would teach the model to stop mid-sentence. Other data files are read by the data layer.
    """
    if isinstance(source, Dataset):
        if "finish_reason" not in source.column_names or keep_truncated:
            return source
        return _drop_unusable(source.to_list(), "the diverse Dataset")
    paths = [source] if isinstance(source, (str, os.PathLike)) else list(source)
    if not paths:
        raise ValueError("diverse_dataset is an empty list of files.")
    missing = [str(path) for path in paths if not Path(path).is_file()]
    if missing:
        raise FileNotFoundError(
            f"Diverse data file(s) {missing} do not exist. Build a cache with `robust_sft.delia.build_cache(...)` "
            "or `robust-sft build-cache --queries QUERIES --output CACHE.jsonl`, or pass a Dataset."
        )
    parts = [_load_diverse_file(Path(path), keep_truncated) for path in paths]
    parts = [part.select_columns(["messages"]) if "messages" in part.column_names else part for part in parts]
    return concatenate_datasets(parts) if len(parts) > 1 else parts[0]


def _load_diverse_file(path: Path, keep_truncated: bool) -> Dataset:
    """A build_cache file is read line by line (`\n` only, whatever the text); any other file by the data layer."""
    if path.suffix == ".jsonl":
        rows, _ = read_rows(path) if _is_cache(path) else ([], 0)
        if rows:
            return Dataset.from_list(rows) if keep_truncated else _drop_unusable(rows, str(path))
    return load_examples(path)


def _is_cache(path: Path) -> bool:
    if meta_path(path).is_file():
        return True
    with open(path, encoding="utf-8", errors="replace") as handle:
        return '"query_key"' in handle.readline()


def _drop_unusable(rows: list[dict[str, Any]], name: str) -> Dataset:
    usable = [row for row in rows if is_usable(row)]
    if len(usable) < len(rows):
        truncated = sum(row.get("finish_reason") == "length" for row in rows)
        logger.warning(
            "DELIA: %s: dropped %d of %d rows (%d cut off by max_new_tokens, %d empty answers); pass "
            "keep_truncated=True to keep them.",
            name,
            len(rows) - len(usable),
            len(rows),
            truncated,
            len(rows) - len(usable) - truncated,
        )
    if not usable:
        raise ValueError(f"{name} has no usable row (all {len(rows)} are truncated or empty): raise max_new_tokens.")
    return Dataset.from_list([{"messages": row["messages"]} for row in usable])


class DELIATrainer(RobustSFTTrainer):
    """[`~trl.SFTTrainer`] on task rows mixed with self-sampled diverse rows (DELIA, diverse-gradient buffering).

    Overrides of the base: `_prepare_dataset` (the mix), `compute_loss` (per-source losses and weights) and `_save`
    (the new tokens).

    Args:
        train_dataset: The task rows (any data-layer format; a Dataset or a file path).
        diverse_dataset: The diverse rows: a Dataset, a cache file written by [`build_cache`], or a list of files.
        eval_dataset: Task rows only; diverse rows are never evaluated.

    Every other argument is that of [`~trl.SFTTrainer`]. After construction `mix_counts` holds the number of task and
    diverse rows in the training set. Logged metrics: `task_loss`, `diverse_loss` (per-token means of the batch).
    """

    _tag_names = ["trl", "sft", "robust_sft", "delia"]
    _name = "DELIA"
    _paper = DELIA_PAPER.as_trl_paper()
    _example_fields = ("source",)

    def __init__(
        self,
        model: str | os.PathLike | PreTrainedModel | None = None,
        args: DELIAConfig | None = None,
        data_collator: Any | None = None,
        train_dataset: Dataset | str | os.PathLike | None = None,
        eval_dataset: Dataset | dict[str, Dataset] | str | os.PathLike | None = None,
        processing_class: Any | None = None,
        diverse_dataset: Dataset | str | os.PathLike | Sequence[str | os.PathLike] | None = None,
        **kwargs: Any,
    ):
        args = args if args is not None else DELIAConfig(output_dir="dsft-output")
        if not isinstance(args, DELIAConfig):
            raise TypeError(f"DELIATrainer needs a DELIAConfig, got {type(args).__name__}.")
        weighted = args.task_weight != 1 or args.diverse_weight != 1
        if weighted and kwargs.get("compute_loss_func") is not None:
            raise ValueError(
                "compute_loss_func replaces TRL's loss, which task_weight / diverse_weight reweight: the weights "
                "would be ignored. Set both weights to 1, or fold the weighting into your loss function."
            )
        if diverse_dataset is None and args.diverse_ratio > 0:
            raise ValueError(
                "DELIATrainer needs `diverse_dataset` (a Dataset, a cache file from build_cache, or a list of files); "
                "set diverse_ratio=0 to train on the task rows alone."
            )
        self.diverse_dataset = load_diverse_dataset(diverse_dataset) if diverse_dataset is not None else None
        self.mix_counts: dict[str, int] = {}
        self.new_token_ids: list[int] = []
        super().__init__(
            model=model,
            args=args,
            data_collator=data_collator,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            **kwargs,
        )
        self._count_trained_rows()
        if self.new_token_ids and args.new_token_training == "trainable_tokens":
            expose_head_bias(self.accelerator.unwrap_model(self.model))

    def _count_trained_rows(self) -> None:
        """TRL drops rows that truncation left without a completion token: count what really trains, and say so."""
        if not self.mix_counts or "source" not in (self.train_dataset.column_names or []):
            return
        sources = self.train_dataset["source"]
        trained = {name: sum(source == code for source in sources) for code, name in enumerate(SOURCES)}
        if trained != self.mix_counts:
            logger.warning(
                "DELIA: %s rows mixed, %s train: TRL dropped the rows whose prompt fills max_length=%s (no completion"
                " token left). Raise max_length to keep them.",
                self.mix_counts,
                trained,
                self.args.max_length,
            )
            self.mix_counts = trained

    def _prepare_model(self, model: PreTrainedModel, processing_class: Any, args: DELIAConfig, kwargs: dict[str, Any]):
        """Add the new special tokens (before PEFT wraps the model) and make their embedding rows trainable."""
        if not args.new_special_tokens:
            return model
        if processing_class is None:
            raise ValueError("new_special_tokens needs the tokenizer: pass processing_class.")
        tokenizer = getattr(processing_class, "tokenizer", processing_class)
        self.new_token_ids, self._base_vocab_size = add_tokens_and_rows(
            model, tokenizer, args.new_special_tokens, args.embedding_pad_multiple
        )  # the rows from _base_vocab_size on start as the mean embedding (None: no row was touched)
        peft_config = kwargs.get("peft_config")
        if peft_config is None:
            return model
        if args.new_token_training == "trainable_tokens":
            if not hasattr(peft_config, "trainable_token_indices"):
                raise ValueError(
                    f"new_token_training='trainable_tokens' needs a LoraConfig (PEFT's trainable_token_indices), got "
                    f"{type(peft_config).__name__}: use LoRA, or new_token_training='lora_embedding'."
                )
            kwargs["peft_config"] = with_trainable_tokens(peft_config, model, self.new_token_ids)
        else:
            kwargs["peft_config"] = with_embedding_target(peft_config, model)
            logger.warning(
                "DSFT with LoRA on the embedding: the input rows of %s train, their output rows stay at the mean"
                " initialisation, so the model reads the new tokens but does not learn to write them. Use"
                " new_token_training='trainable_tokens' (or full fine-tuning) when the answers must contain them.",
                args.new_special_tokens,
            )
        return model

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        model = self.accelerator.unwrap_model(self.model)
        if self.new_token_ids and isinstance(model, PeftModel):
            # PEFT would save the whole (resized) embedding and LM head matrices; the embedding's LoRA update is in the
            # adapter, and load_dsft_model rebuilds the resized base rows exactly.
            model.save_pretrained = functools.partial(type(model).save_pretrained, model, save_embedding_layers=False)
            try:
                super()._save(output_dir, state_dict)
            finally:
                del model.save_pretrained
        else:
            super()._save(output_dir, state_dict)
        if self.new_token_ids and self.args.should_save:
            record = {
                "new_special_tokens": list(self.args.new_special_tokens),
                "base_vocab_size": self._base_vocab_size,
                "embedding_pad_multiple": self.args.embedding_pad_multiple,
                "new_token_training": self.args.new_token_training,
            }
            Path(output_dir, DSFT_FILE).write_text(json.dumps(record, indent=2))

    # ----------------------------------------------------------------------------------------------- data
    def _prepare_dataset(self, dataset, processing_class, args, packing, formatting_func, dataset_name):
        if isinstance(dataset, Dataset) and "input_ids" not in dataset.column_names and formatting_func is None:
            task = self._tokenize(dataset, processing_class, args, f"{dataset_name} task rows")
            task = task.add_column("source", [0] * len(task))
            if dataset_name == "train" and self.diverse_dataset is not None and args.diverse_ratio > 0:
                dataset = self._mix(task, processing_class, args)
            else:
                dataset = task
        return super()._prepare_dataset(dataset, processing_class, args, packing, formatting_func, dataset_name)

    def _mix(self, task: Dataset, processing_class: Any, args: DELIAConfig) -> Dataset:
        # The ratio as written (Fraction("0.29")): int(100 * 0.29) would give 28.
        wanted = math.floor(len(task) * Fraction(str(args.diverse_ratio)))
        available = len(self.diverse_dataset)
        if available < wanted:
            logger.warning(
                "DELIA: the diverse data has %d rows, fewer than the %d asked for (%d task rows x ratio %g); using all"
                " "
                "%d, without upsampling.",
                available,
                wanted,
                len(task),
                args.diverse_ratio,
                available,
            )
        chosen = self.diverse_dataset.shuffle(seed=args.seed).select(range(min(available, wanted)))
        diverse = self._tokenize(chosen, processing_class, args, "diverse rows")
        diverse = diverse.add_column("source", [1] * len(diverse))
        self.mix_counts = {"task": len(task), "diverse": len(diverse)}
        logger.info("DELIA: %d task rows + %d diverse rows.", len(task), len(diverse))
        return concatenate_datasets([task, diverse]).shuffle(seed=args.seed)

    # ----------------------------------------------------------------------------------------------- loss
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        _, extras = self._split_extras(inputs)
        with captured_outputs(self.accelerator.unwrap_model(model)) as captured:
            result = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        source = extras.get("source")
        fused = fused_output(captured)
        if source is None or fused is None:
            return result
        nll = -fused.log_probs.sum(-1)  # per row; log_probs are 0 on ignored positions
        tokens = fused.label_mask.sum(-1)
        source = source.to(nll.device)
        for code, name in enumerate(SOURCES):  # every process logs every source: the gather is a collective
            rows = source == code
            self._log_ratio(f"{name}_loss", nll[rows].sum().detach(), tokens[rows].sum())
        weights = torch.where(source == 0, self.args.task_weight, self.args.diverse_weight).to(nll.dtype)
        if torch.all(weights == 1):
            return result
        # The loss TRL computed weights every token 1; add (w - 1) x each row's token sum, normalised the same way.
        extra = self.normalise_token_sum(((weights - 1) * nll).sum(), num_items_in_batch, tokens.sum())
        if return_outputs:
            return result[0] + extra, result[1]
        return result + extra
