"""Graders: turn a model's free-text response into a final answer and judge it.

One protocol, three graders:

- ``NumberGrader`` (names ``gsm8k``, ``number``): GSM8K-style numeric answers.
  The final answer is the number after the last explicit final-answer
  statement — "answer is N", "answer: N", "#### N" or "\\boxed{N}",
  case-insensitive — else the last number anywhere in the response. This is
  the rule behind ``shared/data/local_tiers/gsm8k_test_outcomes.jsonl``
  (see its README), made tolerant of ``$``, thousands separators (``1,234``,
  ``1 234``, ``9{,}500``, ``9\\,500``; exactly three digits per group), units and words
  after the number, a sentence-ending period, negative numbers, decimals,
  plain and LaTeX fractions. Numbers compare numerically with a tiny tolerance.
- ``ChoiceGrader`` (names ``choice``, ``mc``): a multiple-choice letter A–J, stated
  with a marker ("the answer is B", "Answer: option D"), a verb ("I'd go with (C)")
  or the letter first ("Option C is correct"); the article "a" is not a choice.
- ``ExactGrader`` (name ``exact``): normalised string equality.

Every grader has ``extract(response) -> str | None`` (the normalised answer),
``well_formed(response) -> bool`` (the answer is stated in the expected final
form, not guessed from a stray token) and ``grade(response, gold) -> Grade``
(``correct`` is None when there is no gold). ``get_grader(name)`` returns one
by name and raises ``ConfigError`` on an unknown name.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from fractions import Fraction
from typing import Protocol, runtime_checkable

from dreamroute.errors import ConfigError

__all__ = [
    "Grade",
    "Grader",
    "NumberGrader",
    "ChoiceGrader",
    "ExactGrader",
    "get_grader",
    "grader_names",
    "parse_number",
    "format_number",
    "normalize_text",
]


@dataclass(frozen=True)
class Grade:
    """The verdict on one response.

    correct: True/False, or None when there was no gold answer to judge against.
    predicted: the normalised final answer found in the response (None: none found).
    gold: the normalised gold answer (None when none was given).
    """

    correct: bool | None
    predicted: str | None
    gold: str | None


@runtime_checkable
class Grader(Protocol):
    """What every grader offers; see the module docstring."""

    name: str

    def extract(self, response: str) -> str | None: ...

    def well_formed(self, response: str) -> bool: ...

    def grade(self, response: str, gold: str | None) -> Grade: ...


# --------------------------------------------------------------------------- numbers

_MINUS = "-\u2212\u2013"  # ASCII hyphen-minus, Unicode minus, en dash
# Thousands separators as people and LaTeX write them: "1,234", "9{,}500", "9\\,500", and
# blanks: "1 234" (a space, no-break or thin space, "\\ "). A separator groups exactly three
# digits after it, the same separator throughout, so "1, 2, 3" and "12 3456" are never merged;
# a blank-grouped number must not run into a word ("5 100m" is 5 then 100).
_SEP = r",|\{,\}|\\[,;]"
_BLANK_SEP = r"\\ | |[\u00a0\u2007\u2009\u202f]"
# A number token. The sign only counts when it does not follow a word character
# or ")" (so "20-5" is 20 then 5, not 20 then -5); "$" may sit on either side of it.
_NUM = (
    r"(?<![\w.)])(?P<sign>[" + _MINUS + r"])?(?:\\?\$\s?)?"
    r"(?:"
    r"\\d?frac\{\s*(?P<fnum>\d+)\s*\}\{\s*(?P<fden>\d+)\s*\}"  # \frac{3}{4}, \dfrac{3}{4}
    r"|(?P<num>\d+)/(?P<den>\d+)(?![\d/])"  # 3/4
    r"|(?P<int>\d{1,3}(?P<sep>" + _SEP + r")\d{3}(?:(?P=sep)\d{3})*(?!\d)(?:\.\d+)?"  # 1,234.50 | 9{,}500
    r"|\d{1,3}(?P<bsep>" + _BLANK_SEP + r")\d{3}(?:(?P=bsep)\d{3})*(?!\w|-\w)(?:\.\d+)?"  # 1 234.50
    r"|\d+(?:\.\d+)?|\.\d+)"  # 18 | .5
    r")"
)
_NUM_RE = re.compile(_NUM)
# What may stand between a final-answer marker and its number: blanks, punctuation,
# markdown emphasis, "$", opening brackets and LaTeX commands such as \( \[ \boxed{
# \text{ (but not \frac, which is part of the number).
_GAP = r"(?:[\s:*_$(){}\[\]=~]|\\(?!d?frac)(?:[a-zA-Z]+|.))*?"
# "answer:" counts only as a label — at a line start (after markdown "#", "*", "-")
# or as "final answer:" — so that "add 2 to the answer: 2 + 3 = 5" reads 5, not 2.
_FINAL_RE = re.compile(
    r"(?:answer\s+is|^[\s#*>-]*answer\s*:|final\s+answer\s*:|####|\\boxed\s*\{)" + _GAP + _NUM,
    re.IGNORECASE | re.MULTILINE,
)
_TOL = 1e-6


def _token_value(m: re.Match[str]) -> Fraction | None:
    """The exact value of one ``_NUM`` match, or None (e.g. a zero denominator)."""
    if m.group("fnum") is not None:
        num, den = int(m.group("fnum")), int(m.group("fden"))
        value = Fraction(num, den) if den else None
    elif m.group("num") is not None:
        num, den = int(m.group("num")), int(m.group("den"))
        value = Fraction(num, den) if den else None
    else:
        value = Fraction(re.sub(r"[^\d.]", "", m.group("int")))  # drop the thousands separators
    if value is not None and m.group("sign"):
        value = -value
    return value


def format_number(value: Fraction) -> str:
    """Canonical text of a number: "18", "-3", "0.75", "1234.5"; "1/3" when not a finite decimal."""
    if value.denominator == 1:
        return str(value.numerator)
    den = value.denominator
    for p in (2, 5):
        while den % p == 0:
            den //= p
    if den != 1:  # not a terminating decimal: keep it exact
        return f"{value.numerator}/{value.denominator}"
    text = f"{float(value):.15f}".rstrip("0").rstrip(".")
    return text if Fraction(text) == value else f"{value.numerator}/{value.denominator}"


def parse_number(text: str) -> Fraction | None:
    """The value of the first number in ``text`` ("$1,234.50" -> 1234.5, "3/4" -> 0.75), or None."""
    for m in _NUM_RE.finditer(text):
        value = _token_value(m)
        if value is not None:
            return value
    return None


def _numbers_equal(a: Fraction, b: Fraction) -> bool:
    """Numeric equality with a tiny relative tolerance (absolute near zero)."""
    return abs(float(a) - float(b)) <= _TOL * max(1.0, abs(float(a)), abs(float(b)))


class NumberGrader:
    """GSM8K-style numeric grader (see the module docstring for the rule).

    extract("... The answer is $1,234.50.") -> "1234.5"; gold may be a bare number
    ("18", "1,234") or a full GSM8K solution with "#### N".
    """

    name = "gsm8k"

    def _final(self, response: str) -> Fraction | None:
        """The number of the last explicit final-answer statement, or None."""
        value = None
        for m in _FINAL_RE.finditer(response):
            v = _token_value(m)
            if v is not None:
                value = v
        return value

    def extract_value(self, response: str) -> Fraction | None:
        """The final answer as an exact number, or None when the response holds no number."""
        value = self._final(response)
        if value is not None:
            return value
        for m in _NUM_RE.finditer(response):
            v = _token_value(m)
            if v is not None:
                value = v
        return value

    def extract(self, response: str) -> str | None:
        value = self.extract_value(response)
        return None if value is None else format_number(value)

    def well_formed(self, response: str) -> bool:
        return self._final(response) is not None

    def gold_value(self, gold: str) -> Fraction | None:
        """The gold number: after the last "####" when present, else the first number in ``gold``."""
        if "####" in gold:
            gold = gold.rsplit("####", 1)[1]
        return parse_number(gold)

    def grade(self, response: str, gold: str | None) -> Grade:
        predicted = self.extract_value(response)
        pred_text = None if predicted is None else format_number(predicted)
        if gold is None:
            return Grade(correct=None, predicted=pred_text, gold=None)
        gold_v = self.gold_value(str(gold))
        if gold_v is None:  # a non-numeric gold: fall back to comparing normalised text
            gold_text = normalize_text(str(gold))
            return Grade(correct=pred_text == gold_text, predicted=pred_text, gold=gold_text)
        correct = predicted is not None and _numbers_equal(predicted, gold_v)
        return Grade(correct=correct, predicted=pred_text, gold=format_number(gold_v))


# --------------------------------------------------------------------------- choices

_LETTERS = "A-J"
_CHOICE_MARKER = (
    r"(?i:(?:(?:(?:correct|right|final|best)\s+)?(?:answer|option|choice)"
    r"(?:\s+(?:is|would\s+be|will\s+be|should\s+be|must\s+be)"
    r"(?:\s+(?:therefore|thus|hence|clearly|probably|definitely|likely))?|\s*:)"
    # a choice stated with a verb: "I'd go with (C)", "I choose B", "let's pick option D"
    r"|\b(?:(?:go(?:ing)?|went)\s+with|choose|chose|pick(?:ed)?|select(?:ed)?|opt(?:ed)?\s+for))"
    r"(?:\s+(?:option|choice|letter|answer))?)"  # "Answer: option D", "the answer is choice (B)"
)
# After a marker: an upper-case letter, or a lower-case one that is plainly a
# label — "(b)", "b)", or standing alone before ".", "," or the end — so that
# "the answer is a bit unclear" or "I'd go with a different approach" is not read as "A".
_MARKED_RE = re.compile(
    _CHOICE_MARKER + r"[\s:*_(\[]*"
    r"(?:\(?(?P<up>[" + _LETTERS + r"])(?![A-Za-z'])"
    r"|\((?P<lo1>[a-j])\)|(?P<lo2>[a-j])(?:\)|(?=\s*(?:[.,;*]|$))))",
    re.MULTILINE,
)
# The letter first: "Option C is correct", "(B) is the correct answer", "**D** is right".
_LETTER_FIRST_RE = re.compile(
    r"(?<![\w'])\**(?:(?i:option|choice|answer)\s+)?"
    r"(?:\((?P<p>[" + _LETTERS + r"a-j])\)|(?P<q>[" + _LETTERS + r"])(?![\w']))\**"
    r"\s+is\s+(?:(?i:the|clearly|definitely)\s+)?"
    r"(?i:(?:correct|right)(?:\s+(?:answer|option|choice|one))?|best\s+(?:answer|option|choice))(?![\w-])",
)
# Weaker evidence, used only when no marker names a letter: "**C**", "(B)",
# "B)" or "B." starting a line, or a response that is just a letter.
_LOOSE_RE = re.compile(
    r"\*\*\(?(?P<a>[" + _LETTERS + r"])\)?\*\*"
    r"|\((?P<b>[" + _LETTERS + r"])\)"
    r"|^\s*(?P<c>[" + _LETTERS + r"])[).:](?!\w)"
    r"|^\s*(?P<d>[" + _LETTERS + r"])\s*$",
    re.MULTILINE,
)


class ChoiceGrader:
    """Multiple-choice grader: the chosen letter A–J, upper-cased ("Answer: b" -> "B").

    The last explicit choice wins: "answer is X" / "answer: X" / "correct option is X" /
    "Answer: option X", a verb ("I'd go with (X)", "I choose X", "let's pick option X") or
    the letter first ("Option X is correct", "(X) is the right answer"); a lower-case letter
    counts only when it is plainly a label, so the article in "a good answer" is not "A".
    Failing that, the last loose letter ("**C**", "(B)", "B)" at a line start, a lone "D").
    """

    name = "choice"

    def _marked(self, response: str) -> str | None:
        """The letter of the last explicit choice statement (marker first or letter first), or None."""
        found: list[tuple[int, str]] = []
        for m in _MARKED_RE.finditer(response):
            group = "up" if m.group("up") else "lo1" if m.group("lo1") else "lo2"
            found.append((m.start(group), m.group(group).upper()))
        for m in _LETTER_FIRST_RE.finditer(response):
            group = "p" if m.group("p") else "q"
            found.append((m.start(group), m.group(group).upper()))
        return max(found)[1] if found else None

    def extract(self, response: str) -> str | None:
        letter = self._marked(response)
        if letter is not None:
            return letter
        for m in _LOOSE_RE.finditer(response):
            letter = next(g for g in m.groups() if g).upper()
        return letter

    def well_formed(self, response: str) -> bool:
        return self._marked(response) is not None

    def grade(self, response: str, gold: str | None) -> Grade:
        predicted = self.extract(response)
        if gold is None:
            return Grade(correct=None, predicted=predicted, gold=None)
        gold_letter = self.extract(str(gold)) or normalize_text(str(gold)).upper()
        return Grade(correct=predicted == gold_letter, predicted=predicted, gold=gold_letter)


# --------------------------------------------------------------------------- exact

_QUOTES = "\"'`\u201c\u201d\u2018\u2019"
_EXACT_MARKER_RE = re.compile(r"(?:answer\s+is|answer\s*:)[ \t]*(?P<rest>[^\n]*)", re.IGNORECASE)


def normalize_text(text: str) -> str:
    """Strip, casefold, collapse whitespace, drop surrounding quotes and trailing periods."""
    text = " ".join(text.split()).casefold()
    prev = None
    while prev != text:
        prev = text
        text = text.strip().strip(_QUOTES).rstrip(".").strip()
    return text


class ExactGrader:
    """Normalised exact-match grader.

    The answer is the rest of the line after the last "answer is" / "answer:"
    when the response has one (well formed), else the whole response; both
    sides go through ``normalize_text``.
    """

    name = "exact"

    def _marked(self, response: str) -> str | None:
        rest = None
        for m in _EXACT_MARKER_RE.finditer(response):
            rest = m.group("rest")
        return rest

    def extract(self, response: str) -> str | None:
        rest = self._marked(response)
        text = normalize_text(rest.replace("*", "") if rest is not None else response)
        return text or None

    def well_formed(self, response: str) -> bool:
        rest = self._marked(response)
        return rest is not None and bool(normalize_text(rest))

    def grade(self, response: str, gold: str | None) -> Grade:
        predicted = self.extract(response)
        if gold is None:
            return Grade(correct=None, predicted=predicted, gold=None)
        gold_text = normalize_text(str(gold))
        return Grade(correct=predicted == gold_text, predicted=predicted, gold=gold_text)


# --------------------------------------------------------------------------- registry

_GRADERS: dict[str, type] = {
    "gsm8k": NumberGrader,
    "number": NumberGrader,
    "choice": ChoiceGrader,
    "mc": ChoiceGrader,
    "exact": ExactGrader,
}


def grader_names() -> list[str]:
    """Every name ``get_grader`` accepts."""
    return sorted(_GRADERS)


def get_grader(name: str) -> Grader:
    """A grader by name ("gsm8k"/"number", "choice"/"mc", "exact"; case-insensitive).

    Raises:
        ConfigError: unknown name; the message lists the known ones.
    """
    cls = _GRADERS.get(str(name).strip().lower())
    if cls is None:
        raise ConfigError(
            f"unknown grader {name!r}; known graders: {', '.join(grader_names())}. "
            "Set the record's or workload's grader to one of those."
        )
    return cls()
