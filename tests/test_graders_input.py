"""Graders on the input people and LaTeX write: thousands separators, and choices stated in prose."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dreamroute.grading import ChoiceGrader, NumberGrader

SEPARATORS = [",", " ", "\u00a0", "\u202f", "\u2009", "{,}", "\\,", "\\ "]
WRAPS = [
    "The answer is {}.",
    "Some work: 3 + 4 = 7, then 12 / 4 = 3.\nThe answer is {} dollars.",
    "\\boxed{{{}}}",
    "Thus, the answer is:\n\\[ \\boxed{{{}}} \\]",
    "The answer is \\(\\boxed{{\\${}}}\\).",
    "#### {}",
    "She ends up with {}",  # no marker: the last number
]


def grouped(n: int, sep: str) -> str:
    """``n`` with its digits grouped in threes by ``sep`` ("-1{,}234{,}567")."""
    return ("-" if n < 0 else "") + f"{abs(n):,}".replace(",", sep)


@pytest.mark.parametrize(
    "response, expected",
    [
        ("The answer is 1,234.", "1234"),
        ("The answer is 1 234 apples.", "1234"),
        ("The answer is 1\u202f234\u202f567.", "1234567"),
        ("\\boxed{9{,}500}", "9500"),
        ("Therefore \\(\\boxed{9\\,500}\\).", "9500"),
        ("The answer is $12{,}345{,}678.50.", "12345678.5"),
        ("The answer is 1 234.50", "1234.5"),
        ("#### 1 000 000", "1000000"),
        ("\\boxed{-1\\ 234}", "-1234"),
        # a separator groups exactly three digits after it, the same one throughout
        ("The answer is 1 and 234", "1"),
        ("We count 1, 2, 3", "3"),
        ("We count 1, 234", "234"),
        ("scores 12 3456", "3456"),
        ("total 1,234 567", "567"),
        ("The answer is 1,2345", "1"),
        # a blank-grouped number does not run into a unit or a hyphenated word
        ("He ran 5 100m sprints", "100"),
        ("She ran 3 100-meter laps", "100"),
        ("In 2023 100 people came", "100"),
    ],
)
def test_thousands_separators(response: str, expected: str) -> None:
    assert NumberGrader().extract(response) == expected


@given(st.integers(min_value=-10**12, max_value=10**12), st.sampled_from(SEPARATORS), st.sampled_from(WRAPS))
def test_every_separator_style_reads_the_integer(n: int, sep: str, wrap: str) -> None:
    text = wrap.format(grouped(n, sep))
    g = NumberGrader()
    assert g.extract(text) == str(n), text
    assert g.grade(text, f"#### {grouped(n, ',')}").correct is True


@given(st.integers(min_value=0, max_value=10**9), st.sampled_from(SEPARATORS), st.integers(1, 99))
def test_grouped_decimals(whole: int, sep: str, cents: int) -> None:
    text = f"The answer is {grouped(whole, sep)}.{cents:02d}"
    assert NumberGrader().grade(text, f"{whole}.{cents:02d}").correct is True, text


@given(st.lists(st.integers(min_value=0, max_value=999), min_size=2, max_size=8),
       st.sampled_from([", ", " and ", "; ", ",\n"]))
def test_a_list_of_small_numbers_is_not_merged(xs: list[int], joiner: str) -> None:
    text = "The values are " + joiner.join(map(str, xs))
    g = NumberGrader()
    assert g.extract(text) == str(xs[-1]), text
    assert g.extract("The answer is " + joiner.join(map(str, xs))) == str(xs[0])


@given(st.lists(st.integers(min_value=0, max_value=99), min_size=2, max_size=8))
def test_blank_separated_small_numbers_are_not_merged(xs: list[int]) -> None:
    assert NumberGrader().extract("We see " + " ".join(map(str, xs))) == str(xs[-1])


# --------------------------------------------------------------------------- choices in prose

STATEMENTS = [
    "The correct option is {L}.",
    "I'd go with ({L}).",
    "Answer: option {L}",
    "So the answer is {L}.",
    "I would choose {L}.",
    "Let's pick option {L}.",
    "Option {L} is correct.",
    "({L}) is the right answer.",
    "My final choice: ({l})",
    "**Final answer:** {L}",
    "I'm going with {L}, since it fits.",
    "Therefore, the best choice would be {L}.",
    "After weighing them, I opted for {L}.",
    "**{L}** is the correct answer.",
]
# Prose full of the article "a" (and "A" opening a sentence) but no choice.
FILLER = [
    "A good answer takes care",
    "a good answer is hard to find",
    "I'd go with a different approach at first",
    "the answer is a bit subtle",
    "we need a moment to think",
    "pick a number and check it",
    "A careful reader checks each option",
    "I choose a slower path here",
    "an answer like this needs a reason",
    "It is a tricky one",
    "A quick check helps",
    "this is a good question",
]
WORDS = ["the", "a", "an", "we", "check", "each", "value", "then", "I", "think", "so", "it", "fits", "good",
         "thought", "question", "carefully", "and", "of", "A", "hard", "bit"]
filler = st.lists(st.one_of(st.sampled_from(FILLER), st.lists(st.sampled_from(WORDS), min_size=2, max_size=8)
                            .map(" ".join)), max_size=4)


def prose(parts: list[str]) -> str:
    return "".join(p[:1].upper() + p[1:] + ". " for p in parts)


@pytest.mark.parametrize(
    "response, expected",
    [
        ("After checking, the correct option is B.", "B"),
        ("I'd go with (C).", "C"),
        ("Answer: option D", "D"),
        ("I would choose b.", "B"),
        ("Option C is correct.", "C"),
        ("(B) is the correct answer", "B"),
        ("B is incorrect. C is correct.", "C"),
        ("A is not correct; the answer is therefore D", "D"),
        ("We went with (h).", "H"),
        ("a good answer", None),
        ("A good answer needs thought.", None),
        ("I'd go with a different approach", None),
        ("I went with a hunch", None),
        ("It is correct that we consider a few options.", None),
        ("Statement II is correct", None),
    ],
)
def test_choice_in_prose(response: str, expected: str | None) -> None:
    g = ChoiceGrader()
    assert g.extract(response) == expected
    assert g.well_formed(response) is (expected is not None)


@given(st.sampled_from("ABCDEFGHIJ"), st.sampled_from(STATEMENTS), filler, filler)
def test_a_choice_stated_in_prose_is_read_whatever_surrounds_it(letter: str, statement: str,
                                                                 before: list[str], after: list[str]) -> None:
    text = prose(before) + statement.format(L=letter, l=letter.lower()) + " " + prose(after)
    g = ChoiceGrader()
    assert g.extract(text) == letter, text
    assert g.grade(text, letter).correct is True


@given(filler)
def test_the_article_a_is_never_a_choice(parts: list[str]) -> None:
    text = prose(parts)
    assert ChoiceGrader().extract(text) is None, text
