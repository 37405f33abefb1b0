"""The 17 perturbation operators, registered in [`robust_sft.anit.noise`] by level (see its docstring for units)."""

from __future__ import annotations

import random
import string
from collections.abc import Iterable, Sequence

from .noise import (
    _CHAR_UNIT,
    _NO_SPACE_CHAR,
    _WORD_UNIT,
    ANTONYMS,
    DEFAULT_INSTRUCTIONS,
    DISTRACTING_CONTEXTS,
    IRRELEVANT_SENTENCE,
    KEYBOARD_NEIGHBOURS,
    NEGATION_PREFIX,
    STOP_WORDS,
    NoiseContext,
    _count_keeping_one,
    count_for,
    register_operator,
    word_units,
)


# ------------------------------------------------------------------------------------------------------ characters
def _random_letter(rng: random.Random) -> str:
    return rng.choice(string.ascii_lowercase)


def _non_space(text: str) -> list[int]:
    return [position for position, char in enumerate(text) if not char.isspace()]


@register_operator("char_insert", "character", "Insert random letters at random positions.")
def char_insert(text: str, rate: float, rng: random.Random, context: NoiseContext) -> str:
    """Unit: a non-space character (the count); letters go anywhere, existing characters are kept."""
    chars = list(text)
    for _ in range(count_for(len(_non_space(text)), rate)):
        chars.insert(rng.randrange(len(chars) + 1), _random_letter(rng))
    return "".join(chars)


@register_operator("char_delete", "character", "Delete random characters.")
def char_delete(text: str, rate: float, rng: random.Random, context: NoiseContext) -> str:
    """Unit: a non-space character; whitespace stays, and one character always survives (never "")."""
    units = _non_space(text)
    drop = set(rng.sample(units, _count_keeping_one(len(units), rate)))
    return "".join(char for position, char in enumerate(text) if position not in drop)


@register_operator("char_swap", "character", "Swap random pairs of neighbouring characters.")
def char_swap(text: str, rate: float, rng: random.Random, context: NoiseContext) -> str:
    """Unit: a pair of neighbouring, different non-space characters (swapping "ll" or "a b" would change nothing)."""
    chars = list(text)
    pairs = [
        position
        for position in range(len(chars) - 1)
        if chars[position] != chars[position + 1] and not (chars[position].isspace() or chars[position + 1].isspace())
    ]
    # Chosen swaps at consecutive positions p..q compose to a cycle over p..q+1, which changes the text because the
    # characters at p and p+1 differ: overlapping swaps never undo each other.
    for position in rng.sample(pairs, count_for(len(pairs), rate)):
        chars[position], chars[position + 1] = chars[position + 1], chars[position]
    return "".join(chars)


@register_operator("char_substitute", "character", "Replace random characters by random letters.")
def char_substitute(text: str, rate: float, rng: random.Random, context: NoiseContext) -> str:
    """Unit: a non-space character, replaced by a different ASCII letter; whitespace stays."""
    chars = list(text)
    for position in rng.sample(_non_space(text), count_for(len(_non_space(text)), rate)):
        chars[position] = rng.choice([letter for letter in string.ascii_lowercase if letter != chars[position]])
    return "".join(chars)


@register_operator("keyboard_typo", "character", "Replace random letters by a neighbouring QWERTY key.")
def keyboard_typo(text: str, rate: float, rng: random.Random, context: NoiseContext) -> str:
    """Unit: an ASCII letter (a key of the QWERTY layout); other characters are kept."""
    chars = list(text)
    letters = [position for position, char in enumerate(chars) if char.lower() in KEYBOARD_NEIGHBOURS]
    for position in rng.sample(letters, count_for(len(letters), rate)):
        typo = rng.choice(KEYBOARD_NEIGHBOURS[chars[position].lower()])
        chars[position] = typo.upper() if chars[position].isupper() else typo
    return "".join(chars)


class _Words:
    """A text as units and the gaps around them, so edits keep the original spacing and newlines.

    Units are words (runs of non-space characters; each character of a script without spaces is a unit of its own),
    or with `chars=True` the non-space characters. `spaces[i]` precedes `words[i]`; `spaces[-1]` ends the text.
    """

    def __init__(self, text: str, chars: bool = False):
        self.chars = chars
        self.words: list[str] = []
        self.spaces: list[str] = []
        end = 0
        for match in (_CHAR_UNIT if chars else _WORD_UNIT).finditer(text):
            self.spaces.append(text[end : match.start()])
            self.words.append(match.group())
            end = match.end()
        self.spaces.append(text[end:])  # len(spaces) == len(words) + 1

    @classmethod
    def of(cls, text: str, distinct: bool = False) -> _Words:
        """The text's words, or its characters when it has fewer than two (distinct) words: a one-word text still
        has units to edit, and editing its only word would replace the whole text."""
        words = cls(text)
        count = len(set(words.words)) if distinct else len(words.words)
        return words if count >= 2 else cls(text, chars=True)

    def delete(self, positions: Iterable[int]) -> None:
        for position in sorted(set(positions), reverse=True):
            before, after = self.spaces[position], self.spaces[position + 1]
            del self.words[position]
            # One gap survives: the leading one for the first unit, the trailing one for the last (so the text's
            # leading and trailing whitespace survives), else the one before unless it is empty ("好a b" -> "好 b").
            if position == 0:
                keep = before
            elif position == len(self.words):
                keep = after
            else:
                keep = before or after
            self.spaces[position : position + 2] = [keep]

    def span(self, start: int, stop: int) -> str:
        """Units start..stop-1 with the gaps between them."""
        return "".join((self.spaces[i] if i > start else "") + self.words[i] for i in range(start, stop))

    def text(self) -> str:
        return "".join(space + word for space, word in zip(self.spaces, [*self.words, ""]))


