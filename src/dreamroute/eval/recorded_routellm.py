"""The reader of RouteLLM CSVs (``kind="routellm"``): two models' graded answers per prompt,
read as the tiers ``weak`` and ``strong``, with contaminated prompts dropped.

The format (columns, which model is strong, cost, grader, keys, ``contaminated_prompts.jsonl``)
is described in :mod:`dreamroute.eval.recorded`, whose
:func:`~dreamroute.eval.recorded.load_recorded` calls :func:`load_routellm`.
"""

from __future__ import annotations

import csv
from pathlib import Path

from dreamroute.errors import WorkloadError

from .recorded_io import fail_line, json_lines, utf8_lines
from .recorded_set import RecordedCall, RecordedItem

__all__ = ["CONTAMINATED_FILE", "ROUTELLM_COST"]

CONTAMINATED_FILE = "contaminated_prompts.jsonl"
ROUTELLM_COST = {"weak": 0.0, "strong": 1.0}
"""The RouteLLM paper's cost per call (unitless, reported as ATP)."""

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
        for lineno, rec in json_lines(fh, path, "write one JSON object per line with an 'eval_prompt' string"):
            if not isinstance(rec, dict) or not isinstance(rec.get("eval_prompt"), str):
                fail_line(path, str(lineno), "no 'eval_prompt' string",
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
        reader = csv.reader(utf8_lines(fh, path))
        try:
            header = next(reader, None)
            if header is None:
                fail_line(path, "1", "the file is empty", _CSV_FIX)
            start = reader.line_num + 1
            for fields in reader:
                if fields:  # csv yields [] for a blank line
                    rows.append((len(rows), start, fields))
                start = reader.line_num + 1
        except csv.Error as exc:
            fail_line(path, str(reader.line_num), f"not valid CSV ({exc})", _CSV_FIX)
    return header, rows


def _parse_bool(path: Path, where: str, column: str, value: str) -> bool:
    v = value.strip().lower()
    if v in _TRUE:
        return True
    if v in _FALSE:
        return False
    fail_line(path, where, f"column {column!r} must be True or False, got {value!r}", _CSV_FIX)


def load_routellm(files: list[Path]) -> tuple[list[str], list[RecordedItem], int, dict[str, str]]:
    """(tiers ``weak``/``strong``, items, rows dropped as contaminated, tier → model) of the
    RouteLLM CSV ``files``."""
    models: list[str] | None = None
    rows_all: list[tuple[str, str, dict[str, bool], dict[str, str | None], str]] = []
    dropped = 0
    contaminated_cache: dict[Path, set[str]] = {}
    for path in files:
        header, rows = _read_csv(path)
        if "prompt" not in header:
            fail_line(path, "1", f"no 'prompt' column in the header {header}", _CSV_FIX)
        file_models = [h for h in header if h != "prompt" and not h.endswith("_response")]
        if len(file_models) != 2:
            fail_line(path, "1", f"expected exactly two model columns, found {file_models}", _CSV_FIX)
        if models is None:
            models = file_models
        elif set(file_models) != set(models):
            fail_line(path, "1", f"models {file_models} differ from {models} in {files[0].name}",
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
                fail_line(path, where, f"{len(fields)} fields where the header has {len(header)}", _CSV_FIX)
            prompt = fields[col["prompt"]]
            if not prompt.strip():
                fail_line(path, where, "empty prompt", _CSV_FIX)
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
