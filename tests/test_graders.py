"""Graders: awkward answers, protocol, registry, and agreement with the recorded outcomes."""

from __future__ import annotations

import json
from fractions import Fraction
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dreamroute.errors import ConfigError
from dreamroute.grading import (ChoiceGrader, ExactGrader, Grade, Grader, NumberGrader, format_number, get_grader, grader_names, normalize_text, parse_number)

OUTCOMES = Path("/work/shared/data/local_tiers/gsm8k_test_outcomes.jsonl")


@pytest.fixture
def num() -> NumberGrader:
    return NumberGrader()


@pytest.mark.parametrize(
    "response, expected",
    [
        ("The answer is 18.", "18"),
        ("So she makes $18 a day. The answer is $18.", "18"),
        ("The answer is $1,234.50.", "1234.5"),
        ("The total is 1,234.50", "1234.5"),
        ("She makes 18 dollars.", "18"),
        ("The answer is 18 dollars per day.", "18"),
        ("The answer is 18%.", "18"),
        ("The answer is -3", "-3"),
        ("answer is -3.", "-3"),
        ("The answer is \u22123.", "-3"),
        ("Temperature drops to -12 degrees.", "-12"),
        ("#### 72", "72"),
        ("Work...\n#### 1,080", "1080"),
        ("Therefore \\(\\boxed{5}\\).", "5"),
        ("\\[ \\boxed{1,430} \\]", "1430"),
        ("The answer is \\(\\boxed{\\$26}\\).", "26"),
        ("The answer is 18.0", "18"),
        ("The answer is 3/4.", "0.75"),
        ("The answer is \\(\\frac{3}{4}\\)", "0.75"),
        ("The answer is \\boxed{\\dfrac{1}{3}}", "1/3"),
        ("The answer is 0.5", "0.5"),
        ("The answer is .5", "0.5"),
        ("The answer is: **42**", "42"),
        ("Answer: 7", "7"),
        ("**Final answer:** 9 apples", "9"),
        # the last "answer is" wins over an earlier one and over later stray numbers
        ("I first thought the answer is 12, but rechecking, the answer is 15. Check: 3 * 5 = 15 and 2 + 2", "15"),
        ("The answer is 10. Later the answer is 20.", "20"),
        ("Thus, the answer is:\n\\[ \\boxed{50} \\]", "50"),
        # a placeholder answer falls back to the last number
        ("2 + 3 = 5 years old.\n\nThe answer is N.", "5"),
        # "answer:" mid-sentence is not a label
        ("we add it to the answer: 2 + 3 = 5", "5"),
        # a minus between numbers is subtraction, not a sign
        ("We have 20-5", "5"),
        ("Then 10 - 3", "3"),
        ("No digits here at all.", None),
        ("", None),
    ],
)
def test_number_extract(num: NumberGrader, response: str, expected: str | None) -> None:
    assert num.extract(response) == expected


@pytest.mark.parametrize(
    "response, wf",
    [
        ("The answer is 18.", True),
        ("#### 18", True),
        ("\\boxed{18}", True),
        ("Answer: 18", True),
        ("She makes 18 dollars.", False),
        ("The answer is N.", False),
        ("nothing", False),
    ],
)
def test_number_well_formed(num: NumberGrader, response: str, wf: bool) -> None:
    assert num.well_formed(response) is wf


def test_number_grade(num: NumberGrader) -> None:
    assert num.grade("The answer is 18.", "18") == Grade(True, "18", "18")
    assert num.grade("The answer is $1,234.50", "1234.5").correct is True
    assert num.grade("The answer is 18.0", "18").correct is True
    assert num.grade("The answer is 3/4", "0.75").correct is True
    assert num.grade("The answer is 18", "#### 18").correct is True
    assert num.grade("The answer is 2125", "She pays...\n#### 2,125").correct is True
    assert num.grade("The answer is 17", "18").correct is False
    assert num.grade("The answer is 18.0000001", "18").correct is True  # tiny tolerance
    assert num.grade("The answer is 18.01", "18").correct is False
    nothing = num.grade("I don't know.", "18")
    assert nothing == Grade(correct=False, predicted=None, gold="18")
    assert num.grade("The answer is 18.", None) == Grade(correct=None, predicted="18", gold=None)
    assert num.grade("no number", None) == Grade(correct=None, predicted=None, gold=None)


def test_number_non_numeric_gold_compares_text(num: NumberGrader) -> None:
    assert num.grade("The answer is 5", "five").correct is False


def test_format_and_parse_number() -> None:
    assert format_number(Fraction(18)) == "18"
    assert format_number(Fraction(-3)) == "-3"
    assert format_number(Fraction(3, 4)) == "0.75"
    assert format_number(Fraction(1, 3)) == "1/3"
    assert parse_number("$1,234.50") == Fraction("1234.5")
    assert parse_number("3/0 and 7") == Fraction(7)
    assert parse_number("none") is None