@register_operator("word_delete", "word", "Delete random words.")
def word_delete(text: str, rate: float, rng: random.Random, context: NoiseContext) -> str:
    """Unit: a word ([`word_units`]; the characters of a one-word text). One unit always survives (never "")."""
    words = _Words.of(text)
    n = len(words.words)
    words.delete(rng.sample(range(n), _count_keeping_one(n, rate)))
    return words.text()


@register_operator("word_shuffle", "word", "Shuffle the order of randomly chosen words.")
def word_shuffle(text: str, rate: float, rng: random.Random, context: NoiseContext) -> str:
    """Unit: a word ([`word_units`]; the characters when fewer than two words differ). Gaps stay in place."""
    words = _Words.of(text, distinct=True)
    n = len(words.words)
    if len(set(words.words)) < 2:
        return text
    positions = sorted(rng.sample(range(n), max(2, count_for(n, rate))))
    if len({words.words[position] for position in positions}) < 2:  # alike units would not move: add one that differs
        first = words.words[positions[0]]
        positions = sorted([*positions[:-1], rng.choice([p for p in range(n) if words.words[p] != first])])
    chosen = [words.words[position] for position in positions]
    rotated = chosen[1:] + chosen[:1]  # a rotation of units that are not all alike always changes them
    shuffled = rng.sample(chosen, len(chosen))
    order = shuffled if shuffled != chosen else rotated
    for position, word in zip(positions, order):
        words.words[position] = word
    return words.text()


@register_operator("word_replace", "word", "Replace random words by random vocabulary words (ANIT's `replace`).")
def word_replace(text: str, rate: float, rng: random.Random, context: NoiseContext) -> str:
    """Unit: a word ([`word_units`]), replaced by a different vocabulary word; one unit always survives, so the text
    is never swapped for an unrelated one. A one-word text has its characters replaced by vocabulary letters."""
    words = _Words.of(text)
    n = len(words.words)
    vocabulary = context.vocabulary
    if words.chars:
        vocabulary = sorted({char for word in context.vocabulary for char in word if not char.isspace()})
    for position in rng.sample(range(n), _count_keeping_one(n, rate)):
        # Never the same word again (the vocabulary is often the dataset's own words).
        choices = [word for word in vocabulary if word != words.words[position]] or ["<unk>"]
        words.words[position] = rng.choice(choices)
    return words.text()


@register_operator("word_repeat", "word", "Repeat random words.")
def word_repeat(text: str, rate: float, rng: random.Random, context: NoiseContext) -> str:
    """Unit: a word ([`word_units`]); a character of a script without spaces repeats without one ("好好")."""
    words = _Words(text)
    for position in rng.sample(range(len(words.words)), count_for(len(words.words), rate)):
        word = words.words[position]
        words.words[position] = word + ("" if _NO_SPACE_CHAR.fullmatch(word) else " ") + word
    return words.text()


def _bare(word: str) -> str:
    return word.strip(string.punctuation).lower()


@register_operator("stopword_drop", "word", "Drop random stop words (articles, prepositions, auxiliaries).")
def stopword_drop(text: str, rate: float, rng: random.Random, context: NoiseContext) -> str:
    """Unit: an English stop word ([`word_units`]); a text made of one stop word is kept (never "")."""
    words = _Words(text)
    stops = [position for position, word in enumerate(words.words) if _bare(word) in STOP_WORDS]
    words.delete(rng.sample(stops, min(count_for(len(stops), rate), max(len(words.words) - 1, 0))))
    return words.text()


# ------------------------------------------------------------------------------------------------------ structure
@register_operator("cut", "structure", "Truncate the instruction: drop its last words (ANIT's `cut`).")
def cut(text: str, rate: float, rng: random.Random, context: NoiseContext) -> str:
    """Unit: a word ([`word_units`]; the characters of a one-word text). The first unit always survives (never "")."""
    words = _Words.of(text)
    n = len(words.words)
    words.delete(range(n - _count_keeping_one(n, rate), n))
    return words.text()


