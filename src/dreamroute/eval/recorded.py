"""Recorded outcomes: what every tier answered to every item, for offline replay.

The field evaluates routers on recorded outcomes (RouteLLM, RouterBench):
each item was sent once to every model and graded, and a router is then
scored by which answer it would have picked. ``dreamroute simulate`` drives
the real router over such a set with :class:`dreamroute.backends.replay.ReplayBackend`.

Two sources are read by :func:`load_recorded`:

**Recorded-outcome JSONL** (``kind="outcomes"``): one line per (item, tier), as
in ``shared/data/local_tiers/gsm8k_test_outcomes.jsonl`` and as written by
``dreamroute collect`` (:mod:`dreamroute.eval.collect`). Fields:

- required: ``tier`` (str), ``correct`` (bool), ``prompt`` (str) or
  ``sent_prompt`` (str), and ``key`` (str or int) or ``index`` (int);
- optional: ``model`` (str), ``gold`` (str, number or null), ``grader`` (str),
  ``sent_prompt`` (the user message exactly as sent), ``response`` (str or
  null), ``prompt_tokens`` / ``completion_tokens`` (int >= 0 or null),
  ``seconds`` (number >= 0 or null), ``mean_logprob`` (number <= 0 or null),
  ``atp_joules`` (number >= 0 or null); other fields (``predicted``,
  ``identity``, ``cached_tokens`` ...) are ignored.

Lines are grouped into items by ``key``, else by ``index``. The prompt of an
item is ``sent_prompt`` when given. The legacy local_tiers format has neither
``sent_prompt`` nor ``grader``: there ``prompt`` is the bare GSM8K question and
the model was sent ``GSM8K_PROMPT.format(question=prompt)`` — so a line with
no ``sent_prompt``, no ``grader`` and a numeric ``gold`` gets that prompt,
grader ``gsm8k`` and (with no ``key``) the key ``gsm8k:{index}``, the same key
``dreamroute.eval.workloads`` gives that question of ``gsm8k/test.jsonl``.
Otherwise a line without ``key`` is keyed ``{file stem}:{index}``, the prompt
is ``prompt`` as written, and the grader is ``grader`` when given, else
``exact`` when there is a gold answer, else None.

Every item must have a line for every tier (replay needs each tier's outcome),
exactly once, and all of an item's lines must agree on prompt, gold and grader.

Tier order (cheapest first): by the mean recorded ``seconds`` of each tier's
lines (for local_tiers 2.8 s < 7.3 s < 13.6 s: sensory, tactical, specialized);
when some tier has no ``seconds`` at all, by first appearance in the file(s).
``load_recorded(..., tier_order=[...])`` overrides both.

**RouteLLM CSVs** (``kind="routellm"``): ``shared/data/routellm/gsm8k/gsm8k_responses.csv``
and ``routellm/mmlu/*.csv``, columns ``prompt``, one boolean column per model
(``True``/``False``) and optionally ``<model>_response``. The two models become
the tiers ``weak`` and ``strong``: strong is the model with the higher mean
correctness over all rows loaded (the whole file set; a tie makes the first
model column weak). In this data that is gpt-4-1106-preview (strong) versus
Mixtral-8x7B-Instruct (weak). Each call costs the paper's unitless ATP: 1 for
strong, 0 for weak; token counts, seconds and logprobs are None. The grader is
``gsm8k`` for files whose stem starts with ``gsm8k``, else ``choice``; gold is
None (the booleans are the grade). Rows whose prompt appears (exactly) as
``eval_prompt`` in the ``contaminated_prompts.jsonl`` next to the CSV are
dropped, as RouteLLM's own evaluation does; :attr:`RecordedSet.dropped` counts
them. Keys are ``{file stem}:{row}`` with ``row`` the 0-based data row of the
file before dropping, so keys do not move when the contamination list changes.

**A directory** means all its ``*.csv`` and ``*.jsonl`` files in name order,
``contaminated_prompts.jsonl`` excluded; all must be of the same kind. JSONL
lines of several files are grouped by key together (one file per tier works).

Every problem (missing path, unknown format, malformed line or row, a missing
tier) raises :class:`~dreamroute.errors.WorkloadError` naming the file and the
line or row and saying how to fix it.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

from dreamroute.errors import ConfigError, WorkloadError

__all__ = ["RecordedCall", "RecordedItem", "RecordedSet", "load_recorded", "tier_accuracy",
           "oracle_tier", "recorded_digest", "CONTAMINATED_FILE", "ROUTELLM_COST"]

CONTAMINATED_FILE = "contaminated_prompts.jsonl"
ROUTELLM_COST = {"weak": 0.0, "strong": 1.0}
"""The RouteLLM paper's cost per call (unitless, reported as ATP)."""

