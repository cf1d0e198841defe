"""Built-in arithmetic word problems at five difficulty levels, with exact answers.

A level-L problem starts from a quantity and applies exactly L operations
(+, −, ×, ÷), each stated in one sentence of a small story; every
intermediate result is a positive integer (divisions are exact). The answer is
computed here, from the operation chain, never by a model.

The stories are this project's own: ten themes (shopping, baking, travel,
savings, classroom, farm, library, garden, aquarium, sports cards), each with
several wordings per operation and per question, so prompts differ in wording,
not just in numbers. Every level draws from all themes.

``generate_problems(n, levels=(1, 2, 3, 4, 5), seed=0) -> list[Item]``:
item ``i`` has level ``levels[i % len(levels)]`` (so any prefix covers all
levels), key ``arith:{seed}:{i}``, grader ``gsm8k``, prompt
``GSM8K_PROMPT.format(question=...)`` and meta::

    {"level": L, "theme": str, "unit": str, "question": str, "start": int,
     "steps": [{"op": "+" | "-" | "*" | "/", "operand": int}, ...]}   # len(steps) == L

Item ``i`` depends only on (seed, i, its level), so ``generate_problems(m)``
is a prefix of ``generate_problems(n)`` for m <= n. Numbers stay small at
levels 1–2 (results up to 100, factors up to 4) so a 0.5B model has a chance.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from dreamroute.errors import WorkloadError
from dreamroute.eval.items import GSM8K_PROMPT, Item

__all__ = ["generate_problems", "apply_step", "THEMES"]

_PEOPLE = [
    ("Maya", "she", "her"), ("Leo", "he", "his"), ("Priya", "she", "her"), ("Omar", "he", "his"),
    ("Hana", "she", "her"), ("Tomas", "he", "his"), ("Zoe", "she", "her"), ("Kofi", "he", "his"),
    ("Ines", "she", "her"), ("Ravi", "he", "his"), ("Lena", "she", "her"), ("Sam", "he", "his"),
]


@dataclass(frozen=True)
class Theme:
    """One story: a unit and wordings; fields {name} {he} {his} {n} {unit} are filled in."""

    name: str
    unit: str
    start: tuple[str, ...]
    add: tuple[str, ...]
    sub: tuple[str, ...]
    mul: tuple[str, ...]
    div: tuple[str, ...]
    question: tuple[str, ...]


_Q = ("How many {unit} does {name} have now?", "How many {unit} does {name} have at the end?")

THEMES: tuple[Theme, ...] = (
    Theme("shopping", "cans of soup",
          ("{name} has {n} cans of soup in the pantry.", "{name} counts {n} cans of soup on the kitchen shelf."),
          ("At the store {he} buys {n} more cans of soup.", "A weekend sale lets {name} pick up {n} more cans."),
          ("{name} donates {n} cans to the food bank.", "{He} uses {n} cans to make dinner for the week."),
          ("After a bulk order arrives, {name} has {n} times as many cans as before.",
           "{name} restocks until the pantry holds {n} times as many cans as before."),
          ("{name} packs the cans equally into {n} bags and keeps only one bag.",
           "{He} splits the cans equally among {n} households, {his} own included, and keeps one share."),
          _Q + ("How many cans of soup does {name} end up with?",)),
    Theme("baking", "cookies",
          ("{name} bakes {n} cookies on Saturday morning.", "There are {n} cookies cooling on {name}'s tray."),
          ("{He} bakes another {n} cookies.", "{name}'s grandmother brings over {n} more cookies."),
          ("{name} eats {n} of the cookies.", "{He} gives {n} cookies to the neighbours."),
          ("After more batches come out of the oven, {name} has {n} times as many cookies as before.",
           "{name} keeps baking until {he} has {n} times as many cookies as before."),
          ("{name} divides the cookies equally into {n} tins and keeps just one tin.",
           "{He} shares the cookies equally among {n} friends, {himself} included, and keeps one share."),
          _Q + ("How many cookies are in {name}'s hands at the end?",)),
    Theme("travel", "granola bars",
          ("{name} packs {n} granola bars for a road trip.", "Before the trip, {name} puts {n} granola bars in the car."),
          ("At a gas station {he} buys {n} more granola bars.", "A friend hands {name} {n} extra granola bars."),
          ("On the first day {he} eats {n} granola bars.", "{name} gives {n} granola bars to hikers at a rest stop."),
          ("A cousin joins with snacks, and now {name} has {n} times as many granola bars as before.",
           "After a stop at a warehouse store, {name} has {n} times as many granola bars as before."),
          ("{name} splits the granola bars equally into {n} backpacks and keeps only one backpack.",
           "{He} shares the bars equally among {n} travellers, {himself} included, and keeps one share."),
          _Q),
    Theme("savings", "dollars",
          ("{name} has {n} dollars in a piggy bank.", "{name} has saved {n} dollars so far."),
          ("{He} earns {n} more dollars walking dogs.", "For {his} birthday {name} gets {n} more dollars."),
          ("{name} spends {n} dollars on a book.", "{He} pays {n} dollars for a movie ticket."),
          ("A generous aunt matches the savings so that {name} has {n} times as many dollars as before.",
           "After a year of interest and gifts, {name} has {n} times as many dollars as before."),
          ("{name} splits {his} money equally into {n} envelopes and keeps only one envelope.",
           "{He} divides the money equally among {n} jars and takes one jar to the fair."),
          ("How many dollars does {name} have now?", "How much money, in dollars, does {name} have at the end?")),
    Theme("classroom", "pencils",
          ("{name} has {n} pencils in the classroom supply box.", "The supply box in {name}'s classroom holds {n} pencils."),
          ("The school office sends {n} more pencils.", "{name} buys {n} more pencils for the class."),
          ("Students borrow {n} pencils and never return them.", "{name} throws away {n} broken pencils."),
          ("After a donation drive, {name} has {n} times as many pencils as before.",
           "A parent's gift leaves {name} with {n} times as many pencils as before."),
          ("{name} shares the pencils equally among {n} tables and keeps the share of one table.",
           "{He} sorts the pencils equally into {n} cups and keeps only one cup on {his} desk."),
          _Q),
    Theme("farm", "eggs",
          ("{name}'s hens lay {n} eggs on Monday.", "{name} collects {n} eggs from the barn."),
          ("{He} collects {n} more eggs in the afternoon.", "A neighbour gives {name} {n} more eggs."),
          ("{name} uses {n} eggs to bake a cake.", "{n} of the eggs break on the way to the house."),
          ("By the end of the week, {name} has {n} times as many eggs as before.",
           "After a good laying season, {name} has {n} times as many eggs as before."),
          ("{name} packs the eggs equally into {n} cartons and keeps only one carton.",
           "{He} sells the eggs in {n} equal batches and keeps one batch."),
          _Q + ("How many eggs does {name} end up with?",)),
    Theme("library", "books",
          ("{name} has {n} books on a shelf.", "{name}'s book club owns {n} books."),
          ("{He} borrows {n} more books from the library.", "{name} receives {n} books as gifts."),
          ("{name} gives away {n} books.", "{He} returns {n} books to the library."),
          ("After a huge book fair, {name} has {n} times as many books as before.",
           "Inheriting a collection leaves {name} with {n} times as many books as before."),
          ("{name} splits the books equally into {n} boxes and keeps only one box.",
           "{He} shares the books equally among {n} cousins, {himself} included, and keeps one share."),
          _Q),
    Theme("garden", "seedlings",
          ("{name} grows {n} seedlings in trays.", "There are {n} seedlings in {name}'s greenhouse."),
          ("{He} plants {n} more seedlings.", "A friend brings {name} {n} more seedlings."),
          ("Rabbits eat {n} of {name}'s seedlings.", "{name} gives {n} seedlings to a neighbour."),
          ("After sowing more seeds, {name} has {n} times as many seedlings as before.",
           "A good spring leaves {name} with {n} times as many seedlings as before."),
          ("{name} splits the seedlings equally among {n} garden beds and keeps the seedlings of one bed.",
           "{He} divides the seedlings equally into {n} pots and keeps only one pot."),
          _Q),
    Theme("aquarium", "fish",
          ("{name} has {n} fish in an aquarium.", "{name}'s tank holds {n} fish."),
          ("{He} buys {n} more fish.", "{name} is given {n} more fish by a friend."),
          ("{name} gives {n} fish to a classmate.", "{He} moves {n} fish to a pond outside."),
          ("After the fish breed, {name} has {n} times as many fish as before.",
           "A busy spring leaves {name} with {n} times as many fish as before."),
          ("{name} splits the fish equally into {n} tanks and keeps only one tank.",
           "{He} shares the fish equally among {n} friends, {himself} included, and keeps one share."),
          _Q),
    Theme("sports cards", "trading cards",
          ("{name} has {n} trading cards.", "{name}'s album holds {n} trading cards."),
          ("{He} buys a pack with {n} more cards.", "{name} wins {n} more cards in a game."),
          ("{name} trades away {n} cards.", "{He} loses {n} cards at the park."),
          ("After a big swap meet, {name} has {n} times as many cards as before.",
           "Opening a birthday box leaves {name} with {n} times as many cards as before."),
          ("{name} splits the cards equally into {n} piles and keeps only one pile.",
           "{He} shares the cards equally among {n} friends, {himself} included, and keeps one share."),
          ("How many trading cards does {name} have now?", "How many cards does {name} have at the end?")),
)

# Per-level number ranges: start value, added / subtracted amounts, multipliers,
# divisors, and the largest intermediate result.
_RANGES = {
    1: dict(start=(3, 20), add=(2, 15), mul=(2, 4), div=(2, 5), cap=100),
    2: dict(start=(3, 20), add=(2, 15), mul=(2, 4), div=(2, 5), cap=100),
    3: dict(start=(4, 30), add=(2, 25), mul=(2, 5), div=(2, 6), cap=200),
    4: dict(start=(5, 40), add=(2, 30), mul=(2, 5), div=(2, 6), cap=300),
    5: dict(start=(5, 40), add=(2, 30), mul=(2, 5), div=(2, 6), cap=300),
}


def apply_step(value: int, op: str, operand: int) -> int:
    """One step of a chain: value op operand. Raises ValueError on an inexact division or unknown op."""
    if op == "+":
        return value + operand
    if op == "-":
        return value - operand
    if op == "*":
        return value * operand
    if op == "/":
        if operand == 0 or value % operand:
            raise ValueError(f"{value} / {operand} is not an exact integer division")
        return value // operand
    raise ValueError(f"unknown operation {op!r}")


def _options(value: int, rng: random.Random, r: dict) -> dict[str, int]:
    """The feasible operations at ``value`` with a chosen operand each (results stay in 1..cap)."""
    opts: dict[str, int] = {}
    lo, hi = r["add"]
    if value + lo <= r["cap"]:
        opts["+"] = rng.randint(lo, min(hi, r["cap"] - value))
    if value >= 3:  # take at least 2 ("gives 1 cookies" reads badly) and leave at least 1
        opts["-"] = rng.randint(2, min(hi, value - 1))
    mlo, mhi = r["mul"]
    factors = [k for k in range(mlo, mhi + 1) if value * k <= r["cap"]]
    if factors:
        opts["*"] = rng.choice(factors)
    divisors = [k for k in range(r["div"][0], r["div"][1] + 1) if value % k == 0]
    if divisors:
        opts["/"] = rng.choice(divisors)
    return opts


_WORDING = {"+": "add", "-": "sub", "*": "mul", "/": "div"}
# Plain wordings every theme also has, so a long chain need not repeat a sentence.
_GENERIC = {
    "+": ("Then {name} gets {n} more {unit}.",),
    "-": ("Later {name} loses {n} {unit}.",),
    "*": ("Then the number of {unit} {name} has becomes {n} times as large.",),
    "/": ("{name} splits the {unit} into {n} equal groups and keeps only one group.",),
}


def _fill(template: str, person: tuple[str, str, str], n: int | None, unit: str) -> str:
    name, he, his = person
    text = template.format(
        name=name, he=he, his=his, He=he.capitalize(), His=his.capitalize(),
        himself="himself" if he == "he" else "herself", n=n, unit=unit,
    )
    return text[0].upper() + text[1:]


def _problem(seed: int, i: int, level: int) -> Item:
    """Item ``i`` of seed ``seed`` at ``level``; depends on nothing else."""
    rng = random.Random(f"dreamroute-arith:{seed}:{i}:{level}")
    r = _RANGES[level]
    theme = rng.choice(THEMES)
    person = rng.choice(_PEOPLE)
    start = rng.randint(*r["start"])
    value, steps, sentences = start, [], [_fill(rng.choice(theme.start), person, start, theme.unit)]
    used: dict[str, list[str]] = {}
    for _ in range(level):
        opts = _options(value, rng, r)
        op = rng.choice(sorted(opts))
        operand = opts[op]
        value = apply_step(value, op, operand)
        steps.append({"op": op, "operand": operand})
        pool = getattr(theme, _WORDING[op]) + _GENERIC[op]
        fresh = [t for t in pool if t not in used.get(op, [])] or list(pool)
        template = rng.choice(fresh)
        used.setdefault(op, []).append(template)
        sentences.append(_fill(template, person, operand, theme.unit))
    sentences.append(_fill(rng.choice(theme.question), person, None, theme.unit))
    question = " ".join(sentences)
    return Item(
        key=f"arith:{seed}:{i}",
        prompt=GSM8K_PROMPT.format(question=question),
        answer=str(value),
        grader="gsm8k",
        meta={"level": level, "theme": theme.name, "unit": theme.unit, "question": question,
              "start": start, "steps": steps},
    )


def generate_problems(n: int, *, levels: tuple[int, ...] | list[int] = (1, 2, 3, 4, 5),
                      seed: int = 0) -> list[Item]:
    """``n`` arithmetic word problems, levels interleaved, deterministic per ``seed``.

    Raises:
        WorkloadError: n < 0, no levels, or a level outside 1..5.
    """
    levels = tuple(levels)
    if not isinstance(n, int) or n < 0:
        raise WorkloadError(f"number of generated problems must be a whole number >= 0, got {n!r}.")
    if not levels or any(not isinstance(lv, int) or lv not in _RANGES for lv in levels):
        raise WorkloadError(f"levels must be a non-empty list of integers 1..5, got {list(levels)!r}.")
    return [_problem(seed, i, levels[i % len(levels)]) for i in range(n)]
