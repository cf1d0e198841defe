"""The reader of recorded-outcome JSONL (``kind="outcomes"``): the lines ``dreamroute collect``
writes and the legacy local_tiers format, grouped into items by key.

The format (required and optional fields, legacy GSM8K lines, tier order) is described in
:mod:`dreamroute.eval.recorded`, whose :func:`~dreamroute.eval.recorded.load_recorded` calls
:func:`load_outcomes`.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

from dreamroute.errors import ConfigError, WorkloadError

from .recorded_io import fail_line, json_lines
from .recorded_set import RecordedCall, RecordedItem

_NUMERIC_RE = re.compile(r"\s*-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?\s*")
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
        fail_line(path, str(lineno), f"'{name}' must be {kind}{rng} or null, got {v!r}", _OUTCOME_FIX)
    return int(v) if integer else float(v)


def _opt_str(path: Path, lineno: int, rec: dict, name: str) -> str | None:
    v = rec.get(name)
    if v is not None and not isinstance(v, str):
        fail_line(path, str(lineno), f"'{name}' must be a string or null, got {type(v).__name__}", _OUTCOME_FIX)
    return v


def _outcome_line(path: Path, lineno: int, rec: Any) -> tuple[str, str, str | None, str | None, RecordedCall]:
    """(key, prompt, gold, grader, call) of one recorded-outcome line."""
    if not isinstance(rec, dict):
        fail_line(path, str(lineno), f"expected a JSON object, got {type(rec).__name__}", _OUTCOME_FIX)
    tier = rec.get("tier")
    if not isinstance(tier, str) or not tier.strip():
        fail_line(path, str(lineno), "missing or empty 'tier'", _OUTCOME_FIX)
    correct = rec.get("correct")
    if not isinstance(correct, bool):
        fail_line(path, str(lineno), f"'correct' must be true or false, got {correct!r} (replay needs graded "
              "outcomes)", _OUTCOME_FIX)
    bare = _opt_str(path, lineno, rec, "prompt")
    sent = _opt_str(path, lineno, rec, "sent_prompt")
    if not (sent or bare):
        fail_line(path, str(lineno), "no 'prompt' or 'sent_prompt' string", _OUTCOME_FIX)
    model = _opt_str(path, lineno, rec, "model") or ""
    grader = _opt_str(path, lineno, rec, "grader")
    if grader is not None:
        from dreamroute.grading import get_grader

        try:
            get_grader(grader)
        except ConfigError as exc:
            fail_line(path, str(lineno), str(exc).rstrip("."), "fix the line's 'grader'")
        grader = grader.strip().lower()
    gold = rec.get("gold")
    if isinstance(gold, bool) or not isinstance(gold, (str, int, float, type(None))):
        fail_line(path, str(lineno), f"'gold' must be a string, number or null, got {type(gold).__name__}",
              _OUTCOME_FIX)
    gold = None if gold is None else str(gold)
    key = rec.get("key")
    index = rec.get("index")
    if key is not None and (isinstance(key, bool) or not isinstance(key, (str, int))):
        fail_line(path, str(lineno), f"'key' must be a string or integer, got {type(key).__name__}", _OUTCOME_FIX)
    if index is not None and (isinstance(index, bool) or not isinstance(index, int)):
        fail_line(path, str(lineno), f"'index' must be an integer, got {index!r}", _OUTCOME_FIX)
    if key is None and index is None:
        fail_line(path, str(lineno), "neither 'key' nor 'index' names the item", _OUTCOME_FIX)
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


def load_outcomes(files: list[Path]) -> tuple[list[str], list[RecordedItem], dict[str, str]]:
    """(tiers cheapest first, items, tier → model) of recorded-outcome JSONL ``files``."""
    groups: dict[str, dict] = {}  # key → {prompt, gold, grader, calls, where}
    tier_first: list[str] = []
    seconds: dict[str, list[float]] = {}
    for path in files:
        try:
            fh = path.open("rb")
        except OSError as exc:
            raise WorkloadError(f"cannot read recorded outcomes {str(path)!r}: {exc}.") from exc
        with fh:
            for lineno, rec in json_lines(fh, path, "write one JSON object per line (a line cut short by a "
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
                            fail_line(path, str(lineno), f"item {key!r} has a different {name} than on {first}",
                                  "lines of one item must share prompt, gold and grader; give different "
                                  "items different keys")
                if call.tier in g["calls"]:
                    fail_line(path, str(lineno), f"item {key!r} already has a line for tier {call.tier!r} "
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