_DATA_SUFFIXES = (".csv", ".jsonl")
_NUMERIC_RE = re.compile(r"\s*-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?\s*")


@dataclass(frozen=True)
class RecordedCall:
    """One tier's recorded answer to one item.

    Attributes:
        tier / model: who answered.
        response: the answer text (None where the source has none, e.g. RouteLLM MMLU).
        correct: the recorded grade.
        prompt_tokens / completion_tokens / seconds / mean_logprob: as recorded, None when unknown.
        atp_joules: the cost the source gives (RouteLLM: strong 1, weak 0; a
            collected line: the ATP charged when it was collected), else None.
    """

    tier: str
    model: str
    response: str | None
    correct: bool
    prompt_tokens: int | None
    completion_tokens: int | None
    seconds: float | None
    mean_logprob: float | None
    atp_joules: float | None


@dataclass(frozen=True)
class RecordedItem:
    """One item with every tier's recorded call.

    Attributes:
        key: unique within the set.
        prompt: the user message exactly as it was sent to the models.
        gold: the gold answer, None when the grade is all there is (RouteLLM).
        grader: a ``dreamroute.eval.graders`` name, or None.
        calls: tier → :class:`RecordedCall`.
    """

    key: str
    prompt: str
    gold: str | None
    grader: str | None
    calls: dict[str, RecordedCall] = field(hash=False)


@dataclass(frozen=True)
class RecordedSet:
    """A loaded recorded source.

    Attributes:
        name: the file or directory name.
        kind: ``"outcomes"`` or ``"routellm"``.
        tiers: tier names, cheapest first.
        items: the items, in file order.
        digest: :func:`recorded_digest` of the items (sha256 hex).
        dropped: rows dropped as contaminated (RouteLLM), else 0.
        files: the data files read, in order.
        models: tier → model name (of the first item).
    """

    name: str
    kind: str
    tiers: list[str]
    items: list[RecordedItem]
    digest: str
    dropped: int = 0
    files: list[str] = field(default_factory=list)
    models: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_by_key", {it.key: it for it in self.items})

    def __len__(self) -> int:
        return len(self.items)

    def __iter__(self):
        return iter(self.items)

    def get(self, key: str) -> RecordedItem:
        """The item with this key. Raises KeyError naming the key."""
        try:
            return self._by_key[key]  # type: ignore[attr-defined]
        except KeyError:
            raise KeyError(f"no recorded item has key {key!r} in {self.name}") from None

    def __contains__(self, key: object) -> bool:
        return key in self._by_key  # type: ignore[attr-defined]


# --------------------------------------------------------------------------- helpers


def recorded_digest(tiers: list[str], items: list[RecordedItem]) -> str:
    """sha256 (hex) over the tier order and each item's key, prompt, gold, grader and
    every tier's recorded outcome (model, correct, response, tokens, seconds,
    mean logprob, ATP), in order. Stable across runs and platforms."""
    h = hashlib.sha256()
    h.update(json.dumps(list(tiers), ensure_ascii=False).encode("utf-8") + b"\n")
    for it in items:
        calls = [[t, c.model, c.correct, c.response, c.prompt_tokens, c.completion_tokens, c.seconds,
                  c.mean_logprob, c.atp_joules] for t in tiers for c in [it.calls[t]]]
        record = [it.key, it.prompt, it.gold, it.grader, calls]
        h.update(json.dumps(record, ensure_ascii=False, separators=(",", ":")).encode("utf-8"))
        h.update(b"\n")
    return h.hexdigest()


def tier_accuracy(rs: RecordedSet) -> dict[str, float]:
    """Fraction of items each tier answered correctly (tier → accuracy; NaN for no items)."""
    n = len(rs.items)
    return {t: (sum(it.calls[t].correct for it in rs.items) / n if n else math.nan) for t in rs.tiers}


def oracle_tier(item: RecordedItem, tiers: list[str]) -> str:
    """The cheapest tier (``tiers`` is cheapest first) that answered correctly, else the
    cheapest tier — RouterBench's oracle."""
    if not tiers:
        raise ValueError("oracle_tier needs at least one tier")
    for t in tiers:
        if item.calls[t].correct:
            return t
    return tiers[0]


