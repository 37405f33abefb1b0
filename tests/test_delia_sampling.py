"""The sampling engine behind build_cache (`robust_sft.generation.sample_continuations`): greedy rows equal
`model.generate` one prompt at a time, sampled rows equal `generate(do_sample=True)` under the row's seed, whatever the
batch, the top-p nucleus is `TopPLogitsWarper`'s, stop tokens end rows, and the global RNG is left alone."""

import random

import numpy
import pytest
import torch

from robust_sft.generation import end_of_turn_token_ids, nucleus, sample_continuations
from robust_sft.testing import make_tiny_model, make_tiny_tokenizer

TEXTS = [f"Name thing number {i}." for i in range(12)] + [
    "Tell me about colours and shapes " * (i % 3 + 1) for i in range(12)
]


def stopping_tiny_model(tokenizer):
    """The tiny model with sharp logits (no near-ties for padding noise to flip) whose end-of-turn token takes the
    place of a frequent token: its answers end after 2 to 15 tokens, or run to the limit."""
    model = make_tiny_model("llama", tokenizer)
    (stop,) = end_of_turn_token_ids(tokenizer, model)
    with torch.no_grad():
        model.lm_head.weight.mul_(50)
        model.lm_head.weight[stop] = model.lm_head.weight[33] * 1.01
    return model.eval()


@pytest.fixture(scope="module")
def setup():
    tokenizer = make_tiny_tokenizer()
    model = stopping_tiny_model(tokenizer)
    chats = [[{"role": "user", "content": text}] for text in TEXTS]
    prompts = [
        tokenizer.apply_chat_template(chat, add_generation_prompt=True, return_dict=True)["input_ids"]
        for chat in chats
    ]
    return model, tokenizer, prompts, end_of_turn_token_ids(tokenizer, model)


def reference(model, prompt, stops, max_new_tokens, **sampling):
    """`model.generate` on one prompt: (new tokens before the stop token, finish reason)."""
    options = dict(max_new_tokens=max_new_tokens, eos_token_id=stops, pad_token_id=0, top_k=None)
    output = model.generate(torch.tensor([prompt]), **options, **sampling)
    new = output[0, len(prompt) :].tolist()
    if new and new[-1] in stops:
        return new[:-1], "stop"
    return new, "length"


def run(model, prompts, **options):
    return {row.index: (row.token_ids, row.finish_reason) for row in sample_continuations(model, prompts, **options)}


@pytest.mark.parametrize("batch_size", [1, 3, 16])
def test_greedy_rows_equal_generate_one_prompt_at_a_time(setup, batch_size):
    model, _, prompts, stops = setup
    expected = [reference(model, prompt, stops, 16, do_sample=False) for prompt in prompts]
    reasons = [reason for _, reason in expected]
    assert 4 < reasons.count("stop") < len(prompts) - 4  # rows leave the batch at different steps
    assert run(model, prompts, max_new_tokens=16, batch_size=batch_size, stop_token_ids=stops) == dict(
        enumerate(expected)
    )


def test_sampled_rows_equal_generate_under_their_own_seed(setup):
    model, _, prompts, stops = setup
    seeds = [1000 + i for i in range(len(prompts))]
    expected = {}
    with torch.random.fork_rng():
        for i, prompt in enumerate(prompts):
            torch.manual_seed(seeds[i])
            expected[i] = reference(model, prompt, stops, 12, do_sample=True, temperature=1.3)
    options = dict(max_new_tokens=12, stop_token_ids=stops, temperature=1.3)
    assert run(model, prompts, batch_size=5, seeds=seeds, **options) == expected


