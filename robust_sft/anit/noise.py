"""Instruction perturbations and their semantic distortion (the noise side of ANIT, reused by the robustness eval).

Every operator has the signature `op(text, rate, rng, context=None) -> noisy_text`:

- `rate` in [0, 1] is the share of the operator's units that change (characters, words, or, for the sentence-level
  operators, how much text is added); `rate=0` returns the text unchanged, a positive rate changes at least one unit
  when the text has one;
- `rng` is a `random.Random` (or an int seed): the same seed gives the same output;
- `context` ([`NoiseContext`]) gives the other instructions (for `cut_mix`) and a vocabulary (for `word_replace`,
  `random_pad`); without it, small built-in lists are used.

Operators never fail on text: empty strings and any unicode are accepted (fuzzed with hypothesis in the tests).
"""

from __future__ import annotations

import logging
import math
import random
import re
import string
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

logger = logging.getLogger(__name__)


LEVELS = ("character", "word", "structure", "sentence")


DEFAULT_VOCABULARY = tuple(
    "apple river table quickly green music window seven paper garden blue happy mountain letter orange slowly "
    "engine forest silver coffee bridge yellow pencil winter ocean camera simple market doctor travel".split()
)


DEFAULT_INSTRUCTIONS = (
    "Write a short poem about the sea.",
    "List three uses of a paper clip.",
    "Translate the sentence into French.",
    "Summarize the paragraph in one sentence.",
    "Explain how a bicycle works.",
    "Give the capital city of the country.",
)


STOP_WORDS = frozenset(
    "a an the of to in on at by for with from and or but is are was were be been being it its this that these those "
    "as into about than then so if do does did can could should would will shall may might must".split()
)


# Intent flips for `opposite`, both directions.
_ANTONYM_PAIRS = (
    ("positive", "negative"),
    ("true", "false"),
    ("correct", "incorrect"),
    ("yes", "no"),
    ("increase", "decrease"),
    ("largest", "smallest"),
    ("maximum", "minimum"),
    ("best", "worst"),
    ("agree", "disagree"),
    ("before", "after"),
    ("more", "less"),
    ("include", "exclude"),
    ("add", "remove"),
    ("first", "last"),
    ("longest", "shortest"),
    ("same", "different"),
    ("always", "never"),
    ("all", "none"),
)


ANTONYMS = {a: b for a, b in _ANTONYM_PAIRS} | {b: a for a, b in _ANTONYM_PAIRS}


NEGATION_PREFIX = "Do not do this: "


IRRELEVANT_SENTENCE = " and true is true"  # StressTest's distraction


DISTRACTING_CONTEXTS = (
    "The weather in the mountains changes quickly in spring.",
    "Many cats sleep for more than twelve hours a day.",
    "The museum opens at nine and closes at five.",
    "Bananas are botanically classified as berries.",
)


_KEYBOARD_ROWS = ("qwertyuiop", "asdfghjkl", "zxcvbnm")


def _keyboard_neighbours() -> dict[str, str]:
    position = {char: (row, col) for row, keys in enumerate(_KEYBOARD_ROWS) for col, char in enumerate(keys)}
    neighbours = {}
    for char, (row, col) in position.items():
        near = [
            other
            for other, (other_row, other_col) in position.items()
            if other != char and abs(other_row - row) <= 1 and abs(other_col - col) <= 1
        ]
        neighbours[char] = "".join(near)
    return neighbours


KEYBOARD_NEIGHBOURS = _keyboard_neighbours()


@dataclass(frozen=True)
class NoiseContext:
    """What some operators draw from: other instructions (`cut_mix`), a vocabulary (`word_replace`, `random_pad`)."""

    instructions: Sequence[str] = DEFAULT_INSTRUCTIONS
    vocabulary: Sequence[str] = DEFAULT_VOCABULARY

    @classmethod
    def from_texts(cls, texts: Iterable[str]) -> NoiseContext:
        """A context built from a dataset's own instructions: they are the cut-mix pool, their words the vocabulary."""
        instructions = tuple(dict.fromkeys(text for text in texts if text and text.strip()))
        words = sorted({word for text in instructions for word in re.findall(r"[^\W\d_]{2,}", text)})
        return cls(instructions=instructions or DEFAULT_INSTRUCTIONS, vocabulary=tuple(words) or DEFAULT_VOCABULARY)


NoiseFunction = Callable[[str, float, random.Random, NoiseContext], str]


