"""Workloads: the prompts a benchmark sends, each with its gold answer and grader.

A workload spec is one of

- a GSM8K JSONL file (records ``{"question": str, "answer": str}`` whose answer
  ends in ``#### N``): key ``gsm8k:{i}`` (``i`` = 0-based line number in the
  file, the ``index`` of ``local_tiers/gsm8k_test_outcomes.jsonl``), prompt
  ``GSM8K_PROMPT.format(question=...)``, answer = the number after ``####``
  without thousands commas, grader ``gsm8k``;
- a generic JSONL file (records ``{"prompt": str, "answer"?: str | number |
  null, "grader"?: str, "id"?: str | int, ...}``): key = ``id`` when given,
  else ``{file stem}:{i}``; grader defaults to ``exact``; the other fields go
  to ``meta``;
- a conversation JSONL file (records ``{"id"?: str | int, "turns": [turn, ...],
  "grader"?: str}``, also MT-Bench's ``question.jsonl`` with ``question_id``):
  one item per turn, key ``{id}:t{k}`` (``k`` 0-based), ``meta`` holding
  ``conversation`` (the id) and ``turn``; a turn is a string (ungraded) or
  ``{"content": str, "answer"?: str | number | null, "grader"?: str}`` (graded
  where it has an answer; grader defaults to the record's, else ``exact``). A
  runner sends each turn with the conversation so far (earlier turns and the
  answers given to them);
- ``builtin:arithmetic`` or ``builtin:arithmetic?n=50&levels=1-5&seed=3``:
  generated arithmetic word problems (``dreamroute.eval.generated``); ``n``
  defaults to 100, ``levels`` to 1-5 (``"2"``, ``"1-3"`` or ``"1,3,5"``), and a
  ``seed`` in the spec overrides the ``seed`` argument.

Each file is detected as GSM8K, conversation or generic from its first valid record. Empty
lines are skipped. A malformed line (bad JSON, a missing field, a wrong type, a
duplicate key, a byte that is not UTF-8) raises ``WorkloadError`` naming the file,
the 1-based line number (and, for a bad byte, the 1-based column), what is wrong and
how to fix it. Files are decoded one line at a time, so a bad byte costs only its line
and what follows; a UTF-8 byte-order mark at the start is skipped.

``load_workload`` reads everything first, so a bad line anywhere means no
workload at all. ``iter_items`` yields items lazily, one line at a time: a
caller that processes items as they come has already processed (and keeps)
every item before the bad line when the error is raised.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn
from urllib.parse import parse_qsl

from dreamroute.errors import ConfigError, WorkloadError
from dreamroute.eval.generated import generate_problems
from dreamroute.eval.items import GSM8K_PROMPT, Item

__all__ = ["GSM8K_PROMPT", "Item", "Workload", "load_workload", "iter_items", "workload_digest"]

BUILTIN_PREFIX = "builtin:"
_BUILTINS = ("arithmetic",)
_DEFAULT_N = 100


@dataclass(frozen=True)
class Workload:
    """A named, digested list of items; ``digest`` is ``workload_digest(items)``."""

    name: str
    digest: str
    items: list[Item]

    def __len__(self) -> int:
        return len(self.items)

    def __iter__(self) -> Iterator[Item]:
        return iter(self.items)


def workload_digest(items: list[Item]) -> str:
    """sha256 (hex) over each item's key, prompt, answer and grader, in order (meta is not included)."""
    h = hashlib.sha256()
    for it in items:
        record = [it.key, it.prompt, it.answer, it.grader]
        h.update(json.dumps(record, ensure_ascii=False, separators=(",", ":")).encode("utf-8"))
        h.update(b"\n")
    return h.hexdigest()