def _fail(path: Path, where: str, what: str, fix: str) -> NoReturn:
    raise WorkloadError(f"{path}:{where}: {what}; {fix}.")


def _utf8_lines(fh, path: Path):
    """Lines (ends kept) of a file opened in binary mode, decoded as UTF-8 one at a time;
    a byte that is not UTF-8 raises WorkloadError naming the line and column."""
    for lineno, raw in enumerate(fh, start=1):
        try:
            yield raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
        except UnicodeDecodeError as exc:
            _fail(path, f"{lineno}: column {exc.start + 1}",
                  f"byte 0x{raw[exc.start]:02x} is not UTF-8 ({exc.reason})",
                  "save the file as UTF-8 (e.g. `iconv -f latin1 -t utf-8 IN > OUT`)")


def _json_lines(fh, path: Path, fix: str):
    """(line number, decoded record) for each non-blank line of an open JSONL file;
    a line that is not JSON raises WorkloadError naming it, with ``fix``."""
    for lineno, line in enumerate(_utf8_lines(fh, path), start=1):
        if not line.strip():
            continue
        try:
            yield lineno, json.loads(line)
        except json.JSONDecodeError as exc:
            _fail(path, str(lineno), f"not valid JSON ({exc.msg} at column {exc.colno})", fix)


# --------------------------------------------------------------------------- entry point


def load_recorded(path: str | Path, *, tier_order: list[str] | None = None) -> RecordedSet:
    """Read a recorded source (see the module docstring): a JSONL or CSV file, or a directory.

    Args:
        path: the file or directory.
        tier_order: tier names cheapest first, overriding the inferred order
            (must name exactly the tiers of the set).

    Raises:
        WorkloadError: missing path, unknown format, a malformed line or row, an
            item missing a tier, mixed kinds in a directory, a bad ``tier_order``.
    """
    p = Path(path)
    if p.is_dir():
        files = sorted((f for f in p.iterdir() if f.is_file() and f.suffix in _DATA_SUFFIXES
                        and f.name != CONTAMINATED_FILE), key=lambda f: f.name)
        if not files:
            raise WorkloadError(f"directory {str(p)!r} holds no recorded data (*.csv or *.jsonl other "
                                f"than {CONTAMINATED_FILE}); point at a recorded-outcome JSONL file, a "
                                "RouteLLM CSV, or a directory of them.")
    elif p.is_file():
        files = [p]
    else:
        raise WorkloadError(f"recorded source {str(p)!r} does not exist; give a recorded-outcome JSONL "
                            "file (e.g. shared/data/local_tiers/gsm8k_test_outcomes.jsonl, or one written "
                            "by `dreamroute collect`), a RouteLLM CSV, or a directory of them.")
    kinds = {f: _detect_kind(f) for f in files}
    if len(set(kinds.values())) > 1:
        listing = ", ".join(f"{f.name} ({k})" for f, k in kinds.items())
        raise WorkloadError(f"directory {str(p)!r} mixes recorded-outcome JSONL and RouteLLM CSV files "
                            f"({listing}); put each kind in its own directory.")
    kind = kinds[files[0]]
    if kind == "routellm":
        tiers, items, dropped, models = _load_routellm(files)
    else:
        tiers, items, models = _load_outcomes(files)
        dropped = 0
    if tier_order is not None:
        if sorted(tier_order) != sorted(tiers) or len(set(tier_order)) != len(tier_order):
            raise WorkloadError(f"tier_order {list(tier_order)} must name exactly the tiers of {p.name}: "
                                f"{sorted(tiers)}.")
        tiers = list(tier_order)
    return RecordedSet(name=p.name, kind=kind, tiers=tiers, items=items,
                       digest=recorded_digest(tiers, items), dropped=dropped,
                       files=[str(f) for f in files], models={t: models[t] for t in tiers})


def _detect_kind(path: Path) -> str:
    """``routellm`` for a CSV, ``outcomes`` for a JSONL whose first record has ``tier`` and ``correct``."""
    if path.suffix == ".csv":
        return "routellm"
    if path.suffix == ".jsonl":
        try:
            with path.open("rb") as fh:
                for _lineno, rec in _json_lines(fh, path, "write one JSON object per line"):
                    if isinstance(rec, dict) and "tier" in rec and "correct" in rec:
                        return "outcomes"
                    break
        except OSError as exc:
            raise WorkloadError(f"cannot read {str(path)!r}: {exc}.") from exc
    raise WorkloadError(f"{str(path)!r} is not a recorded source dreamroute knows: expected a "
                        "recorded-outcome JSONL (one line per item and tier with 'tier' and 'correct'), "
                        "or a RouteLLM CSV (prompt plus one True/False column per model). A workload of "
                        "prompts is run with `dreamroute run`, or recorded with `dreamroute collect`.")


