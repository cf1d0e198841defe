"""A workload byte that is not UTF-8: file, line, column and a hint, no traceback, the items before it kept."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from dreamroute.errors import WorkloadError
from dreamroute.eval.workloads import iter_items, load_workload
from dreamroute.store.store import Store

from .conftest import scripted_backends, scripted_settings

# Bytes that can never start a UTF-8 character here (a lone continuation byte, an
# overlong or out-of-range lead byte, or a lead byte without its continuation).
BAD_BYTES = [0x80, 0xA9, 0xBF, 0xC0, 0xC1, 0xC3, 0xE9, 0xF0, 0xF5, 0xFF]
PROMPTS = ["What is 2 + 3?", "Café au lait costs 4 €; what do 2 cost?", "Ünïcödé: 7 × 6 = ?", "Plain 10 - 4?",
           "日本語 1 + 1?"]


def records(n: int) -> list[str]:
    return [json.dumps({"prompt": PROMPTS[i % len(PROMPTS)] + f" #{i}", "answer": str(i), "grader": "gsm8k"},
                       ensure_ascii=False) for i in range(n)]


def corrupt(path: Path, lines: list[str], k: int, at: int, bad: int) -> int:
    """Write ``lines`` with ``bad`` inserted before character ``at`` of line ``k``; its 1-based column."""
    out = []
    for i, line in enumerate(lines):
        data = line.encode("utf-8")
        if i == k:
            cut = len(line[:at].encode("utf-8"))
            data = data[:cut] + bytes([bad]) + data[cut:]
        out.append(data)
    path.write_bytes(b"\n".join(out) + b"\n")
    return at + 1


@settings(max_examples=60, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.integers(2, 6), st.data(), st.sampled_from(BAD_BYTES))
def test_a_bad_byte_anywhere_names_line_and_column_after_the_items_before_it(tmp_path, n, data, bad):
    lines = records(n)
    k = data.draw(st.integers(0, n - 1), label="line")
    at = data.draw(st.integers(0, len(lines[k])), label="column")
    path = tmp_path / "w.jsonl"
    column = corrupt(path, lines, k, at, bad)
    seen: list[str] = []
    with pytest.raises(WorkloadError) as err:
        for item in iter_items(path):
            seen.append(item.key)
    msg = str(err.value)
    assert seen == [f"w:{i}" for i in range(k)]  # every item before the bad line was yielded
    assert msg.startswith(f"{path}:{k + 1}: column {column}: byte 0x{bad:02x} is not UTF-8"), msg
    assert "save the file as UTF-8" in msg
    with pytest.raises(WorkloadError, match=f":{k + 1}: column {column}:"):
        load_workload(path)


def test_line_ends_and_a_byte_order_mark_read_as_in_text_mode(tmp_path):
    path = tmp_path / "w.jsonl"
    a, b, c = (json.dumps({"prompt": p}) for p in ("one", "two", "three"))
    path.write_bytes(b"\xef\xbb\xbf" + f"{a}\r\n\r\n{b}\r{c}".encode())
    items = load_workload(path).items
    assert [it.prompt for it in items] == ["one", "two", "three"]
    assert [it.meta["index"] for it in items] == [0, 2, 3]  # line numbers as text mode counts them


def test_run_stops_cleanly_on_a_bad_byte_and_keeps_the_answers_before_it(tmp_path, monkeypatch):
    import dreamroute.api
    import dreamroute.cli.run
    from dreamroute.cli import app

    lines = records(4)
    answers = {json.loads(line)["prompt"]: (json.loads(line)["answer"], 1) for line in lines}
    backends = scripted_backends(answers)
    monkeypatch.setattr(dreamroute.cli.run, "settings_for", lambda config, db: scripted_settings(tmp_path))
    monkeypatch.setattr(dreamroute.api, "make_backend", lambda tier, settings, seed=0: backends[tier.name])
    wl, db, out = tmp_path / "w.jsonl", tmp_path / "s.db", tmp_path / "r.json"
    column = corrupt(wl, lines, 2, 5, 0xE9)
    r = CliRunner().invoke(app, ["run", str(wl), "--db", str(db), "--json", str(out), "--policy", "always:tactical"])
    text = " ".join(r.output.split())
    assert r.exit_code == 2, r.output
    assert f"w.jsonl:3: column {column}: byte 0xe9 is not UTF-8" in text
    assert "save the file as UTF-8" in text and "2 items before it were answered and stored" in text
    assert "Traceback" not in r.output and isinstance(r.exception, SystemExit)  # typer's exit, nothing raised
    assert json.loads(out.read_text())["graded"] == 2
    with Store(db) as s:
        rows = [x for x in s.experiences(["item_key", "role", "tier", "outcome"]) if x["role"] == "chosen"]
    assert [x["item_key"] for x in rows] == ["w:0", "w:1"]
    assert all(x["tier"] == "tactical" and x["outcome"] == "success" for x in rows)
    # a bad first line: nothing to answer, the same clean error
    corrupt(wl, lines, 0, 0, 0xFF)
    r = CliRunner().invoke(app, ["run", str(wl), "--db", str(tmp_path / "s2.db")])
    assert r.exit_code == 2 and "w.jsonl:1: column 1: byte 0xff is not UTF-8" in " ".join(r.output.split())
    assert "Traceback" not in r.output


@pytest.mark.parametrize("kind", ["outcomes", "csv"])
@pytest.mark.parametrize("line", [1, 2, 3])
def test_recorded_source_with_a_bad_byte_names_file_line_and_column(tmp_path, kind, line):
    """simulate's recorded sources (outcome JSONL, RouteLLM CSV) stop with a WorkloadError, not a UnicodeDecodeError."""
    from dreamroute.eval.recorded import load_recorded
    if kind == "outcomes":
        rows = [json.dumps({"tier": t, "correct": True, "prompt": f"q{i}", "key": f"k{i}"}).encode()
                for i in range(2) for t in ("a", "b")]
        path = tmp_path / "rec.jsonl"
    else:
        rows = [b"prompt,weak,strong"] + [f"q{i},True,False".encode() for i in range(3)]
        path = tmp_path / "rec.csv"
    rows[line - 1] = rows[line - 1][:3] + b"\xe9" + rows[line - 1][3:]
    path.write_bytes(b"\n".join(rows) + b"\n")
    with pytest.raises(WorkloadError) as e:
        load_recorded(path)
    msg = str(e.value)
    assert f"{path}:{line}: column 4" in msg and "0xe9" in msg and "UTF-8" in msg
