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

The pieces: the data classes and what is computed from them live in
:mod:`dreamroute.eval.recorded_set`, the JSONL reader in :mod:`dreamroute.eval.recorded_outcomes`,
the CSV reader in :mod:`dreamroute.eval.recorded_routellm`, and the line-by-line file reading
they share in :mod:`dreamroute.eval.recorded_io`; this module picks the reader.
"""

from __future__ import annotations

from pathlib import Path

from dreamroute.errors import WorkloadError

from .recorded_io import json_lines
from .recorded_outcomes import load_outcomes
from .recorded_routellm import CONTAMINATED_FILE, load_routellm
from .recorded_set import RecordedSet, recorded_digest

__all__ = ["load_recorded"]

_DATA_SUFFIXES = (".csv", ".jsonl")


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
        tiers, items, dropped, models = load_routellm(files)
    else:
        tiers, items, models = load_outcomes(files)
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
                for _lineno, rec in json_lines(fh, path, "write one JSON object per line"):
                    if isinstance(rec, dict) and "tier" in rec and "correct" in rec:
                        return "outcomes"
                    break
        except OSError as exc:
            raise WorkloadError(f"cannot read {str(path)!r}: {exc}.") from exc
    raise WorkloadError(f"{str(path)!r} is not a recorded source dreamroute knows: expected a "
                        "recorded-outcome JSONL (one line per item and tier with 'tier' and 'correct'), "
                        "or a RouteLLM CSV (prompt plus one True/False column per model). A workload of "
                        "prompts is run with `dreamroute run`, or recorded with `dreamroute collect`.")