@dataclass(frozen=True)
class NoiseOperator:
    """A named perturbation; call it as `op(text, rate, rng, context=None)`."""

    name: str
    level: str
    description: str
    function: NoiseFunction = field(repr=False)

    def __call__(
        self, text: str, rate: float, rng: random.Random | int | None = None, context: NoiseContext | None = None
    ) -> str:
        if not isinstance(text, str):
            raise TypeError(f"Noise operators take a text, got {type(text).__name__}.")
        if not 0.0 <= rate <= 1.0 or math.isnan(rate):
            raise ValueError(f"The noise rate must be in [0, 1], got {rate}.")
        if rate == 0.0:
            return text
        if not isinstance(rng, random.Random):
            rng = random.Random(rng)
        return self.function(text, rate, rng, context or NoiseContext())


OPERATORS: dict[str, NoiseOperator] = {}


def register_operator(name: str, level: str, description: str) -> Callable[[NoiseFunction], NoiseFunction]:
    """Add a function `(text, rate, rng, context) -> text` to the registry under `name` (rate 0 is handled for it)."""
    if level not in LEVELS:
        raise ValueError(f"Unknown noise level {level!r}; expected one of {LEVELS}.")

    def register(function: NoiseFunction) -> NoiseFunction:
        OPERATORS[name] = NoiseOperator(name, level, description, function)
        return function

    return register


def get_operator(name: str) -> NoiseOperator:
    """The registered operator called `name` (a clear error lists the names otherwise)."""
    try:
        return OPERATORS[name]
    except KeyError:
        raise KeyError(f"Unknown noise operator {name!r}. Registered operators: {', '.join(OPERATORS)}.") from None


def operators_for(level: str | None = None) -> list[str]:
    """Names of the registered operators, all or of one level."""
    return [name for name, op in OPERATORS.items() if level is None or op.level == level]


def perturb(text: str, operator: str, rate: float, seed: int = 0, context: NoiseContext | None = None) -> str:
    """Apply the operator `operator` to `text` with a fresh generator seeded by `seed`."""
    return get_operator(operator)(text, rate, random.Random(seed), context)


def count_for(units: int, rate: float) -> int:
    """How many of `units` a rate changes: round(rate * units), at least one when rate > 0, at most all of them."""
    if units <= 0 or rate <= 0:
        return 0
    return min(units, max(1, round(rate * units)))


# ------------------------------------------------------------------------------------------------------ characters
def _random_letter(rng: random.Random) -> str:
    return rng.choice(string.ascii_lowercase)


@register_operator("char_insert", "character", "Insert random letters at random positions.")
def char_insert(text: str, rate: float, rng: random.Random, context: NoiseContext) -> str:
    chars = list(text)
    for _ in range(count_for(len(text), rate)):
        chars.insert(rng.randrange(len(chars) + 1), _random_letter(rng))
    return "".join(chars)


@register_operator("char_delete", "character", "Delete random characters.")
def char_delete(text: str, rate: float, rng: random.Random, context: NoiseContext) -> str:
    drop = set(rng.sample(range(len(text)), count_for(len(text), rate)))
    return "".join(char for position, char in enumerate(text) if position not in drop)


@register_operator("char_swap", "character", "Swap random pairs of neighbouring characters.")
def char_swap(text: str, rate: float, rng: random.Random, context: NoiseContext) -> str:
    chars = list(text)
    if len(chars) < 2:
        return text
    for position in rng.sample(range(len(chars) - 1), count_for(len(chars) - 1, rate)):
        chars[position], chars[position + 1] = chars[position + 1], chars[position]
    return "".join(chars)


@register_operator("char_substitute", "character", "Replace random characters by random letters.")
def char_substitute(text: str, rate: float, rng: random.Random, context: NoiseContext) -> str:
    chars = list(text)
    for position in rng.sample(range(len(chars)), count_for(len(chars), rate)):
        chars[position] = _random_letter(rng)
    return "".join(chars)


@register_operator("keyboard_typo", "character", "Replace random letters by a neighbouring QWERTY key.")
def keyboard_typo(text: str, rate: float, rng: random.Random, context: NoiseContext) -> str:
    chars = list(text)
    letters = [position for position, char in enumerate(chars) if char.lower() in KEYBOARD_NEIGHBOURS]
    for position in rng.sample(letters, count_for(len(letters), rate)):
        typo = rng.choice(KEYBOARD_NEIGHBOURS[chars[position].lower()])
        chars[position] = typo.upper() if chars[position].isupper() else typo
    return "".join(chars)