@given(st.integers(min_value=-10**12, max_value=10**12), st.sampled_from(["", "$"]),
       st.sampled_from(["", ".", " dollars.", "%", " apples"]), st.booleans())
def test_integer_formatting_round_trip(n: int, cur: str, tail: str, commas: bool) -> None:
    body = f"{abs(n):,}" if commas else str(abs(n))
    text = f"{'-' if n < 0 else ''}{cur}{body}{tail}"
    g = NumberGrader()
    assert g.extract(f"Some work 3 + 4 = 7. The answer is {text}") == str(n)
    assert g.extract(f"#### {text}") == str(n)
    assert g.grade(f"The answer is {text}", str(n)).correct is True


@given(st.integers(min_value=0, max_value=10**7), st.integers(min_value=1, max_value=99))
def test_decimal_round_trip(whole: int, cents: int) -> None:
    text = f"{whole:,}.{cents:02d}"
    value = Fraction(whole) + Fraction(cents, 100)
    g = NumberGrader()
    assert g.extract(f"The answer is ${text}.") == format_number(value)
    assert g.grade(f"It costs {text}", str(float(value))).correct is True


@given(st.integers(min_value=1, max_value=999), st.integers(min_value=1, max_value=999))
def test_fraction_equals_its_decimal(a: int, b: int) -> None:
    g = NumberGrader()
    value = g.extract_value(f"The answer is {a}/{b}")
    assert value == Fraction(a, b)
    assert g.grade(f"The answer is {a}/{b}", repr(a / b)).correct is True


# --------------------------------------------------------------------------- choices


@pytest.mark.parametrize(
    "response, expected",
    [
        ("The answer is (B)", "B"),
        ("The answer is (b).", "B"),
        ("B) Paris", "B"),
        ("Answer: b", "B"),
        ("answer: c.", "C"),
        ("Looking at all options, **C** fits best.", "C"),
        ("After checking, the correct option is D.", "D"),
        ("The correct answer is J", "J"),
        ("E", "E"),
        ("(A) is wrong. The answer is C.", "C"),
        ("Option (A) looks good but the final answer: (G)", "G"),
        ("The answer is a bit unclear.", None),
        ("I cannot decide.", None),
    ],
)
def test_choice_extract(response: str, expected: str | None) -> None:
    assert ChoiceGrader().extract(response) == expected


def test_choice_grade_and_well_formed() -> None:
    g = ChoiceGrader()
    assert g.grade("The answer is (B)", "B") == Grade(True, "B", "B")
    assert g.grade("The answer is (B)", "b").correct is True
    assert g.grade("The answer is (B)", "(C)").correct is False
    assert g.grade("no idea", "A") == Grade(False, None, "A")
    assert g.grade("The answer is A", None).correct is None
    assert g.well_formed("The answer is (B)") and g.well_formed("Answer: b")
    assert not g.well_formed("**C**") and not g.well_formed("nothing")


# --------------------------------------------------------------------------- exact


def test_exact() -> None:
    g = ExactGrader()
    assert normalize_text('  "Paris."  ') == "paris"
    assert normalize_text("New\n  York   City") == "new york city"
    assert g.extract("Paris.") == "paris"
    assert g.extract("Let me think.\nThe answer is \u201cParis\u201d.") == "paris"
    assert g.extract("**Answer:** New   York") == "new york"
    assert g.extract("   ") is None
    assert g.grade("The answer is Paris.", "paris") == Grade(True, "paris", "paris")
    assert g.grade("London", "Paris").correct is False
    assert g.grade("London", None).correct is None
    assert g.well_formed("The answer is Paris.") and not g.well_formed("Paris")


# --------------------------------------------------------------------------- registry


def test_get_grader() -> None:
    assert isinstance(get_grader("gsm8k"), NumberGrader)
    assert isinstance(get_grader("Number"), NumberGrader)
    assert isinstance(get_grader("mc"), ChoiceGrader)
    assert isinstance(get_grader("choice"), ChoiceGrader)
    assert isinstance(get_grader("exact"), ExactGrader)
    for name in grader_names():
        assert isinstance(get_grader(name), Grader)
    with pytest.raises(ConfigError) as err:
        get_grader("rouge")
    assert "rouge" in str(err.value) and "gsm8k" in str(err.value) and "exact" in str(err.value)


@pytest.mark.skipif(not OUTCOMES.is_file(), reason="recorded local-tier outcomes not present")
def test_agrees_with_recorded_outcomes() -> None:
    """The recorded `correct` field used the same rule; we agree on (nearly) every line."""
    g = get_grader("gsm8k")
    rows = [json.loads(line) for line in OUTCOMES.read_text(encoding="utf-8").splitlines() if line]
    agree = sum(g.grade(r["response"], r["gold"]).correct == r["correct"] for r in rows)
    assert len(rows) == 600
    assert agree / len(rows) >= 0.99
