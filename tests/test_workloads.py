"""Workloads: GSM8K and generic JSONL files, malformed lines, digests, generated problems."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dreamroute.errors import WorkloadError
from dreamroute.eval.generated import THEMES, generate_problems
from dreamroute.grading import get_grader
from dreamroute.eval.workloads import (
    GSM8K_PROMPT,
    Item,
    iter_items,
    load_workload,
    workload_digest,
)

GSM8K_TEST = Path("/work/shared/data/gsm8k/test.jsonl")


def write_jsonl(path: Path, records: list) -> Path:
    lines = [r if isinstance(r, str) else json.dumps(r) for r in records]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_prompt_template_matches_recorded_readme() -> None:
    assert GSM8K_PROMPT == "{question}\nSolve step by step, then end with: The answer is N."


@pytest.mark.skipif(not GSM8K_TEST.is_file(), reason="GSM8K test set not present")
def test_gsm8k_file() -> None:
    wl = load_workload(GSM8K_TEST, limit=5)
    assert len(wl.items) == 5 and wl.name == "test.jsonl"
    first = json.loads(GSM8K_TEST.read_text(encoding="utf-8").splitlines()[0])
    item = wl.items[0]
    assert item.key == "gsm8k:0" and item.grader == "gsm8k" and item.meta == {"index": 0}
    assert item.prompt == first["question"] + "\nSolve step by step, then end with: The answer is N."
    assert item.answer == "18"
    assert [it.key for it in wl.items] == [f"gsm8k:{i}" for i in range(5)]
    assert re.fullmatch(r"[0-9a-f]{64}", wl.digest)
    assert load_workload(GSM8K_TEST, limit=5).digest == wl.digest


def test_gsm8k_answer_with_commas(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "g.jsonl", [
        {"question": "How much?", "answer": "It is 2,000 + 125 = 2,125\n#### 2,125"},
        "",
        {"question": "How cold?", "answer": "#### -4"},
    ])
    items = load_workload(path).items
    assert [(it.key, it.answer) for it in items] == [("gsm8k:0", "2125"), ("gsm8k:2", "-4")]


def test_generic_jsonl(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "mix.jsonl", [
        {"prompt": "Capital of France?", "answer": "Paris", "id": "geo-1", "topic": "geo"},
        {"prompt": "2+2?", "answer": 4, "grader": "number"},
        "   ",
        {"prompt": "Pick one: (A) x (B) y", "answer": "B", "grader": "MC"},
        {"prompt": "Tell me a joke."},
    ])
    wl = load_workload(path)
    keys = [it.key for it in wl.items]
    assert keys == ["geo-1", "mix:1", "mix:3", "mix:4"]
    assert wl.items[0] == Item("geo-1", "Capital of France?", "Paris", "exact", {"topic": "geo", "index": 0})
    assert wl.items[1].answer == "4" and wl.items[1].grader == "number"
    assert wl.items[2].grader == "mc"
    assert wl.items[3].answer is None and wl.items[3].grader == "exact"
    assert load_workload(path, limit=2).items == wl.items[:2]
    for it in wl.items:  # every grader named by the file is usable
        get_grader(it.grader)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(WorkloadError, match="does not exist"):
        load_workload(tmp_path / "nope.jsonl")


@pytest.mark.parametrize(
    "bad, needle",
    [
        ("{not json", "not valid JSON"),
        ('["a list"]', "expected a JSON object"),
        ('{"answer": "x"}', "missing field 'prompt'"),
        ('{"prompt": 3}', "'prompt' must be a non-empty string"),
        ('{"prompt": "p", "answer": [1]}', "'answer' must be a string or number"),
        ('{"prompt": "p", "grader": "rouge"}', "unknown grader"),
        ('{"prompt": "p", "id": "a"}', "already used on line 1"),
    ],
)
def test_malformed_line_names_file_and_line(tmp_path: Path, bad: str, needle: str) -> None:
    path = write_jsonl(tmp_path / "w.jsonl", [
        {"prompt": "one", "id": "a"}, {"prompt": "two"}, "", bad, {"prompt": "after"},
    ])
    with pytest.raises(WorkloadError) as err:
        load_workload(path)
    msg = str(err.value)
    assert f"{path}:4:" in msg and needle in msg
    # iter_items yields everything before the bad line, then raises
    seen: list[str] = []
    with pytest.raises(WorkloadError):
        for item in iter_items(path):
            seen.append(item.key)
    assert seen == ["a", "w:1"]


def test_gsm8k_file_with_a_bad_later_record(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "g.jsonl", [
        {"question": "Q?", "answer": "#### 1"},
        {"question": "Q2?", "answer": "no marker"},
    ])
    with pytest.raises(WorkloadError, match=r"g\.jsonl:2: .*'####'"):
        load_workload(path)


def test_bad_limit_and_builtin_specs() -> None:
    with pytest.raises(WorkloadError):
        load_workload("builtin:arithmetic", limit=-1)
    with pytest.raises(WorkloadError, match="built-ins"):
        load_workload("builtin:poetry")
    with pytest.raises(WorkloadError, match="levels"):
        load_workload("builtin:arithmetic?levels=0-9")
    with pytest.raises(WorkloadError, match="unknown option"):
        load_workload("builtin:arithmetic?size=3")
    with pytest.raises(WorkloadError):
        load_workload("builtin:arithmetic?n=many")


def test_digest_stable_and_sensitive(tmp_path: Path) -> None:
    records = [{"prompt": "a", "answer": "1"}, {"prompt": "b", "answer": "2"}]
    path = write_jsonl(tmp_path / "d.jsonl", records)
    d1 = load_workload(path).digest
    assert load_workload(path).digest == d1
    assert load_workload(path, limit=1).digest != d1
    for change in ({"answer": "3"}, {"prompt": "c"}, {"grader": "number"}, {"id": "x"}):
        write_jsonl(path, [records[0], {**records[1], **change}])
        assert load_workload(path).digest != d1, change
    write_jsonl(path, [records[0], {**records[1], "extra": "meta only"}])
    assert load_workload(path).digest == d1  # meta is not part of the digest
    items = load_workload(path).items
    assert workload_digest(items) == d1


# --------------------------------------------------------------------------- generated


def recompute(item: Item) -> int:
    """Re-derive the answer from the generator's structured meta, independently of it."""
    value = item.meta["start"]
    for step in item.meta["steps"]:
        op, k = step["op"], step["operand"]
        assert isinstance(k, int) and k >= 1
        if op == "+":
            value += k
        elif op == "-":
            value -= k
        elif op == "*":
            value *= k
        elif op == "/":
            assert value % k == 0, "division must be exact"
            value //= k
        else:
            raise AssertionError(op)
        assert value >= 1
    return value


