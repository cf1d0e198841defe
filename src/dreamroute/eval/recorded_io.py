"""Reading recorded files line by line: UTF-8 decoding, JSON lines, and the
:class:`~dreamroute.errors.WorkloadError` that names the file and line of a problem.

Shared by the readers of :mod:`dreamroute.eval.recorded` (:mod:`.recorded_outcomes`,
:mod:`.recorded_routellm`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import NoReturn

from dreamroute.errors import WorkloadError


def fail_line(path: Path, where: str, what: str, fix: str) -> NoReturn:
    """Raise WorkloadError ``{path}:{where}: {what}; {fix}.``"""
    raise WorkloadError(f"{path}:{where}: {what}; {fix}.")


def utf8_lines(fh, path: Path):
    """Lines (ends kept) of a file opened in binary mode, decoded as UTF-8 one at a time;
    a byte that is not UTF-8 raises WorkloadError naming the line and column."""
    for lineno, raw in enumerate(fh, start=1):
        try:
            yield raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
        except UnicodeDecodeError as exc:
            fail_line(path, f"{lineno}: column {exc.start + 1}",
                  f"byte 0x{raw[exc.start]:02x} is not UTF-8 ({exc.reason})",
                  "save the file as UTF-8 (e.g. `iconv -f latin1 -t utf-8 IN > OUT`)")


def json_lines(fh, path: Path, fix: str):
    """(line number, decoded record) for each non-blank line of an open JSONL file;
    a line that is not JSON raises WorkloadError naming it, with ``fix``."""
    for lineno, line in enumerate(utf8_lines(fh, path), start=1):
        if not line.strip():
            continue
        try:
            yield lineno, json.loads(line)
        except json.JSONDecodeError as exc:
            fail_line(path, str(lineno), f"not valid JSON ({exc.msg} at column {exc.colno})", fix)
