"""Batched greedy (or sampled) generation from chat prompts, shared by the trainers and the evaluation."""

from __future__ import annotations

import inspect
from collections import deque
from collections.abc import Collection, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from tqdm.auto import tqdm
from transformers import DynamicCache, PreTrainedModel, PreTrainedTokenizerBase
from transformers.cache_utils import DynamicLayer


def _model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def generate_batch(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    texts: Sequence[str],
    keep_special_tokens: Sequence[str] = (),
    **generation: Any,
) -> list[str]:
    """Continue already-rendered prompts in one left-padded batch; return only the new text of each row.

    Special tokens are dropped from the answers except `keep_special_tokens` (e.g. a new `<sep>` the answers use).
    `generation` goes to `model.generate` (e.g. `max_new_tokens`, `do_sample`, `temperature`).
    """
    padding_side, tokenizer.padding_side = tokenizer.padding_side, "left"  # every row continues from its last token
    try:
        batch = tokenizer(list(texts), return_tensors="pt", padding=True, add_special_tokens=False)
    finally:
        tokenizer.padding_side = padding_side
    batch = batch.to(_model_device(model))
    output = model.generate(**batch, pad_token_id=tokenizer.pad_token_id, **generation)
    new_tokens = output[:, batch["input_ids"].shape[1] :].tolist()  # after the prompt, whatever the template
    dropped = set(tokenizer.all_special_ids) - set(tokenizer.convert_tokens_to_ids(list(keep_special_tokens)))
    rows = [[token for token in row if token not in dropped] for row in new_tokens]
    return [text.strip() for text in tokenizer.batch_decode(rows, skip_special_tokens=False)]


def generate_answers(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    max_new_tokens: int = 64,
    batch_size: int = 16,
    desc: str = "generating",
    keep_special_tokens: Sequence[str] = (),
) -> list[str]:
    """Greedy answers to user prompts (each rendered as one user turn with the chat template), batched."""
    was_training = model.training
    model.eval()
    answers = []
    try:
        for start in tqdm(range(0, len(prompts), batch_size), desc=desc, leave=False):
            chats = [[{"role": "user", "content": prompt}] for prompt in prompts[start : start + batch_size]]
            texts = [tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True) for chat in chats]
            answers += generate_batch(
                model, tokenizer, texts, keep_special_tokens, max_new_tokens=max_new_tokens, do_sample=False
            )
    finally:
        model.train(was_training)
    return answers


# ------------------------------------------------------------------------------------------------ sampling engine
@dataclass(frozen=True)
class Continuation:
    """One finished row of [`sample_continuations`]: its index in the prompts, its new tokens (without the stop
    token) and why it ended: `"stop"` (a stop token) or `"length"` (cut off by `max_new_tokens`)."""

    index: int
    token_ids: list[int]
    finish_reason: str


def end_of_turn_token_ids(tokenizer: PreTrainedTokenizerBase, model: PreTrainedModel | None = None) -> list[int]:
    """The tokens that end an assistant turn: the one the chat template writes after an answer (`<|im_end|>`,
    `<|eot_id|>`, `<end_of_turn>`, ...), the tokenizer's EOS and the model's generation-config EOS ids.

    The template's token is read off a rendered conversation, so it is right for any template; generation that stops
    only on the generation config's EOS would run past the end of the turn when the config does not list it.
    """
    ids: list[int] = []
    if getattr(tokenizer, "chat_template", None):
        marker = "\u2063ANSWER\u2063"  # an invisible separator: never merged with the template's own text
        chat = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": marker}]
        try:
            rendered = tokenizer.apply_chat_template(chat, tokenize=False)
        except Exception:  # a template that cannot render this chat: fall back on the EOS ids
            rendered = ""
        if marker in rendered:
            after = rendered.split(marker, 1)[1]
            special = set(tokenizer.all_special_ids) | set(getattr(tokenizer, "added_tokens_decoder", {}))
            following = tokenizer(after, add_special_tokens=False)["input_ids"][:1]
            ids += [token for token in following if token in special]
    eos_ids: list[Any] = [tokenizer.eos_token_id]
    if model is not None and getattr(model, "generation_config", None) is not None:
        eos_ids.append(model.generation_config.eos_token_id)
    for value in eos_ids:
        ids += [value] if isinstance(value, int) else list(value or [])
    return list(dict.fromkeys(token for token in ids if token is not None))