# --------------------------------------------------------------------------- outcomes JSONL


_OUTCOME_FIX = ("each line needs {\"tier\": str, \"correct\": bool, \"prompt\" or \"sent_prompt\": str, "
                "\"key\" or \"index\"} (see dreamroute.eval.recorded)")


def _opt_number(path: Path, lineno: int, rec: dict, name: str, *, integer: bool = False,
                low: float | None = 0.0, high: float | None = None) -> Any:
    v = rec.get(name)
    if v is None:
        return None
    ok = (isinstance(v, int) if integer else isinstance(v, (int, float))) and not isinstance(v, bool)
    if ok and not integer:
        ok = math.isfinite(v)
    if ok and ((low is not None and v < low) or (high is not None and v > high)):
        ok = False
    if not ok:
        kind = "a whole number" if integer else "a number"
        rng = " >= 0" if low == 0 else (" <= 0" if high == 0 else "")
        _fail(path, str(lineno), f"'{name}' must be {kind}{rng} or null, got {v!r}", _OUTCOME_FIX)
    return int(v) if integer else float(v)


def _opt_str(path: Path, lineno: int, rec: dict, name: str) -> str | None:
    v = rec.get(name)
    if v is not None and not isinstance(v, str):
        _fail(path, str(lineno), f"'{name}' must be a string or null, got {type(v).__name__}", _OUTCOME_FIX)
    return v


def _outcome_line(path: Path, lineno: int, rec: Any) -> tuple[str, str, str | None, str | None, RecordedCall]:
    """(key, prompt, gold, grader, call) of one recorded-outcome line."""
    if not isinstance(rec, dict):
        _fail(path, str(lineno), f"expected a JSON object, got {type(rec).__name__}", _OUTCOME_FIX)
    tier = rec.get("tier")
    if not isinstance(tier, str) or not tier.strip():
        _fail(path, str(lineno), "missing or empty 'tier'", _OUTCOME_FIX)
    correct = rec.get("correct")
    if not isinstance(correct, bool):
        _fail(path, str(lineno), f"'correct' must be true or false, got {correct!r} (replay needs graded "
              "outcomes)", _OUTCOME_FIX)
    bare = _opt_str(path, lineno, rec, "prompt")
    sent = _opt_str(path, lineno, rec, "sent_prompt")
    if not (sent or bare):
        _fail(path, str(lineno), "no 'prompt' or 'sent_prompt' string", _OUTCOME_FIX)
    model = _opt_str(path, lineno, rec, "model") or ""
    grader = _opt_str(path, lineno, rec, "grader")
    if grader is not None:
        from dreamroute.eval.graders import get_grader

        try:
            get_grader(grader)
        except ConfigError as exc:
            _fail(path, str(lineno), str(exc).rstrip("."), "fix the line's 'grader'")
        grader = grader.strip().lower()
    gold = rec.get("gold")
    if isinstance(gold, bool) or not isinstance(gold, (str, int, float, type(None))):
        _fail(path, str(lineno), f"'gold' must be a string, number or null, got {type(gold).__name__}",
              _OUTCOME_FIX)
    gold = None if gold is None else str(gold)
    key = rec.get("key")
    index = rec.get("index")
    if key is not None and (isinstance(key, bool) or not isinstance(key, (str, int))):
        _fail(path, str(lineno), f"'key' must be a string or integer, got {type(key).__name__}", _OUTCOME_FIX)
    if index is not None and (isinstance(index, bool) or not isinstance(index, int)):
        _fail(path, str(lineno), f"'index' must be an integer, got {index!r}", _OUTCOME_FIX)
    if key is None and index is None:
        _fail(path, str(lineno), "neither 'key' nor 'index' names the item", _OUTCOME_FIX)
    legacy = sent is None and grader is None and gold is not None and _NUMERIC_RE.fullmatch(gold) is not None
    if legacy:  # local_tiers: a bare GSM8K question, sent through the GSM8K template
        from dreamroute.eval.workloads import GSM8K_PROMPT

        prompt = GSM8K_PROMPT.format(question=bare)
        grader = "gsm8k"
        key = str(key) if key is not None else f"gsm8k:{index}"
    else:
        prompt = sent if sent is not None else bare
        if grader is None and gold is not None:
            grader = "exact"
        key = str(key) if key is not None else f"{path.stem}:{index}"
    response = _opt_str(path, lineno, rec, "response")
    call = RecordedCall(
        tier=tier, model=model, response=response, correct=correct,
        prompt_tokens=_opt_number(path, lineno, rec, "prompt_tokens", integer=True),
        completion_tokens=_opt_number(path, lineno, rec, "completion_tokens", integer=True),
        seconds=_opt_number(path, lineno, rec, "seconds"),
        mean_logprob=_opt_number(path, lineno, rec, "mean_logprob", low=None, high=0.0),
        atp_joules=_opt_number(path, lineno, rec, "atp_joules"))
    return key, prompt, gold, grader, call