def load_workload(spec: str | Path, *, limit: int | None = None, seed: int = 0) -> Workload:
    """Read a whole workload (see the module docstring for specs).

    Args:
        spec: a JSONL path or a ``builtin:`` spec.
        limit: keep only the first ``limit`` items (None: all).
        seed: seed of a generated workload (ignored for files).

    Returns:
        Workload(name, digest, items); name is the file name or the builtin spec.

    Raises:
        WorkloadError: missing file, malformed line, bad builtin spec, bad limit.
    """
    items = list(iter_items(spec, limit=limit, seed=seed))
    name = str(spec) if _is_builtin(spec) else Path(spec).name
    return Workload(name=name, digest=workload_digest(items), items=items)


def iter_items(spec: str | Path, *, limit: int | None = None, seed: int = 0) -> Iterator[Item]:
    """Yield a workload's items lazily, in order (same arguments as ``load_workload``).

    A ``WorkloadError`` for a malformed line is raised only when iteration
    reaches that line, after every earlier item has been yielded.
    """
    if limit is not None and (not isinstance(limit, int) or limit < 0):
        raise WorkloadError(f"limit must be a whole number >= 0 or None, got {limit!r}.")
    if limit == 0:
        return
    source = _builtin_items(str(spec), seed) if _is_builtin(spec) else _file_items(Path(spec))
    for count, item in enumerate(source, start=1):
        yield item
        if limit is not None and count >= limit:
            return


# --------------------------------------------------------------------------- builtin


def _is_builtin(spec: str | Path) -> bool:
    return isinstance(spec, str) and spec.startswith(BUILTIN_PREFIX)


def _parse_levels(text: str, spec: str) -> tuple[int, ...]:
    try:
        if "-" in text:
            lo, hi = (int(x) for x in text.split("-", 1))
            levels = tuple(range(lo, hi + 1))
        else:
            levels = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        levels = ()
    if not levels or any(lv < 1 or lv > 5 for lv in levels):
        raise WorkloadError(
            f"workload {spec!r}: levels={text!r} is not valid; "
            "give levels between 1 and 5 as '2', '1-3' or '1,3,5'."
        )
    return levels


def _builtin_items(spec: str, seed: int) -> Iterator[Item]:
    """Items of ``builtin:NAME?query``; raises WorkloadError on an unknown name or bad query."""
    body = spec[len(BUILTIN_PREFIX):]
    name, _, query = body.partition("?")
    if name not in _BUILTINS:
        raise WorkloadError(
            f"unknown built-in workload {name!r} in {spec!r}; built-ins: "
            + ", ".join(f"{BUILTIN_PREFIX}{b}" for b in _BUILTINS)
            + " (e.g. builtin:arithmetic?n=50&levels=1-5)."
        )
    n, levels = _DEFAULT_N, (1, 2, 3, 4, 5)
    for key, value in parse_qsl(query, keep_blank_values=True):
        if key in ("n", "seed"):
            try:
                number = int(value)
            except ValueError:
                number = -1
            if number < 0:
                raise WorkloadError(
                    f"workload {spec!r}: {key}={value!r} must be a whole number >= 0."
                )
            if key == "n":
                n = number
            else:
                seed = number
        elif key == "levels":
            levels = _parse_levels(value, spec)
        else:
            raise WorkloadError(
                f"workload {spec!r}: unknown option {key!r}; options are n, levels and seed."
            )

    yield from generate_problems(n, levels=levels, seed=seed)


# --------------------------------------------------------------------------- files