# ------------------------------------------------------------------------------------------------------ words
class _Words:
    """A text as words and the whitespace around them, so word edits keep the original spacing and newlines."""

    def __init__(self, text: str):
        parts = re.split(r"(\S+)", text)
        self.spaces, self.words = parts[0::2], parts[1::2]  # len(spaces) == len(words) + 1

    def delete(self, positions: Iterable[int]) -> None:
        for position in sorted(set(positions), reverse=True):
            last = position == len(self.words) - 1
            del self.words[position]
            # Drop the gap after the word, or before it for the last word (so trailing whitespace survives).
            del self.spaces[position if last and position > 0 else position + 1]

    def text(self) -> str:
        return "".join(space + word for space, word in zip(self.spaces, [*self.words, ""]))


@register_operator("word_delete", "word", "Delete random words.")
def word_delete(text: str, rate: float, rng: random.Random, context: NoiseContext) -> str:
    words = _Words(text)
    words.delete(rng.sample(range(len(words.words)), count_for(len(words.words), rate)))
    return words.text()


@register_operator("word_shuffle", "word", "Shuffle the order of randomly chosen words.")
def word_shuffle(text: str, rate: float, rng: random.Random, context: NoiseContext) -> str:
    words = _Words(text)
    n = len(words.words)
    if n < 2:
        return text
    positions = sorted(rng.sample(range(n), max(2, count_for(n, rate))))
    chosen = [words.words[position] for position in positions]
    rotated = chosen[1:] + chosen[:1]  # a rotation always moves every chosen word
    shuffled = rng.sample(chosen, len(chosen))
    order = shuffled if shuffled != chosen else rotated
    for position, word in zip(positions, order):
        words.words[position] = word
    return words.text()


@register_operator("word_replace", "word", "Replace random words by random vocabulary words (ANIT's `replace`).")
def word_replace(text: str, rate: float, rng: random.Random, context: NoiseContext) -> str:
    words = _Words(text)
    for position in rng.sample(range(len(words.words)), count_for(len(words.words), rate)):
        # Never the same word again (the vocabulary is often the dataset's own words).
        choices = [word for word in context.vocabulary if word != words.words[position]] or ["<unk>"]
        words.words[position] = rng.choice(choices)
    return words.text()


@register_operator("word_repeat", "word", "Repeat random words.")
def word_repeat(text: str, rate: float, rng: random.Random, context: NoiseContext) -> str:
    words = _Words(text)
    for position in sorted(rng.sample(range(len(words.words)), count_for(len(words.words), rate)), reverse=True):
        words.words[position] = f"{words.words[position]} {words.words[position]}"
    return words.text()


def _bare(word: str) -> str:
    return word.strip(string.punctuation).lower()


@register_operator("stopword_drop", "word", "Drop random stop words (articles, prepositions, auxiliaries).")
def stopword_drop(text: str, rate: float, rng: random.Random, context: NoiseContext) -> str:
    words = _Words(text)
    stops = [position for position, word in enumerate(words.words) if _bare(word) in STOP_WORDS]
    words.delete(rng.sample(stops, count_for(len(stops), rate)))
    return words.text()


# ------------------------------------------------------------------------------------------------------ structure
@register_operator("cut", "structure", "Truncate the instruction: drop its last words (ANIT's `cut`).")
def cut(text: str, rate: float, rng: random.Random, context: NoiseContext) -> str:
    words = _Words(text)
    n = len(words.words)
    words.delete(range(n - count_for(n, rate), n))
    return words.text()


@register_operator("cut_mix", "structure", "Replace the instruction's last words by the end of another instruction.")
def cut_mix(text: str, rate: float, rng: random.Random, context: NoiseContext) -> str:
    words = _Words(text)
    n = len(words.words)
    k = count_for(n, rate)
    own_tail = words.words[n - k :]
    donors = [other.split() for other in context.instructions if other != text and other.split()]
    # The other instruction's end (ANIT); any span of it when every end equals ours (templated instructions).
    tails = [donor[-k:] for donor in donors if donor[-k:] != own_tail]
    spans = tails or [
        donor[start : start + k]
        for donor in donors
        for start in range(len(donor))
        if donor[start : start + k] != own_tail
    ]
    if n == 0 or not spans:
        return text
    return " ".join([*words.words[: n - k], *rng.choice(spans)])


@register_operator("random_pad", "structure", "Pad the instruction with random vocabulary words at both ends.")
def random_pad(text: str, rate: float, rng: random.Random, context: NoiseContext) -> str:
    k = count_for(len(text.split()), rate)
    if k == 0:
        return text
    before = rng.randint(0, k)
    head = " ".join(rng.choice(context.vocabulary) for _ in range(before))
    tail = " ".join(rng.choice(context.vocabulary) for _ in range(k - before))
    return " ".join(part for part in (head, text, tail) if part)


@register_operator("opposite", "structure", "Flip the intent: swap antonyms, or negate the instruction.")
def opposite(text: str, rate: float, rng: random.Random, context: NoiseContext) -> str:
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
