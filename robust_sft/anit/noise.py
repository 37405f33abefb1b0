"""Instruction perturbations and their semantic distortion (the noise side of ANIT, reused by the robustness eval).

Every operator has the signature `op(text, rate, rng, context=None) -> noisy_text`:

- `rate` in [0, 1] is the share of the operator's units that change (characters, words, or, for the sentence-level
  operators, how much text is added); `rate=0` returns the text unchanged, a positive rate changes at least one unit
  when the text has one;
- `rng` is a `random.Random` (or an int seed): the same seed gives the same output;
- `context` ([`NoiseContext`]) gives the other instructions (for `cut_mix`) and a vocabulary (for `word_replace`,
  `random_pad`); without it, small built-in lists are used.

Units, by level (each operator's docstring says its own):

- character: a non-space character; whitespace is never deleted, substituted or swapped;
- word: a whitespace-separated word, each character of a script written without spaces (Han, kana, Thai, ...) being
  a word of its own ([`word_units`]); operators that delete, replace or truncate fall back to the characters of a
  one-word text, and keep at least one unit, so a non-empty text never becomes "" or an unrelated text;
- structure, sentence: the text as a whole (padding, negation, appended sentences), or words as above.

Every operator keeps the text's own whitespace and newlines outside the span it changes. When a text has no unit
(a one-character text for `cut`, no stop word for `stopword_drop`, ...) it comes back unchanged: use
[`apply_noise`], which returns the operator's name only when the text changed, to log the noise honestly.

Operators never fail on text: empty strings and any unicode are accepted (fuzzed with hypothesis in the tests).
"""

from __future__ import annotations

import logging
import math
import random
import re
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


# ------------------------------------------------------------------------------------------------------ units
# Scripts written without spaces between words: each of their characters is a word-level unit, so that a Chinese or
# Thai sentence is not one "word" that word operators delete or replace as a whole.
_NO_SPACE_SCRIPTS = (
    "\u0e00-\u0eff"  # Thai, Lao
    "\u1000-\u109f"  # Myanmar
    "\u1780-\u17ff"  # Khmer
    "\u3001-\u303f"  # CJK punctuation (U+3000 is a space)
    "\u3040-\u30ff\u31f0-\u31ff"  # kana
    "\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"  # Han
    "\uff61-\uff9f"  # half-width CJK punctuation and katakana
    "\U00020000-\U0003134f"  # Han extensions
)
_NO_SPACE_CHAR = re.compile(f"[{_NO_SPACE_SCRIPTS}]")
_WORD_UNIT = re.compile(rf"[{_NO_SPACE_SCRIPTS}]|[^\s{_NO_SPACE_SCRIPTS}]+")
_CHAR_UNIT = re.compile(r"\S")


def word_units(text: str) -> list[str]:
    """The units word-level operators work on: whitespace-separated words, with each character of a script written
    without spaces (Han, kana, Thai, Lao, Khmer, Myanmar, CJK punctuation) a unit of its own."""
    return _WORD_UNIT.findall(text)


@dataclass(frozen=True)
class NoiseContext:
    """What some operators draw from: other instructions (`cut_mix`), a vocabulary (`word_replace`, `random_pad`)."""

    instructions: Sequence[str] = DEFAULT_INSTRUCTIONS
    vocabulary: Sequence[str] = DEFAULT_VOCABULARY

    @classmethod
    def from_texts(cls, texts: Iterable[str]) -> NoiseContext:
        """A context built from a dataset's own instructions: they are the cut-mix pool, their words the vocabulary."""
        instructions = tuple(dict.fromkeys(text for text in texts if text and text.strip()))
        # Letter runs of two or more, split like the word operators split them: single Han/kana/Thai characters count.
        runs = (run for text in instructions for run in re.findall(r"[^\W\d_]+", text))
        words = sorted(
            {word for run in runs for word in word_units(run) if len(word) >= 2 or _NO_SPACE_CHAR.match(word)}
        )
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


def apply_noise(
    text: str,
    operator: str | NoiseOperator,
    rate: float,
    seed: int | str | random.Random = 0,
    context: NoiseContext | None = None,
) -> tuple[str, str]:
    """`(noisy_text, operator_name)`, the name "" when the text came back unchanged, so logs count only real noise.

    An operator can leave a text as it was (no unit to change: a one-character text for `cut`, no stop word for
    `stopword_drop`, ...); a caller that logs the drawn operator regardless reports clean rows as noisy.
    `seed` is a seed or a `random.Random` to draw from (e.g. a per-row generator that also drew the operator).
    """
    noise = operator if isinstance(operator, NoiseOperator) else get_operator(operator)
    rng = seed if isinstance(seed, random.Random) else random.Random(seed)
    noisy = noise(text, rate, rng, context)
    return noisy, (noise.name if noisy != text else "")


def count_for(units: int, rate: float) -> int:
    """How many of `units` a rate changes: round(rate * units), at least one when rate > 0, at most all of them."""
    if units <= 0 or rate <= 0:
        return 0
    return min(units, max(1, round(rate * units)))


def _count_keeping_one(units: int, rate: float) -> int:
    """`count_for`, but at most `units - 1`: operators that remove or replace units keep one of the text's own."""
    return min(count_for(units, rate), max(units - 1, 0))


# The operators register themselves on import.
from . import operators  # noqa: E402, F401