def _donor_span(text: str, own_tail: list[str], chars: bool, pool: Sequence[str], rng: random.Random) -> str | None:
    """The end of another instruction of `pool` that differs from `own_tail` (ANIT), or any differing span of one
    when every end equals ours (templated instructions); None when no instruction other than `text` has one."""
    k = len(own_tail)
    # A large pool is sampled, not scanned: the trainer calls this once per row.
    candidates = pool if len(pool) <= 64 else [rng.choice(pool) for _ in range(64)]
    donors = [words for words in (_Words(other, chars) for other in dict.fromkeys(candidates) if other != text)]
    donors = [donor for donor in donors if donor.words]
    tails = [
        donor.span(max(len(donor.words) - k, 0), len(donor.words)) for donor in donors if donor.words[-k:] != own_tail
    ]
    if tails:
        return rng.choice(tails)
    spans = [
        donor.span(start, min(start + k, len(donor.words)))
        for donor in donors
        for start in range(len(donor.words))
        if donor.words[start : start + k] != own_tail
    ]
    return rng.choice(spans) if spans else None


@register_operator("cut_mix", "structure", "Replace the instruction's last words by the end of another instruction.")
def cut_mix(text: str, rate: float, rng: random.Random, context: NoiseContext) -> str:
    """Unit: a word ([`word_units`]; the characters of a one-word text); the first unit always survives.

    The donor is another instruction of the context whose end differs from ours; when the context has none (e.g.
    every row shares one instruction), one of the built-in `DEFAULT_INSTRUCTIONS`, so the text still changes. The
    text's whitespace before and after the replaced span is kept, and the donor's own within it.
    """
    words = _Words.of(text)
    n = len(words.words)
    k = _count_keeping_one(n, rate)
    if k == 0:
        return text
    own_tail = words.words[n - k :]
    span = _donor_span(text, own_tail, words.chars, context.instructions, rng)
    if span is None:
        span = _donor_span(text, own_tail, words.chars, DEFAULT_INSTRUCTIONS, rng)
    if span is None:
        return text
    head = "".join(space + word for space, word in zip(words.spaces, words.words[: n - k]))
    return head + words.spaces[n - k] + span + words.spaces[n]


@register_operator("random_pad", "structure", "Pad the instruction with random vocabulary words at both ends.")
def random_pad(text: str, rate: float, rng: random.Random, context: NoiseContext) -> str:
    """Unit: a word ([`word_units`]), the count of padding words; the text itself is kept verbatim."""
    k = count_for(len(word_units(text)), rate)
    if k == 0:
        return text
    before = rng.randint(0, k)
    head = " ".join(rng.choice(context.vocabulary) for _ in range(before))
    tail = " ".join(rng.choice(context.vocabulary) for _ in range(k - before))
    return " ".join(part for part in (head, text, tail) if part)


@register_operator("opposite", "structure", "Flip the intent: swap antonyms, or negate the instruction.")
def opposite(text: str, rate: float, rng: random.Random, context: NoiseContext) -> str:
    """Unit: an English antonym ([`ANTONYMS`]); a text with none but some non-space character is negated."""
    words = _Words(text)
    flippable = [position for position, word in enumerate(words.words) if _bare(word) in ANTONYMS]
    if not flippable:
        return NEGATION_PREFIX + text if text.strip() else text
    for position in rng.sample(flippable, count_for(len(flippable), rate)):
        word = words.words[position]
        bare = _bare(word)
        flipped = ANTONYMS[bare]
        if word.strip(string.punctuation)[:1].isupper():
            flipped = flipped.capitalize()
        start = word.lower().find(bare)
        words.words[position] = word[:start] + flipped + word[start + len(bare) :]
    return words.text()


# ------------------------------------------------------------------------------------------------------ sentence
@register_operator("irrelevant_append", "sentence", "Append ' and true is true' (StressTest), 1-5 times by rate.")
def irrelevant_append(text: str, rate: float, rng: random.Random, context: NoiseContext) -> str:
    return text + IRRELEVANT_SENTENCE * count_for(5, rate)


@register_operator("random_string", "sentence", "Append a random alphanumeric string (CheckList), 1-20 chars by rate.")
def random_string(text: str, rate: float, rng: random.Random, context: NoiseContext) -> str:
    noise = "".join(rng.choice(string.ascii_letters + string.digits) for _ in range(count_for(20, rate)))
    return f"{text} {noise}" if text else noise


@register_operator("distracting_context", "sentence", "Put 1-3 unrelated sentences before or after the instruction.")
def distracting_context(text: str, rate: float, rng: random.Random, context: NoiseContext) -> str:
    sentences = " ".join(rng.sample(DISTRACTING_CONTEXTS, count_for(3, rate)))
    if not text:
        return sentences
    return f"{sentences} {text}" if rng.random() < 0.5 else f"{text} {sentences}"