def test_generated_answers_are_exact() -> None:
    items = generate_problems(400, seed=7)
    for item in items:
        level = item.meta["level"]
        assert len(item.meta["steps"]) == level
        assert item.answer == str(recompute(item))
        assert item.grader == "gsm8k"
        assert item.prompt == GSM8K_PROMPT.format(question=item.meta["question"])
        numbers = [int(x) for x in re.findall(r"\d+", item.meta["question"])]
        assert numbers == [item.meta["start"]] + [s["operand"] for s in item.meta["steps"]]
        if level <= 2:
            assert int(item.answer) <= 100
    assert {s["op"] for it in items for s in it.meta["steps"]} == {"+", "-", "*", "/"}
    assert len({it.prompt for it in items}) == len(items)


def test_generated_levels_interleaved_and_keys() -> None:
    items = generate_problems(12, seed=3)
    assert [it.meta["level"] for it in items] == [1, 2, 3, 4, 5, 1, 2, 3, 4, 5, 1, 2]
    assert [it.key for it in items] == [f"arith:3:{i}" for i in range(12)]
    assert {it.meta["level"] for it in generate_problems(5)} == {1, 2, 3, 4, 5}
    odd = generate_problems(6, levels=(1, 3))
    assert [it.meta["level"] for it in odd] == [1, 3, 1, 3, 1, 3]


def test_generated_wording_varies_per_level() -> None:
    items = generate_problems(500, seed=0)
    assert len(THEMES) >= 8
    for level in range(1, 6):
        themes = {it.meta["theme"] for it in items if it.meta["level"] == level}
        assert len(themes) >= 8, (level, themes)
        openings = {it.meta["question"].split(".")[0].split()[-1] for it in items if it.meta["level"] == level}
        assert len(openings) >= 8


@settings(max_examples=20, deadline=None)
@given(st.integers(min_value=0, max_value=10**6), st.integers(min_value=1, max_value=30))
def test_generated_deterministic_and_prefix_stable(seed: int, n: int) -> None:
    a = generate_problems(n, seed=seed)
    assert a == generate_problems(n, seed=seed)
    assert a[: n // 2] == generate_problems(n // 2, seed=seed)
    for item in a:
        assert item.answer == str(recompute(item))


def test_generated_seed_changes_problems() -> None:
    assert [it.prompt for it in generate_problems(10, seed=0)] != [it.prompt for it in generate_problems(10, seed=1)]


def test_builtin_spec() -> None:
    wl = load_workload("builtin:arithmetic?n=50&levels=1-5", seed=2)
    assert len(wl.items) == 50 and wl.name == "builtin:arithmetic?n=50&levels=1-5"
    assert wl.items == generate_problems(50, seed=2)
    assert load_workload("builtin:arithmetic?n=50&levels=1-5", seed=2).digest == wl.digest
    assert load_workload("builtin:arithmetic?n=50&levels=1-5", seed=3).digest != wl.digest
    assert load_workload("builtin:arithmetic?n=50&seed=3", seed=2).items == generate_problems(50, seed=3)
    assert len(load_workload("builtin:arithmetic").items) == 100
    assert len(load_workload("builtin:arithmetic?n=50", limit=7).items) == 7
    two = load_workload("builtin:arithmetic?n=6&levels=2")
    assert {it.meta["level"] for it in two.items} == {2}
    mixed = load_workload("builtin:arithmetic?n=6&levels=1,4")
    assert [it.meta["level"] for it in mixed.items] == [1, 4, 1, 4, 1, 4]


def test_generated_problems_are_gradeable() -> None:
    g = get_grader("gsm8k")
    for item in generate_problems(10):
        assert g.grade(f"Work...\nThe answer is {item.answer}.", item.answer).correct is True