def _accepts(model: torch.nn.Module, argument: str) -> bool:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    try:
        return argument in inspect.signature(base.forward).parameters
    except (TypeError, ValueError):
        return False


class _Rows:
    """The rows in flight: their KV cache (left-padded to a common length), its attention mask (one column per cached
    token), each row's next position and next input token (chosen, not yet in the cache), tokens so far and
    sampling generator."""

    def __init__(self, cache: Any, mask: torch.Tensor, position: torch.Tensor, rows: list[int], generators: list):
        self.cache, self.mask, self.position, self.rows, self.generators = cache, mask, position, rows, generators
        self.next_token = torch.empty(0, dtype=torch.long, device=mask.device)
        self.tokens: list[list[int]] = [[] for _ in rows]

    def __len__(self) -> int:
        return len(self.rows)

    def keep(self, keep: list[int]) -> None:
        """Only the rows at `keep` stay; KV columns that are padding for every remaining row are dropped."""
        if not keep:  # the batch is done: nothing left to select
            self.rows, self.tokens, self.generators = [], [], []
            return
        index = torch.tensor(keep, dtype=torch.long, device=self.mask.device)
        self.mask, self.position, self.next_token = self.mask[index], self.position[index], self.next_token[index]
        self.rows = [self.rows[i] for i in keep]
        self.tokens = [self.tokens[i] for i in keep]
        self.generators = [self.generators[i] for i in keep] if self.generators else []
        if not _croppable(self.cache):
            for layer in self.cache.layers:
                layer.batch_select_indices(index)
            return
        start = int(self.mask.any(0).long().argmax())  # the first column some remaining row attends to
        self.mask = self.mask[:, start:]
        for layer in self.cache.layers:
            layer.set_states(layer.keys[index, :, start:], layer.values[index, :, start:])