def _file_items(path: Path) -> Iterator[Item]:
    """Items of a GSM8K or generic JSONL file, one line at a time."""
    if not path.is_file():
        raise WorkloadError(
            f"workload file {str(path)!r} does not exist (or is not a file); "
            "give the path of a JSONL file, or a built-in such as builtin:arithmetic."
        )
    kind: str | None = None  # "gsm8k" or "generic", fixed by the first valid record
    seen: dict[str, int] = {}
    try:
        fh = path.open("rb")
    except OSError as exc:
        raise WorkloadError(f"cannot read workload file {str(path)!r}: {exc}.") from exc
    with fh:
        for index, raw in enumerate(_raw_lines(fh)):
            lineno = index + 1
            line = _decode_line(path, lineno, raw, bom=index == 0)
            if not line.strip():
                continue
            record = _parse_line(path, lineno, line)
            if kind is None:
                kind = "gsm8k" if _looks_gsm8k(record) else "conversation" if "turns" in record else "generic"
            if kind == "gsm8k":
                items = [_gsm8k_item(path, lineno, index, record)]
            elif kind == "conversation":
                items = _conversation_items(path, lineno, index, record)
            else:
                items = [_generic_item(path, lineno, index, record)]
            for item in items:
                if item.key in seen:
                    _fail(path, lineno, f"key {item.key!r} was already used on line {seen[item.key]}",
                          "give every record a unique 'id'")
                seen[item.key] = lineno
            yield from items


def _fail(path: Path, lineno: int, what: str, fix: str) -> NoReturn:
    raise WorkloadError(f"{path}:{lineno}: {what}; {fix}.")


def _raw_lines(fh) -> Iterator[bytes]:
    """The file's lines as bytes, without their ends, split at ``\\n``, ``\\r\\n`` or ``\\r``
    (the line ends text mode reads), one buffered line at a time."""
    for chunk in fh:
        yield from chunk.splitlines() or [b""]


def _decode_line(path: Path, lineno: int, raw: bytes, *, bom: bool) -> str:
    """One line as text; a byte that is not UTF-8 raises WorkloadError with its line and column."""
    try:
        return raw.decode("utf-8-sig" if bom else "utf-8")
    except UnicodeDecodeError as exc:
        start = exc.start
        column = len(raw[:start].decode("utf-8", errors="replace")) + 1
        bad = raw[start:exc.end].hex(" ")
        _fail(path, lineno, f"column {column}: byte 0x{bad} is not UTF-8 ({exc.reason})",
              "save the file as UTF-8 (e.g. `iconv -f latin1 -t utf-8 in.jsonl > out.jsonl`, "
              "or re-export it from your editor as UTF-8)")


def _parse_line(path: Path, lineno: int, line: str) -> dict[str, Any]:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        _fail(path, lineno, f"not valid JSON ({exc.msg} at column {exc.colno})",
              "write one JSON object per line")
    if not isinstance(record, dict):
        _fail(path, lineno, f"expected a JSON object, got {type(record).__name__}",
              "write one JSON object per line, e.g. {\"prompt\": \"...\", \"answer\": \"...\"}")
    return record


def _looks_gsm8k(record: dict[str, Any]) -> bool:
    return (
        "prompt" not in record
        and isinstance(record.get("question"), str)
        and isinstance(record.get("answer"), str)
        and "####" in record["answer"]
    )


def _gsm8k_item(path: Path, lineno: int, index: int, record: dict[str, Any]) -> Item:
    from dreamroute.grading import format_number, parse_number

    fix = "GSM8K records need {\"question\": str, \"answer\": str ending in '#### N'}"
    question, answer = record.get("question"), record.get("answer")
    if not isinstance(question, str) or not question.strip():
        _fail(path, lineno, "GSM8K record has no 'question' string (the file was read as GSM8K "
              "from its first record)", fix)
    if not isinstance(answer, str) or "####" not in answer:
        _fail(path, lineno, "GSM8K record's 'answer' is missing or has no '####'", fix)
    gold = parse_number(answer.rsplit("####", 1)[1])
    if gold is None:
        _fail(path, lineno, "no number after '####' in the GSM8K 'answer'", fix)
    return Item(
        key=f"gsm8k:{index}",
        prompt=GSM8K_PROMPT.format(question=question),
        answer=format_number(gold),
        grader="gsm8k",
        meta={"index": index},
    )