def _load_outcomes(files: list[Path]) -> tuple[list[str], list[RecordedItem], dict[str, str]]:
    groups: dict[str, dict] = {}  # key → {prompt, gold, grader, calls, where}
    tier_first: list[str] = []
    seconds: dict[str, list[float]] = {}
    for path in files:
        try:
            fh = path.open("rb")
        except OSError as exc:
            raise WorkloadError(f"cannot read recorded outcomes {str(path)!r}: {exc}.") from exc
        with fh:
            for lineno, rec in _json_lines(fh, path, "write one JSON object per line (a line cut short by a "
                                                     "kill is repaired by rerunning `dreamroute collect` "
                                                     "with the same --out)"):
                key, prompt, gold, grader, call = _outcome_line(path, lineno, rec)
                where = f"{path.name}:{lineno}"
                g = groups.get(key)
                if g is None:
                    g = groups[key] = {"prompt": prompt, "gold": gold, "grader": grader, "calls": {},
                                       "where": {}}
                else:
                    for name, val in (("prompt", prompt), ("gold", gold), ("grader", grader)):
                        if g[name] != val:
                            first = next(iter(g["where"].values()))
                            _fail(path, str(lineno), f"item {key!r} has a different {name} than on {first}",
                                  "lines of one item must share prompt, gold and grader; give different "
                                  "items different keys")
                if call.tier in g["calls"]:
                    _fail(path, str(lineno), f"item {key!r} already has a line for tier {call.tier!r} "
                          f"({g['where'][call.tier]})", "keep one line per item and tier")
                g["calls"][call.tier] = call
                g["where"][call.tier] = where
                if call.tier not in seconds:
                    tier_first.append(call.tier)
                    seconds[call.tier] = []
                if call.seconds is not None:
                    seconds[call.tier].append(call.seconds)
    if not groups:
        raise WorkloadError(f"{', '.join(str(f) for f in files)}: no recorded lines; record outcomes "
                            "with `dreamroute collect` first.")
    for key, g in groups.items():
        missing = [t for t in tier_first if t not in g["calls"]]
        if missing:
            first = next(iter(g["where"].values()))
            raise WorkloadError(
                f"{first}: item {key!r} has no recorded line for tier(s) {', '.join(map(repr, missing))} "
                f"(it has {', '.join(map(repr, g['calls']))}); replay needs every tier's outcome for every "
                "item: collect the missing tier (rerun `dreamroute collect` with the same --out) or "
                "remove the item's lines.")
    if all(seconds[t] for t in tier_first):
        order = sorted(range(len(tier_first)),
                       key=lambda i: (sum(seconds[tier_first[i]]) / len(seconds[tier_first[i]]), i))
        tiers = [tier_first[i] for i in order]
    else:
        tiers = list(tier_first)
    items = [RecordedItem(key=k, prompt=g["prompt"], gold=g["gold"], grader=g["grader"],
                          calls={t: g["calls"][t] for t in tiers}) for k, g in groups.items()]
    models = {t: items[0].calls[t].model for t in tiers}
    return tiers, items, models


# --------------------------------------------------------------------------- RouteLLM CSV

_TRUE = {"true", "1", "1.0"}
_FALSE = {"false", "0", "0.0"}
_CSV_FIX = ("RouteLLM CSVs have a header 'prompt,<model A>,<model B>[,<model>_response ...]' and "
            "one row per prompt with True/False per model")


