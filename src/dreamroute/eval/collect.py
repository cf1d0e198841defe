"""``dreamroute collect``: record every tier's answer to every item, for offline replay.

Each chosen tier answers each item of a workload once — tier by tier, so each
model is loaded once — exactly as ``dreamroute run`` sends it: the item's
prompt as one user message, ``temperature=0``, ``max_tokens=320``. Every answer
is graded with the item's grader and appended as one JSON line in the
recorded-outcome format that :func:`dreamroute.eval.recorded.load_recorded`
reads (the format of ``shared/data/local_tiers/gsm8k_test_outcomes.jsonl``)::

    index, key, tier, model, identity, prompt, sent_prompt, gold, grader,
    predicted, correct, prompt_tokens, completion_tokens, cached_tokens,
    seconds, mean_logprob, atp_joules, finish_reason, response

``prompt`` is the bare question for GSM8K-style items (as in local_tiers),
``sent_prompt`` the user message exactly as sent. ``atp_joules`` is what a live
call costs: token counts × the tier's calibration (``dreamroute bench``, else
the estimate by model size; :func:`dreamroute.api.tier_costs`) × watts.

Items without a gold answer are skipped (replay needs graded outcomes).

Resumable: the output file is read first and (key, tier) pairs already in it
are skipped. Each line is written with flush + fsync, so a kill loses at most
the call in flight; a last line cut short by a kill is dropped (with a
warning) and recorded again. A line recorded from a different prompt under the
same key (another workload) is an error: use another ``--out``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from ..api import tier_costs
from ..config import Settings
from ..errors import ConfigError, WorkloadError
from ..store.store import Store
from ..grading import get_grader
from .workloads import GSM8K_PROMPT, Item, load_workload

__all__ = ["collect", "read_collected", "MAX_TOKENS"]

MAX_TOKENS = 320
_SUFFIX = GSM8K_PROMPT.split("{question}", 1)[1]


def read_collected(out: Path, console: Console | None = None) -> tuple[dict[tuple[str, str], dict], bool]:
    """Records already in ``out`` by (key, tier), repairing a last line cut short by a kill.

    Returns (records, repaired). A missing file gives ({}, False).

    Raises:
        WorkloadError: a complete line is not a JSON object with ``key`` and ``tier``.
    """
    if not out.exists():
        return {}, False
    data = out.read_bytes()
    done: dict[tuple[str, str], dict] = {}
    repaired = False
    lines = data.split(b"\n")
    tail = lines.pop()  # b"" when the file ends with a newline
    if tail.strip():
        try:
            rec = json.loads(tail)
            ok = isinstance(rec, dict)
        except (json.JSONDecodeError, UnicodeDecodeError):
            ok = False
        if ok:  # a whole record whose newline was lost: finish the line
            with out.open("ab") as fh:
                fh.write(b"\n")
                fh.flush()
                os.fsync(fh.fileno())
            lines.append(tail)
        else:
            if console is not None:
                console.print(f"[yellow]warning:[/] {out}: the last line (line {len(lines) + 1}) was cut short, "
                              "probably by a kill; dropping it and recording that call again")
            with out.open("r+b") as fh:
                fh.truncate(len(data) - len(tail))
                fh.flush()
                os.fsync(fh.fileno())
        repaired = True
    for lineno, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        try:
            rec = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise WorkloadError(f"{out}:{lineno}: not valid JSON ({exc}); --out must be a file written by "
                                "`dreamroute collect`: fix or delete that line, or choose another --out.") from exc
        if not isinstance(rec, dict) or not isinstance(rec.get("key"), str) or not isinstance(rec.get("tier"), str):
            raise WorkloadError(f"{out}:{lineno}: no 'key' and 'tier'; --out must be a file written by "
                                "`dreamroute collect`: choose another --out.")
        done[(rec["key"], rec["tier"])] = rec
    return done, repaired


def _bare_question(item: Item) -> str:
    """The question without the GSM8K instruction (what local_tiers calls ``prompt``)."""
    q = item.meta.get("question")
    if isinstance(q, str) and GSM8K_PROMPT.format(question=q) == item.prompt:
        return q
    if item.grader == "gsm8k" and item.prompt.endswith(_SUFFIX):
        return item.prompt[: -len(_SUFFIX)]
    return item.prompt


def collect(settings: Settings, spec: str, *, tiers: list[str] | None = None, limit: int | None = None,
            out: Path, console: Console | None = None, backends=None, seed: int = 0,
            max_tokens: int = MAX_TOKENS, progress: bool = True) -> dict:
    """Record every chosen tier's graded answer to every item of ``spec`` into ``out`` (JSONL).

    Args:
        settings: the hierarchy (tier order, models, watts) and the store holding calibration.
        spec: a workload (GSM8K JSONL, generic JSONL, ``builtin:arithmetic...``).
        tiers: tier names to run (default: all, cheapest first), run in this order.
        limit: first N items only.
        out: the JSONL file to append to (created with its folder).
        console: rich console for the progress bar and warnings.
        backends: tier → Backend, instead of building them from the settings (tests).
        seed: seed of a generated workload.

    Returns:
        ``{"out", "items", "tiers", "written", "skipped", "ungraded", "repaired", "per_tier":
        {tier: {"written", "correct"}}}`` — ``skipped`` counts (item, tier) pairs already in
        ``out``, ``ungraded`` items without a gold answer.

    Raises:
        WorkloadError: bad workload, or ``out`` holds other data. UnknownTierError: a
        tier is not in the hierarchy. ConfigError, ModelFileError, BackendError: as
        their names say (lines written before a failure stay; rerun to resume).
    """
    console = console or Console()
    out = Path(out)
    chosen = list(dict.fromkeys(tiers)) if tiers else settings.tier_names
    tier_cfg = {t: settings.tier(t) for t in chosen}  # UnknownTierError for a bad name
    if backends is not None:
        missing = [t for t in chosen if t not in backends]
        if missing:
            raise ConfigError(f"no backend given for tier(s) {missing}")
    items = load_workload(spec, limit=limit, seed=seed).items
    graded = [it for it in items if it.answer is not None]
    ungraded = len(items) - len(graded)
    if ungraded:
        console.print(f"[yellow]warning:[/] {ungraded} item(s) have no gold answer and are skipped "
                      "(replay needs graded outcomes)")
    done, repaired = read_collected(out, console)
    for it in graded:
        for t in chosen:
            rec = done.get((it.key, t))
            if rec is not None and rec.get("sent_prompt") != it.prompt:
                raise WorkloadError(
                    f"{out}: item {it.key!r} (tier {t!r}) was recorded from a different prompt than the "
                    f"workload {spec!r} sends now; choose another --out for this workload.")
    todo = {t: [it for it in graded if (it.key, t) not in done] for t in chosen}
    skipped = sum(len(graded) - len(v) for v in todo.values())
    positions = {it.key: i for i, it in enumerate(items)}
    per_tier = {t: {"written": 0, "correct": 0} for t in chosen}
    out.parent.mkdir(parents=True, exist_ok=True)
    store = Store(settings.db_path, instance_id=settings.store.instance_id)
    try:
        with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                      TextColumn("acc {task.fields[acc]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                      console=console, disable=not progress, transient=False) as bar, \
                out.open("a", encoding="utf-8") as fh:
            task = bar.add_task("collect", total=sum(len(v) for v in todo.values()), acc="-")
            for t in chosen:
                if not todo[t]:
                    continue
                own = backends is None
                if own:
                    from ..backends import make_backend

                    backend = make_backend(tier_cfg[t], settings, seed=seed)
                else:
                    backend = backends[t]
                try:
                    sub = settings.model_copy(update={"tiers": [tier_cfg[t]]})
                    cost = tier_costs(sub, store, {t: backend.identity})[t]
                    bar.update(task, description=t)
                    for it in todo[t]:
                        gen = backend.generate([{"role": "user", "content": it.prompt}], max_tokens=max_tokens,
                                               temperature=0.0)
                        grade = get_grader(it.grader).grade(gen.text, it.answer)
                        if gen.prompt_tokens or gen.completion_tokens:
                            atp = cost.joules(gen.prompt_tokens, gen.completion_tokens, gen.cached_tokens)
                        else:
                            atp = cost.joules_from_seconds(gen.seconds)
                        if "atp_joules" in gen.extra:
                            atp = float(gen.extra["atp_joules"])
                        rec = {
                            "index": it.meta.get("index", positions[it.key]), "key": it.key, "tier": t,
                            "model": tier_cfg[t].model, "identity": backend.identity,
                            "prompt": _bare_question(it), "sent_prompt": it.prompt, "gold": it.answer,
                            "grader": it.grader, "predicted": grade.predicted, "correct": bool(grade.correct),
                            "prompt_tokens": gen.prompt_tokens, "completion_tokens": gen.completion_tokens,
                            "cached_tokens": gen.cached_tokens, "seconds": round(gen.seconds, 4),
                            "mean_logprob": gen.mean_logprob, "atp_joules": round(atp, 6),
                            "finish_reason": gen.finish_reason, "response": gen.text,
                        }
                        fh.write(json.dumps(rec, ensure_ascii=False) + "\n")
                        fh.flush()
                        os.fsync(fh.fileno())
                        per_tier[t]["written"] += 1
                        per_tier[t]["correct"] += rec["correct"]
                        w = per_tier[t]["written"]
                        bar.update(task, advance=1, acc=f"{per_tier[t]['correct'] / w:.0%}")
                finally:
                    if own:
                        backend.close()
    finally:
        store.close()
    return {"out": str(out), "items": len(items), "tiers": chosen,
            "written": sum(v["written"] for v in per_tier.values()), "skipped": skipped,
            "ungraded": ungraded, "repaired": repaired, "per_tier": per_tier}