def test_sampled_rows_depend_on_their_own_seed_only(setup):
    model, _, prompts, stops = setup
    seeds = [1000 + i for i in range(len(prompts))]
    options = dict(max_new_tokens=12, stop_token_ids=stops, temperature=1.3, top_p=0.9)
    batched = run(model, prompts, batch_size=5, seeds=seeds, **options)
    # Another batch size, other companions, another order: each row still depends on its own seed only.
    order = list(range(len(prompts)))[::-1][:9]
    subset = run(model, [prompts[i] for i in order], batch_size=2, seeds=[seeds[i] for i in order], **options)
    assert {order[j]: row for j, row in subset.items()} == {i: batched[i] for i in order}
    assert run(model, prompts, batch_size=5, seeds=seeds[::-1], **options) != batched


def test_the_nucleus_is_top_p_logits_warpers():
    from transformers.generation.logits_process import TopPLogitsWarper

    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(64, 3000, generator=generator) * torch.linspace(0.05, 8, 64)[:, None]  # flat to peaked
    probabilities = logits.softmax(-1)
    for top_p in (0.5, 0.9, 0.95):
        kept = TopPLogitsWarper(top_p)(None, logits.clone()) > -float("inf")
        ids, weights = nucleus(probabilities, top_p)
        for row in range(64):
            assert set(ids[row].tolist()) == set(kept[row].nonzero().flatten().tolist())
            assert torch.equal(weights[row], probabilities[row, ids[row]])
    sizes = [len(row) for row in nucleus(probabilities, 0.95)[0]]
    assert max(sizes) > 256 > min(sizes)  # flat rows take the full sort, peaked ones the top candidates only


def test_finish_reasons_and_stop_tokens(setup):
    model, _, prompts, stops = setup
    rows = list(sample_continuations(model, prompts, max_new_tokens=9, batch_size=4, stop_token_ids=stops))
    assert sorted(row.index for row in rows) == list(range(len(prompts)))
    for row in rows:
        assert not set(row.token_ids) & set(stops)
        assert (len(row.token_ids) == 9) == (row.finish_reason == "length")
    unstopped = run(model, prompts, max_new_tokens=9, batch_size=4)
    assert all(reason == "length" for _, reason in unstopped.values())


def test_global_random_state_is_left_alone(setup):
    model, _, prompts, stops = setup
    random.seed(3)
    numpy.random.seed(3)
    torch.manual_seed(3)
    states = (random.getstate(), numpy.random.get_state()[1].copy(), torch.get_rng_state())
    run(model, prompts, max_new_tokens=6, batch_size=4, stop_token_ids=stops, temperature=0.7, seeds=range(24))
    assert random.getstate() == states[0]
    assert (numpy.random.get_state()[1] == states[1]).all()
    assert torch.equal(torch.get_rng_state(), states[2])


def test_bad_arguments_are_refused(setup):
    model, _, prompts, _ = setup
    with pytest.raises(ValueError, match="one seed per prompt"):
        run(model, prompts, max_new_tokens=4, temperature=0.7)
    with pytest.raises(ValueError, match="Prompt 1 is empty"):
        run(model, [prompts[0], []], max_new_tokens=4)
    with pytest.raises(ValueError, match="max_new_tokens must be >= 1"):
        run(model, prompts, max_new_tokens=0)


def test_end_of_turn_tokens_come_from_the_template():
    tokenizer = make_tiny_tokenizer()
    assert tokenizer.convert_ids_to_tokens(end_of_turn_token_ids(tokenizer)) == ["<|im_end|>"]  # ChatML, also EOS
    # A Gemma-style template: the turn ends with <end_of_turn>, which is not the tokenizer's EOS.
    tokenizer.add_special_tokens({"additional_special_tokens": ["<start_of_turn>", "<end_of_turn>"]})
    tokenizer.chat_template = (
        "{% for m in messages %}<start_of_turn>{{ m['role'] }}\n{{ m['content'] }}<end_of_turn>\n{% endfor %}"
        "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
    )
    ids = end_of_turn_token_ids(tokenizer)
    assert ids[0] == tokenizer.convert_tokens_to_ids("<end_of_turn>")
    assert tokenizer.eos_token_id in ids