def _contaminated(directory: Path) -> set[str]:
    path = directory / CONTAMINATED_FILE
    if not path.is_file():
        return set()
    out: set[str] = set()
    with path.open("rb") as fh:
        for lineno, rec in _json_lines(fh, path, "write one JSON object per line with an 'eval_prompt' string"):
            if not isinstance(rec, dict) or not isinstance(rec.get("eval_prompt"), str):
                _fail(path, str(lineno), "no 'eval_prompt' string",
                      "each line needs {\"eval_prompt\": str} (the contaminated prompt, as in the CSV)")
            out.add(rec["eval_prompt"])
    return out


def _read_csv(path: Path) -> tuple[list[str], list[tuple[int, int, list[str]]]]:
    """Header and (row index, first line number, fields) of each data row."""
    rows: list[tuple[int, int, list[str]]] = []
    try:
        fh = path.open("rb")
    except OSError as exc:
        raise WorkloadError(f"cannot read RouteLLM CSV {str(path)!r}: {exc}.") from exc
    with fh:
        reader = csv.reader(_utf8_lines(fh, path))
        try:
            header = next(reader, None)
            if header is None:
                _fail(path, "1", "the file is empty", _CSV_FIX)
            start = reader.line_num + 1
            for fields in reader:
                if fields:  # csv yields [] for a blank line
                    rows.append((len(rows), start, fields))
                start = reader.line_num + 1
        except csv.Error as exc:
            _fail(path, str(reader.line_num), f"not valid CSV ({exc})", _CSV_FIX)
    return header, rows


def _parse_bool(path: Path, where: str, column: str, value: str) -> bool:
    v = value.strip().lower()
    if v in _TRUE:
        return True
    if v in _FALSE:
        return False
    _fail(path, where, f"column {column!r} must be True or False, got {value!r}", _CSV_FIX)


def _load_routellm(files: list[Path]) -> tuple[list[str], list[RecordedItem], int, dict[str, str]]:
    models: list[str] | None = None
    rows_all: list[tuple[str, str, dict[str, bool], dict[str, str | None], str]] = []
    dropped = 0
    contaminated_cache: dict[Path, set[str]] = {}
    for path in files:
        header, rows = _read_csv(path)
        if "prompt" not in header:
            _fail(path, "1", f"no 'prompt' column in the header {header}", _CSV_FIX)
        file_models = [h for h in header if h != "prompt" and not h.endswith("_response")]
        if len(file_models) != 2:
            _fail(path, "1", f"expected exactly two model columns, found {file_models}", _CSV_FIX)
        if models is None:
            models = file_models
        elif set(file_models) != set(models):
            _fail(path, "1", f"models {file_models} differ from {models} in {files[0].name}",
                  "every file of a directory must compare the same two models")
        col = {h: i for i, h in enumerate(header)}
        directory = path.parent
        if directory not in contaminated_cache:
            contaminated_cache[directory] = _contaminated(directory)
        contaminated = contaminated_cache[directory]
        grader = "gsm8k" if path.stem.lower().startswith("gsm8k") else "choice"
        for row, lineno, fields in rows:
            where = f"row {row} (line {lineno})"
            if len(fields) != len(header):
                _fail(path, where, f"{len(fields)} fields where the header has {len(header)}", _CSV_FIX)
            prompt = fields[col["prompt"]]
            if not prompt.strip():
                _fail(path, where, "empty prompt", _CSV_FIX)
            correct = {m: _parse_bool(path, where, m, fields[col[m]]) for m in models}
            responses = {m: (fields[col[f"{m}_response"]] if f"{m}_response" in col else None) for m in models}
            if prompt in contaminated:
                dropped += 1
                continue
            rows_all.append((f"{path.stem}:{row}", prompt, correct, responses, grader))
    assert models is not None
    if not rows_all:
        raise WorkloadError(f"{', '.join(str(f) for f in files)}: no rows left after dropping {dropped} "
                            "contaminated prompts; nothing to replay.")
    mean = {m: sum(r[2][m] for r in rows_all) / len(rows_all) for m in models}
    weak, strong = (models[0], models[1]) if mean[models[1]] >= mean[models[0]] else (models[1], models[0])
    tier_model = {"weak": weak, "strong": strong}
    items = []
    for key, prompt, correct, responses, grader in rows_all:
        calls = {t: RecordedCall(tier=t, model=m, response=responses[m], correct=correct[m], prompt_tokens=None,
                                 completion_tokens=None, seconds=None, mean_logprob=None,
                                 atp_joules=ROUTELLM_COST[t])
                 for t, m in tier_model.items()}
        items.append(RecordedItem(key=key, prompt=prompt, gold=None, grader=grader, calls=calls))
    return ["weak", "strong"], items, dropped, tier_model
