"""DELIA: diversity-enhanced instruction adaptation (arXiv 2408.10841).

A handful of task examples gives a biased gradient: the model learns the instruction's surface form. DELIA mixes the
task rows with many *diverse* rows, the model's own answers to a broad set of queries (self-sampled with
[`build_cache`]), so that the summed gradient approximates the task's ideal feature while the model stays close to
itself. [`DSFTTrainer`] mixes `len(task) + min(len(cache), int(len(task) * diverse_ratio))` rows, logs the task and
the diverse losses separately, and adds new special tokens (e.g. `<sep>`) with trainable, correctly initialised
embeddings.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset, concatenate_datasets
from peft import PeftModel
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from .data import DataFormatError, detect_format, load_examples, to_example
from .eval import generate_batch
from .trainer import RobustSFTConfig, RobustSFTTrainer

logger = logging.getLogger(__name__)

SOURCES = ("task", "diverse")
DSFT_FILE = "dsft.json"  # the new tokens and the base vocabulary size, saved next to the adapter


# ------------------------------------------------------------------------------------------------ new tokens
def add_special_tokens(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, tokens: Sequence[str], pad_to_multiple_of: int = 64
) -> list[int]:
    """Add `tokens` to the tokenizer, resize the embeddings and initialise the new rows as the mean embedding.

    The embedding matrix is resized to a multiple of `pad_to_multiple_of`. Every row past the tokens the tokenizer had
    (the new tokens' rows and the padding rows; input embeddings, and output embeddings when they are not tied) is
    set to the mean of the known tokens' rows, including when the matrix already had spare rows (the reference
    re-initialised from the wrong index and left the new token's own row untouched). Returns the tokens' ids
    (tokens already in the vocabulary are not added again).
    """
    tokens = list(dict.fromkeys(tokens))
    known = len(tokenizer)
    added = [token for token in tokens if token not in tokenizer.get_vocab()]
    if added:
        tokenizer.add_special_tokens({"extra_special_tokens": added}, replace_extra_special_tokens=False)
        model.resize_token_embeddings(len(tokenizer), pad_to_multiple_of=pad_to_multiple_of, mean_resizing=False)
        initialise_new_rows(model, known)
        logger.info(
            "Added special tokens %s (ids %s); embeddings resized to %d rows.",
            added,
            tokenizer.convert_tokens_to_ids(added),
            model.get_input_embeddings().weight.shape[0],
        )
    return tokenizer.convert_tokens_to_ids(tokens)


def _embedding_matrices(model: PreTrainedModel) -> list[torch.Tensor]:
    matrices = [model.get_input_embeddings().weight]
    output = model.get_output_embeddings()
    if output is not None and output.weight is not matrices[0]:
        matrices.append(output.weight)
    return matrices


def initialise_new_rows(model: PreTrainedModel, known: int) -> None:
    """Set every embedding row from index `known` on (input, and untied output) to the mean of the rows before it."""
    with torch.no_grad():
        for weight in _embedding_matrices(model):
            weight[known:] = weight[:known].float().mean(0).to(weight.dtype)


def with_embedding_target(peft_config: Any, model: PreTrainedModel) -> Any:
    """Add the input embeddings to a LoRA config's targets, so the new tokens' rows can train.

    LoRA on the embedding gives every token, the new ones included, its own trainable coordinates. (PEFT's
    `trainable_token_indices` would train just the new rows, but it wraps the LM head, as PEFT does itself for tied
    embeddings, and TRL 1.16's fused LM head reads `lm_head.bias` around the wrapper: training fails.)
    `target_modules` given as `"all-linear"` or left unset (PEFT's default for the architecture) is resolved first.
    """
    from peft.tuners.tuners_utils import _maybe_include_all_linear_layers
    from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING

    embedding = model.get_input_embeddings()
    name = next(name for name, module in model.named_modules() if module is embedding)
    if peft_config.target_modules is None:
        defaults = TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING.get(model.config.model_type)
        if defaults is None:
            raise ValueError(
                f"PEFT has no default LoRA targets for model type {model.config.model_type!r}: set target_modules."
            )
        peft_config.target_modules = set(defaults)
    _maybe_include_all_linear_layers(peft_config, model)
    if isinstance(peft_config.target_modules, str):
        raise ValueError(
            f"target_modules is the pattern {peft_config.target_modules!r}; new tokens need the embedding "
            f"`{name}` trained: give target_modules as a list, or include the embedding in your pattern and set "
            "new_special_tokens=[] after adding the tokens yourself with robust_sft.delia.add_special_tokens."
        )
    peft_config.target_modules = set(peft_config.target_modules) | {name}
    return peft_config


# ------------------------------------------------------------------------------------------------ diverse data
def load_diverse_dataset(source: Dataset | str | os.PathLike | Sequence[str | os.PathLike]) -> Dataset:
    """The diverse rows: a Dataset, a cache file written by [`build_cache`], or a list of such files."""
    if isinstance(source, Dataset):
        return source
    paths = [source] if isinstance(source, (str, os.PathLike)) else list(source)
    if not paths:
        raise ValueError("diverse_dataset is an empty list of files.")
    missing = [str(path) for path in paths if not Path(path).is_file()]
    if missing:
        raise FileNotFoundError(
            f"Diverse data file(s) {missing} do not exist. Build a cache with `robust_sft.delia.build_cache(...)` "
            "or `robust-sft build-cache --queries QUERIES --output CACHE.jsonl`, or pass a Dataset."
        )
    parts = [load_examples(path) for path in paths]
    parts = [part.select_columns(["messages"]) if "messages" in part.column_names else part for part in parts]
    return concatenate_datasets(parts) if len(parts) > 1 else parts[0]


@dataclass
class DSFTConfig(RobustSFTConfig):
    r"""
    Configuration for [`DSFTTrainer`]: DELIA ([arXiv 2408.10841](https://arxiv.org/abs/2408.10841)).

    Parameters:
        diverse_ratio (`float`, *optional*, defaults to `1.0`):
            Diverse rows per task row: `min(len(diverse), int(len(task) * diverse_ratio))` diverse rows are mixed in
            (the paper: 100 task rows x 260). A smaller cache is used whole, never upsampled.
        task_weight (`float`, *optional*, defaults to `1.0`):
            Loss weight of task tokens (beyond the paper, which weights both sources equally).
        diverse_weight (`float`, *optional*, defaults to `1.0`):
            Loss weight of diverse tokens.
        new_special_tokens (`list[str]`, *optional*, defaults to `[]`):
            Tokens to add to the tokenizer (e.g. `["<sep>"]`). Their embedding rows start as the mean embedding and
            train: with LoRA, the input embedding is added to the LoRA targets (saved with the adapter); with full
            fine-tuning, as part of the embedding matrix.
        embedding_pad_multiple (`int`, *optional*, defaults to `64`):
            The resized embedding matrix has a multiple of this many rows.
    """

    diverse_ratio: float = field(default=1.0, metadata={"help": "Diverse rows per task row (no upsampling)."})
    task_weight: float = field(default=1.0, metadata={"help": "Loss weight of task tokens."})
    diverse_weight: float = field(default=1.0, metadata={"help": "Loss weight of diverse tokens."})
    new_special_tokens: list[str] = field(
        default_factory=list, metadata={"help": "Special tokens to add, e.g. <sep>; their embeddings train."}
    )
    embedding_pad_multiple: int = field(default=64, metadata={"help": "Resize the embeddings to a multiple of this."})

    def __post_init__(self):
        super().__post_init__()
        if self.diverse_ratio < 0:
            raise ValueError(f"diverse_ratio must be >= 0, got {self.diverse_ratio}.")
        if self.task_weight < 0 or self.diverse_weight < 0:
            raise ValueError("task_weight and diverse_weight must be >= 0.")


class DSFTTrainer(RobustSFTTrainer):
    """[`~trl.SFTTrainer`] on task rows mixed with self-sampled diverse rows (DELIA, diverse-gradient buffering).

    Args:
        train_dataset: The task rows (any data-layer format; a Dataset or a file path).
        diverse_dataset: The diverse rows: a Dataset, a cache file written by [`build_cache`], or a list of files.
        eval_dataset: Task rows only; diverse rows are never evaluated.

    Every other argument is that of [`~trl.SFTTrainer`]. After construction `mix_counts` holds the number of task and
    diverse rows in the training set. Logged metrics: `task_loss`, `diverse_loss` (per-token means of the batch).
    """

    _tag_names = ["trl", "sft", "robust_sft", "delia"]
    _name = "DELIA"
    _paper = {
        "title": "DELIA: Diversity-Enhanced Learning for Instruction Adaptation in Large Language Models",
        "id": "2408.10841",
    }
    _example_fields = ("source",)

    def __init__(
        self,
        model: str | os.PathLike | PreTrainedModel | None = None,
        args: DSFTConfig | None = None,
        data_collator: Any | None = None,
        train_dataset: Dataset | str | os.PathLike | None = None,
        eval_dataset: Dataset | dict[str, Dataset] | str | os.PathLike | None = None,
        processing_class: Any | None = None,
        diverse_dataset: Dataset | str | os.PathLike | Sequence[str | os.PathLike] | None = None,
        **kwargs: Any,
    ):
        args = args if args is not None else DSFTConfig(output_dir="dsft-output")
        if not isinstance(args, DSFTConfig):
            raise TypeError(f"DSFTTrainer needs a DSFTConfig, got {type(args).__name__}.")
        if diverse_dataset is None and args.diverse_ratio > 0:
            raise ValueError(
                "DSFTTrainer needs `diverse_dataset` (a Dataset, a cache file from build_cache, or a list of files); "
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

    def _prepare_model(self, model: PreTrainedModel, processing_class: Any, args: DSFTConfig, kwargs: dict[str, Any]):
        """Add the new special tokens (before PEFT wraps the model) and make their embedding rows trainable."""
        if not args.new_special_tokens:
            return model
        if processing_class is None:
            raise ValueError("new_special_tokens needs the tokenizer: pass processing_class.")
        tokenizer = getattr(processing_class, "tokenizer", processing_class)
        before = len(tokenizer)
        self.new_token_ids = add_special_tokens(model, tokenizer, args.new_special_tokens, args.embedding_pad_multiple)
        # The rows from here on were initialised by add_special_tokens (tokens added by an earlier run come last).
        self._base_vocab_size = before if len(tokenizer) > before else min(self.new_token_ids)
        if kwargs.get("peft_config") is not None:
            kwargs["peft_config"] = with_embedding_target(kwargs["peft_config"], model)
            logger.warning(
                "DSFT with LoRA: the input rows of %s train (LoRA on the embedding), their output rows stay at the"
                " mean initialisation, so the model reads the new tokens but does not learn to write them. Train"
                " without peft_config (full fine-tuning) when the answers must contain them.",
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

    def _mix(self, task: Dataset, processing_class: Any, args: DSFTConfig) -> Dataset:
        wanted = int(len(task) * args.diverse_ratio)
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
        captured: list[Any] = []
        handle = self.accelerator.unwrap_model(model).register_forward_hook(
            lambda module, args, output: captured.append(output)
        )
        try:
            result = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        finally:
            handle.remove()
        source = extras.get("source")
        fused = next((output for output in captured if getattr(output, "log_probs", None) is not None), None)
        if source is None or fused is None:
            return result
        nll = -fused.log_probs.sum(-1)  # per row; log_probs are 0 on ignored positions
        tokens = fused.label_mask.sum(-1)
        source = source.to(nll.device)
        for code, name in enumerate(SOURCES):
            rows = source == code
            if rows.any():
                self._log_metric(f"{name}_loss", nll[rows].sum().detach() / tokens[rows].sum().clamp(min=1))
        weights = torch.where(source == 0, self.args.task_weight, self.args.diverse_weight).to(nll.dtype)
        if torch.all(weights == 1):
            return result
        # The loss TRL computed weights every token 1; add (w - 1) x each row's token sum, normalised the same way.
        normaliser = tokens.sum() if num_items_in_batch is None else num_items_in_batch
        extra = ((weights - 1) * nll).sum() / torch.as_tensor(normaliser).clamp(min=1)
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            extra = extra * (self.accelerator.num_processes // self.get_tp_size())
        if return_outputs:
            return result[0] + extra, result[1]
        return result + extra


# ------------------------------------------------------------------------------------------------ build_cache
@dataclass
class Query:
    """A query of the self-sampling cache and its reference answer (the one-shot demonstration), if any."""

    text: str
    reference: str | None = None

    @property
    def key(self) -> str:
        """Identifies the query in the cache (a re-run skips the keys already there)."""
        return hashlib.sha256(json.dumps([self.text, self.reference]).encode()).hexdigest()[:24]


def read_queries(
    source: Dataset | str | os.PathLike | Sequence[str] | Sequence[dict[str, Any]],
    query_field: str | None = None,
    answer_field: str | None = None,
) -> list[Query]:
    """Queries from plain strings, rows of any data-layer format, self-instruct seed tasks (`instruction` +
    `instances`), or any rows with `query_field` / `answer_field`.

    Malformed rows raise `DataFormatError` naming the row.
    """
    if isinstance(source, (list, tuple)) and all(isinstance(item, str) for item in source):
        queries = []
        for index, text in enumerate(source):
            if not text.strip():
                raise DataFormatError(f"Query {index} is empty. Drop it or give it a text.")
            queries.append(Query(text))
        return queries
    rows = load_examples(source)
    if query_field is not None:
        queries = []
        for index, row in enumerate(rows):
            text = row.get(query_field)
            if not isinstance(text, str) or not text.strip():
                raise DataFormatError(f"Row {index}: field `{query_field}` is missing or empty (got {text!r}).")
            reference = row.get(answer_field) if answer_field else None
            if answer_field and (not isinstance(reference, str) or not reference.strip()):
                raise DataFormatError(f"Row {index}: field `{answer_field}` is missing or empty (got {reference!r}).")
            queries.append(Query(text, reference))
        return queries
    if {"instruction", "instances"} <= set(rows.column_names):
        return [_self_instruct_query(row, index) for index, row in enumerate(rows)]
    data_format = detect_format(rows.column_names)
    queries = []
    for index, row in enumerate(rows):
        example = to_example(row, data_format, index)
        if example.messages is None:
            queries.append(Query(example.prompt, example.completion or None))
            continue
        if example.instruction_turn is None:
            raise DataFormatError(f"Row {index}: the conversation has no user turn to use as a query.")
        queries.append(Query(example.messages[example.instruction_turn]["content"], example.messages[-1]["content"]))
    return queries


def _self_instruct_query(row: dict[str, Any], index: int) -> Query:
    """A self-instruct seed task: the instruction (+ its first instance's input) and that instance's output."""
    instruction, instances = row.get("instruction"), row.get("instances") or []
    if not isinstance(instruction, str) or not instruction.strip():
        raise DataFormatError(f"Row {index}: field `instruction` is missing or empty (got {instruction!r}).")
    first = instances[0] if instances and isinstance(instances[0], dict) else {}
    extra = first.get("input") or ""
    return Query(instruction + (f"\n\n{extra}" if extra.strip() else ""), first.get("output") or None)


def one_shot_messages(query: Query, system_prompt: str | None = None) -> list[dict[str, str]]:
    """The paper's prompt: [system], user = query, assistant = reference, user = query (zero-shot without one)."""
    messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
    if query.reference:
        messages += [{"role": "user", "content": query.text}, {"role": "assistant", "content": query.reference}]
    return messages + [{"role": "user", "content": query.text}]


def render_prompt(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]]) -> str:
    """Render with the generation prompt; a template that rejects the system role gets it folded into the user turn."""
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    except Exception as error:  # jinja2's TemplateError: "System role not supported" (Gemma and others)
        if messages[0]["role"] != "system":
            raise
        folded = [dict(turn) for turn in messages[1:]]
        folded[0]["content"] = f"{messages[0]['content']}\n\n{folded[0]['content']}"
        logger.info("The chat template rejects the system role (%s); it is folded into the first user turn.", error)
        return tokenizer.apply_chat_template(folded, tokenize=False, add_generation_prompt=True)


def _read_cache(path: Path) -> set[str]:
    """Keys already cached. A last line cut off by an interruption is dropped (the file is rewritten atomically)."""
    if not path.is_file():
        return set()
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    keys, good = set(), []
    for number, line in enumerate(lines):
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            if number == len(lines) - 1:  # the interrupted write
                break
            raise ValueError(f"{path}: line {number + 1} is not JSON; the cache is damaged.") from None
        if not line.endswith("\n"):
            break
        keys.add(row["query_key"])
        good.append(line)
    if len(good) < len(lines):
        temporary = path.with_suffix(path.suffix + ".tmp")
        temporary.write_text("".join(good), encoding="utf-8")
        os.replace(temporary, path)
        logger.warning("%s: dropped an incomplete last row left by an interrupted run.", path)
    return keys


def _generate_vllm(model_path: str, prompts: list[str], generation: dict[str, Any], seed: int) -> list[str]:
    from vllm import LLM, SamplingParams  # optional dependency: `pip install robust_sft[vllm]`

    llm = LLM(model=model_path, seed=seed)
    params = SamplingParams(
        temperature=generation.get("temperature", 0.0) if generation.get("do_sample") else 0.0,
        top_p=generation.get("top_p", 1.0) if generation.get("do_sample") else 1.0,
        max_tokens=generation["max_new_tokens"],
        seed=seed,
    )
    return [result.outputs[0].text.strip() for result in llm.generate(prompts, params)]


def build_cache(
    model: PreTrainedModel | str | os.PathLike | None,
    tokenizer: PreTrainedTokenizerBase | None,
    queries: Dataset | str | os.PathLike | Sequence[str] | Sequence[dict[str, Any]] | Sequence[Query],
    output_path: str | os.PathLike,
    *,
    query_field: str | None = None,
    answer_field: str | None = None,
    system_prompt: str | None = None,
    batch_size: int = 16,
    temperature: float = 0.7,
    top_p: float = 0.95,
    max_new_tokens: int = 512,
    do_sample: bool = True,
    seed: int = 0,
    backend: str = "transformers",
) -> Path:
    """Self-sample the diverse data of DELIA: the model's own answers to `queries`, appended to a JSONL cache.

    Each query is asked with the paper's one-shot prompt (query, its reference answer as the demonstration, the query
    again; `add_generation_prompt` always) and one answer is sampled (temperature 0.7, top_p 0.95, up to 512 new
    tokens by default; `do_sample=False` for greedy). Rows are `{"messages": [user = query, assistant = answer],
    "query_key": ...}`, which [`DSFTTrainer`] reads back. Rows are appended batch by batch as they finish, so an
    interrupted run loses at most the batch in flight; a re-run skips the queries already in the cache.

    Args:
        model: A model, or a hub id / folder / `None` (embedded default) loaded with `load_model_and_tokenizer`.
        queries: Plain strings, `Query` objects, or rows in any data-layer format (a Dataset or a file), where the
            user turn is the query and the answer its reference; or name the fields with `query_field` /
            `answer_field` (e.g. GSM8K's `question` / `answer`).
        backend: `transformers` (batched, left-padded `generate`) or `vllm` (needs vllm installed and a model path).
    """
    if backend not in ("transformers", "vllm"):
        raise ValueError(f"backend must be 'transformers' or 'vllm', got {backend!r}.")
    output_path = Path(output_path)
    output_path.parent.mkdir(parents=True, exist_ok=True)
    model_path = None
    if model is None or isinstance(model, (str, os.PathLike)):
        from .modeling import ensure_embedded_model, load_model_and_tokenizer

        model_path = str(model) if model is not None else None
        if backend == "vllm":
            model_path = model_path or str(ensure_embedded_model())
            from .modeling import load_tokenizer

            tokenizer = tokenizer or load_tokenizer(model_path)
        else:
            model, loaded_tokenizer = load_model_and_tokenizer(model_path)
            tokenizer = tokenizer or loaded_tokenizer
    elif backend == "vllm":
        raise ValueError("The vllm backend loads the model itself: pass a hub id or a folder, not a model object.")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if queries and isinstance(queries, (list, tuple)) and isinstance(queries[0], Query):
        items = list(queries)
    else:
        items = read_queries(queries, query_field, answer_field)
    seen = _read_cache(output_path)
    pending = []
    for query in items:  # each query once, and none that is already cached
        if query.key not in seen:
            seen.add(query.key)
            pending.append(query)
    if not pending:
        logger.info("%s already holds all %d queries.", output_path, len(items))
        return output_path
    logger.info(
        "Sampling %d queries (%d already cached) into %s.", len(pending), len(items) - len(pending), output_path
    )
    generation = {"max_new_tokens": max_new_tokens, "do_sample": do_sample}
    if do_sample:
        generation.update(temperature=temperature, top_p=top_p)
    was_training = None if backend == "vllm" else model.training
    if was_training is not None:
        model.eval()
    try:
        with open(output_path, "a", encoding="utf-8") as cache:
            if backend == "vllm":
                prompts = [render_prompt(tokenizer, one_shot_messages(query, system_prompt)) for query in pending]
                answers = _generate_vllm(model_path, prompts, generation, seed)
                _append(cache, pending, answers)
            else:
                for start in tqdm(range(0, len(pending), batch_size), desc="build_cache", unit="batch"):
                    chunk = pending[start : start + batch_size]
                    torch.manual_seed(seed + start)  # a batch's samples do not depend on what ran before
                    prompts = [render_prompt(tokenizer, one_shot_messages(query, system_prompt)) for query in chunk]
                    _append(cache, chunk, generate_batch(model, tokenizer, prompts, **generation))
    finally:
        if was_training:
            model.train()
    return output_path


def _append(cache, queries: list[Query], answers: list[str]) -> None:
    lines = []
    for query, answer in zip(queries, answers, strict=True):
        row = {
            "messages": [{"role": "user", "content": query.text}, {"role": "assistant", "content": answer}],
            "query_key": query.key,
        }
        lines.append(json.dumps(row, ensure_ascii=False) + "\n")
    cache.write("".join(lines))  # whole rows at once, then on disk before the next batch starts
    cache.flush()
    os.fsync(cache.fileno())


def load_dsft_model(base: str | os.PathLike | None, adapter_dir: str | os.PathLike, **load_kwargs: Any):
    """Reload a DSFT LoRA run: the tokenizer saved with it (with the new tokens), the base model resized and
    initialised exactly as in training, and the adapter (its LoRA weights, the embedding's included).

    Returns (model, tokenizer).
    """
    from transformers import AutoTokenizer

    from .modeling import load_model_and_tokenizer

    tokenizer = AutoTokenizer.from_pretrained(adapter_dir)
    model, _ = load_model_and_tokenizer(base, **load_kwargs)
    record_path = Path(adapter_dir, DSFT_FILE)
    if record_path.is_file():
        record = json.loads(record_path.read_text())
        model.resize_token_embeddings(
            len(tokenizer), pad_to_multiple_of=record["embedding_pad_multiple"], mean_resizing=False
        )
        initialise_new_rows(model, record["base_vocab_size"])
    return PeftModel.from_pretrained(model, adapter_dir), tokenizer