class GrowingLayer(DynamicLayer):
    """A `DynamicLayer` that appends in place. `DynamicLayer.update` concatenates, copying the whole cache for every
    new token: at batch 16 and 700 cached tokens that is about half of a CPU decode step (measured). This layer keeps
    room for `GROWTH` more tokens and exposes `keys` / `values` as views of the filled part."""

    GROWTH = 256

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        length = self.keys.shape[-2] if self.keys.dim() == 4 else 0
        needed = length + key_states.shape[-2]
        buffer = getattr(self, "key_buffer", None)
        if buffer is None or buffer.shape[-2] < needed or buffer.shape[0] != key_states.shape[0]:
            shape = (*key_states.shape[:2], needed + self.GROWTH, key_states.shape[-1])
            self.key_buffer, self.value_buffer = key_states.new_empty(shape), value_states.new_empty(shape)
            if length:
                self.key_buffer[:, :, :length] = self.keys
                self.value_buffer[:, :, :length] = self.values
        self.key_buffer[:, :, length:needed] = key_states
        self.value_buffer[:, :, length:needed] = value_states
        self.keys, self.values = self.key_buffer[:, :, :needed], self.value_buffer[:, :, :needed]
        return self.keys, self.values

    def set_states(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Replace the cached states (rows selected, or re-padded for a merge); the next update reserves room."""
        self.key_buffer = self.value_buffer = None
        self.keys, self.values = keys, values


def _new_cache(model: torch.nn.Module) -> DynamicCache:
    """The model's `DynamicCache`; when every layer is a plain growing one, with in-place appends (`GrowingLayer`)."""
    cache = DynamicCache(config=model.config)
    if cache.layers and all(type(layer) is DynamicLayer for layer in cache.layers):
        cache.layers = [GrowingLayer() for _ in cache.layers]
    return cache


def _croppable(cache: Any) -> bool:
    """Whether every layer is a plain growing KV cache (no sliding window, no recurrent state): rows of such caches
    can be selected, re-padded and merged."""
    return all(type(layer) is GrowingLayer for layer in cache.layers)


def _merge(old: _Rows, new: _Rows) -> _Rows:
    """Rows in flight and freshly prefilled rows in one batch: both KV caches left-padded to the longer length."""
    length = max(old.mask.shape[1], new.mask.shape[1])

    def pad(tensor: torch.Tensor, dim: int) -> torch.Tensor:
        missing = length - tensor.shape[dim]
        if missing == 0:
            return tensor
        shape = list(tensor.shape)
        shape[dim] = missing
        return torch.cat([tensor.new_zeros(shape), tensor], dim=dim)

    for layer, extra in zip(old.cache.layers, new.cache.layers, strict=True):
        keys = torch.cat([pad(layer.keys, 2), pad(extra.keys, 2)])
        layer.set_states(keys, torch.cat([pad(layer.values, 2), pad(extra.values, 2)]))
    merged = _Rows(
        old.cache,
        torch.cat([pad(old.mask, 1), pad(new.mask, 1)]),
        torch.cat([old.position, new.position]),
        old.rows + new.rows,
        old.generators + new.generators,
    )
    merged.next_token = torch.cat([old.next_token, new.next_token])
    merged.tokens = old.tokens + new.tokens
    return merged


def nucleus(probabilities: torch.Tensor, top_p: float, candidates: int = 256) -> tuple[list, list]:
    """Each row's top-p nucleus: (token ids, their probabilities), the most probable first.

    A token is kept when the probability of the tokens above it is below `top_p` (the most probable one always), the
    tokens `TopPLogitsWarper` keeps (up to float rounding at the boundary; tested). Only the `candidates` most
    probable tokens are sorted, all of them for a row whose nucleus is larger: a full sort of a 49k vocabulary for a
    batch of 16 costs more than half of a CPU decode step (60 ms of ~200 ms, measured), the top 256 ~4 ms.
    """
    count = min(candidates, probabilities.shape[-1])
    top, ids = probabilities.topk(count, dim=-1)
    kept_ids, kept_weights = [], []
    for row in range(probabilities.shape[0]):
        values, tokens = top[row], ids[row]
        keep = (values.cumsum(0) - values) < top_p
        if keep[-1] and count < probabilities.shape[-1]:  # the nucleus may go on past the candidates: sort it all
            values, tokens = probabilities[row].sort(descending=True)
            keep = (values.cumsum(0) - values) < top_p
        keep[0] = True
        kept_ids.append(tokens[keep])
        kept_weights.append(values[keep])
    return kept_ids, kept_weights


@torch.inference_mode()
def sample_continuations(
    model: PreTrainedModel,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    batch_size: int = 16,
    stop_token_ids: Collection[int] = (),
    temperature: float = 0.0,
    top_p: float = 1.0,
    seeds: Sequence[int] | None = None,
    pad_token_id: int = 0,
) -> Iterator[Continuation]:
    """Continue token-id prompts in batches and yield each row as soon as it finishes (in finishing order).

    Up to `batch_size` rows run together. A row leaves the batch as soon as it writes a stop token or reaches
    `max_new_tokens`, so a batch never waits for its longest row; when half the batch has left, the next prompts are
    prefilled, in groups of similar length (padding adds at most a tenth to a prefill), and join it (their KV caches
    left-padded to a common length). The KV cache appends in place (`GrowingLayer`) rather than copying itself for
    every token as `DynamicCache` does. Give the prompts sorted by length so that the batches stay even.

    `temperature=0` is greedy decoding. Otherwise each token is drawn after temperature (and top-p) from a generator
    of the row's own, seeded with `seeds[i]`: a row's answer depends on its prompt and seed only, not on the rows it
    shares a batch with (up to float rounding) nor on the global RNG, which is left untouched. With `top_p=1` the
    draw is exactly `model.generate(do_sample=True)`'s under that seed (tested); with `top_p < 1` the token is drawn
    from the same nucleus as `generate`'s (see [`nucleus`]), among its tokens only.

    Needs a decoder-only model whose forward takes `attention_mask`, `position_ids` and `past_key_values`, as
    `generate` does. Rows join a running batch only when every cache layer is a plain growing one (no sliding
    window, no recurrent state); otherwise the next prompts wait for the batch to empty.
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}.")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
    if temperature < 0 or not 0 < top_p <= 1:
        raise ValueError(f"temperature must be >= 0 and top_p in (0, 1], got {temperature} and {top_p}.")
    sampling = temperature > 0
    if sampling and (seeds is None or len(seeds) != len(prompts)):
        raise ValueError("Sampling (temperature > 0) needs one seed per prompt.")
    for index, prompt in enumerate(prompts):
        if not len(prompt):
            raise ValueError(f"Prompt {index} is empty.")
    device = _model_device(model)
    stops = set(stop_token_ids)
    extra = {"logits_to_keep": 1} if _accepts(model, "logits_to_keep") else {}

    def choose(logits: torch.Tensor, generators: list) -> torch.Tensor:
        logits = logits.float()
        if not sampling:
            return logits.argmax(-1)
        probabilities = (logits / temperature).softmax(-1)
        if top_p == 1:  # generate's draw: the same probabilities, the same multinomial, the row's own generator
            return torch.cat([torch.multinomial(row, 1, generator=g) for row, g in zip(probabilities, generators)])
        candidates, weights = nucleus(probabilities, top_p)
        return torch.stack(
            [ids[torch.multinomial(w, 1, generator=g)][0] for ids, w, g in zip(candidates, weights, generators)]
        )

    def prefill(rows: list[int]) -> _Rows:
        longest = max(len(prompts[row]) for row in rows)
        ids = torch.full((len(rows), longest), pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(rows), longest), dtype=torch.long)
        for i, row in enumerate(rows):  # left padding: every row continues from its last column
            ids[i, longest - len(prompts[row]) :] = torch.tensor(list(prompts[row]))
            mask[i, longest - len(prompts[row]) :] = 1
        ids, mask = ids.to(device), mask.to(device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = _new_cache(model)
        output = model(
            input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=cache, use_cache=True, **extra
        )
        generators = []
        if sampling:
            for row in rows:
                generators.append(torch.Generator(device=device).manual_seed(int(seeds[row])))
        state = _Rows(output.past_key_values, mask, positions[:, -1] + 1, rows, generators)
        state.next_token = choose(output.logits[:, -1], generators)
        return state

    def advance(rows: _Rows) -> Iterator[Continuation]:
        """Take each row's newly chosen token: a stop token or the length limit ends the row (it leaves the batch),
        any other token is kept and fed back at the next step."""
        keep = []
        for i, token in enumerate(rows.next_token.tolist()):
            if token in stops:
                yield Continuation(rows.rows[i], rows.tokens[i], "stop")
                continue
            rows.tokens[i].append(token)
            if len(rows.tokens[i]) >= max_new_tokens:
                yield Continuation(rows.rows[i], rows.tokens[i], "length")
                continue
            keep.append(i)
        if len(keep) < len(rows):
            rows.keep(keep)

    def groups(rows: list[int]) -> list[list[int]]:
        """Rows grouped by prompt length so that padding adds at most a tenth to each prefill (one group when the
        caches cannot be merged)."""
        if not mergeable:
            return [rows]
        found: list[list[int]] = []
        tokens = 0
        for row in sorted(rows, key=lambda row: len(prompts[row])):
            length = len(prompts[row])  # the longest of its group so far: the rows come shortest first
            if found and tokens and length * (len(found[-1]) + 1) <= 1.1 * (tokens + length):
                found[-1].append(row)
                tokens += length
            else:
                found.append([row])
                tokens = length
        return found

    mergeable = _croppable(_new_cache(model))
    queue = deque(range(len(prompts)))
    state: _Rows | None = None
    while queue or state is not None:
        if queue and (state is None or (len(state) <= batch_size // 2 and mergeable)):
            count = batch_size - (len(state) if state is not None else 0)
            for group in groups([queue.popleft() for _ in range(min(count, len(queue)))]):
                fresh = prefill(group)
                yield from advance(fresh)
                if len(fresh):
                    state = fresh if state is None else _merge(state, fresh)
            continue
        state.mask = torch.cat([state.mask, state.mask.new_ones((len(state), 1))], dim=1)
        output = model(
            input_ids=state.next_token[:, None],
            attention_mask=state.mask,
            position_ids=state.position[:, None],
            past_key_values=state.cache,
            use_cache=True,
            **extra,
        )
        state.position = state.position + 1
        state.next_token = choose(output.logits[:, -1], state.generators)
        yield from advance(state)
        if not len(state):
            state = None