def _generic_item(path: Path, lineno: int, index: int, record: dict[str, Any]) -> Item:
    from dreamroute.grading import get_grader

    fix = ("generic records need {\"prompt\": str} with optional \"answer\" (string or number), "
           "\"grader\" (string) and \"id\" (string or integer)")
    prompt = record.get("prompt")
    if prompt is None and isinstance(record.get("question"), str) and "answer" in record:
        _fail(path, lineno, "a 'question'/'answer' record whose answer has no '#### N' (read as GSM8K only "
              "when the first record's answer ends in '#### N')",
              "end each GSM8K answer with '#### N', or use generic records {\"prompt\": ..., \"answer\": ...}")
    if not isinstance(prompt, str) or not prompt.strip():
        what = "missing field 'prompt'" if prompt is None else "'prompt' must be a non-empty string"
        _fail(path, lineno, what, fix)
    answer = record.get("answer")
    if isinstance(answer, bool) or not isinstance(answer, (str, int, float, type(None))):
        _fail(path, lineno, f"'answer' must be a string or number, got {type(answer).__name__}", fix)
    grader = record.get("grader", "exact")
    if not isinstance(grader, str):
        _fail(path, lineno, f"'grader' must be a string, got {type(grader).__name__}", fix)
    try:
        get_grader(grader)
    except ConfigError as exc:
        _fail(path, lineno, str(exc).rstrip("."), "fix the record's 'grader'")
    rid = record.get("id")
    if isinstance(rid, bool) or not isinstance(rid, (str, int, type(None))):
        _fail(path, lineno, f"'id' must be a string or integer, got {type(rid).__name__}", fix)
    key = str(rid) if rid is not None else f"{path.stem}:{index}"
    meta = {k: v for k, v in record.items() if k not in ("prompt", "answer", "grader", "id")}
    meta["index"] = index
    return Item(
        key=key,
        prompt=prompt,
        answer=None if answer is None else str(answer),
        grader=grader.strip().lower(),
        meta=meta,
    )


def _conversation_items(path: Path, lineno: int, index: int, record: dict[str, Any]) -> list[Item]:
    from dreamroute.grading import get_grader

    fix = ("conversation records need {\"turns\": [str | {\"content\": str, \"answer\"?: str | number, "
           "\"grader\"?: str}, ...]} with optional \"id\" (string or integer) and \"grader\"")
    turns = record.get("turns")
    if not isinstance(turns, list) or not turns:
        _fail(path, lineno, "'turns' must be a non-empty list (the file was read as conversations "
              "from its first record)", fix)
    rid = record.get("id", record.get("question_id"))
    if isinstance(rid, bool) or not isinstance(rid, (str, int, type(None))):
        _fail(path, lineno, f"'id' must be a string or integer, got {type(rid).__name__}", fix)
    conv = str(rid) if rid is not None else f"{path.stem}:{index}"
    default_grader = record.get("grader", "exact")
    items = []
    for k, turn in enumerate(turns):
        if isinstance(turn, str):
            turn = {"content": turn}
        if not isinstance(turn, dict):
            _fail(path, lineno, f"turn {k} must be a string or an object, got {type(turn).__name__}", fix)
        content, answer = turn.get("content"), turn.get("answer")
        if not isinstance(content, str) or not content.strip():
            _fail(path, lineno, f"turn {k} has no non-empty 'content' string", fix)
        if isinstance(answer, bool) or not isinstance(answer, (str, int, float, type(None))):
            _fail(path, lineno, f"turn {k}: 'answer' must be a string or number, got {type(answer).__name__}", fix)
        grader = turn.get("grader", default_grader)
        try:
            get_grader(grader if isinstance(grader, str) else "")
        except ConfigError as exc:
            _fail(path, lineno, f"turn {k}: {str(exc).rstrip('.')}", "fix the turn's or record's 'grader'")
        meta = {k2: v for k2, v in record.items() if k2 not in ("turns", "id", "question_id", "grader")}
        meta.update(conversation=conv, turn=k, index=index)
        items.append(Item(key=f"{conv}:t{k}", prompt=content, answer=None if answer is None else str(answer),
                          grader=grader.strip().lower(), meta=meta))
    return items
