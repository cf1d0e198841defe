"""``dreamroute run``: route a workload live, grade each answer, learn online, resume after a kill.

A run is keyed by (workload digest, policy and budget, seed); items already
graded in the latest attempt of that key are skipped, their learning kept
(it lives in the store). ``fresh=True`` starts a new attempt; nothing stored
is ever deleted. Every graded item is committed before the next starts, so a
kill loses at most the item in flight.

Faults are handled as the server handles them (``settings.server.cooldown_s``): a
failing tier is cooled and a routed item falls back to the cheapest available tier
the budget allows. An item no tier can answer within the budget
(:class:`~dreamroute.errors.NoTierAvailableError`) is recorded as failed (the store's
``background_work`` kind ``unanswered``, the summary's ``failed_items``, a console
line) and the run goes on; so are the later turns of its conversation in this
invocation. Failed items are not graded, so a rerun retries them. A run pinned to one
tier (``always:TIER``) stops at that tier's first failure (TierError), resumably.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from ..api import DreamRoute
from ..config import Settings
from ..errors import ConfigError, NoTierAvailableError, WorkloadError
from ..router.policies import make_policy
from ..store.store import Store
from .report import summarize_run
from .workloads import Item, iter_items, workload_digest


@dataclass
class RunResult:
    """What ``run_workload`` did: the summary (JSON of ``run --json``), the run id, items skipped."""

    summary: dict
    run_id: int
    skipped: int
    answered: int
    error: WorkloadError | None = None
    overhead_ms: list[float] = field(default_factory=list)
    failed: list[dict] = field(default_factory=list)  # {item, error}: items no tier could answer


def read_items(spec: str, limit: int | None, seed: int) -> tuple[list[Item], WorkloadError | None]:
    """The workload's items up to the first malformed line, and that line's error (or None)."""
    items: list[Item] = []
    try:
        for it in iter_items(spec, limit=limit, seed=seed):
            items.append(it)
    except WorkloadError as e:
        if not items:
            raise
        return items, e
    return items, None


def policy_key(policy: str, budget: float | None) -> str:
    return policy if budget is None else f"{policy}@budget={budget:g}"


def run_workload(settings: Settings, spec: str, *, policy: str = "dreamroute", budget: float | None = None,
                 seed: int = 0, limit: int | None = None, fresh: bool = False, db: str | Path | None = None,
                 backends=None, console: Console | None = None, progress: bool = True,
                 max_tokens: int = 320) -> RunResult:
    """Route every item of a workload, grade it, learn, and summarise the run.

    Args:
        settings: the hierarchy and router settings.
        spec: workload (GSM8K JSONL, generic JSONL, or ``builtin:arithmetic...``).
        policy / budget / seed: as for ``dreamroute run``; budget is J per request.
        limit: first N items only. fresh: start a new attempt instead of resuming.
        db: store path (default: the settings' store). backends: tier → Backend override.

    Returns a :class:`RunResult`; when a workload line is malformed, the items
    before it are answered and stored, and ``error`` holds the WorkloadError
    (the caller reports it).

    Raises:
        WorkloadError: the file is missing or its first record is malformed.
        ConfigError, ModelFileError, StoreError, BackendError (TierError: an ``always:TIER`` run's
        tier failed; an item no tier could answer is recorded as failed instead, see the module).
    """
    console = console or Console()
    if budget is not None and not budget >= 0:
        raise ConfigError(f"--budget must be >= 0 J per request (omit it for no budget), got {budget}")
    if seed < 0:
        raise ConfigError(f"--seed must be >= 0, got {seed}")
    if max_tokens < 1:
        raise ConfigError(f"--max-tokens must be >= 1, got {max_tokens}")
    make_policy(policy, settings.tier_names, settings.router, seed=seed)  # fail before anything is written
    items, error = read_items(spec, limit, seed)
    if not items and error is None:
        raise WorkloadError(f"workload {spec} has no items; give a file with at least one record")
    digest = workload_digest(items)
    store = Store(db or settings.db_path, instance_id=settings.store.instance_id)
    try:
        run_id = store.start_run(str(spec), digest, policy_key(policy, budget), seed, budget, fresh=fresh)
        done = store.graded_items(run_id)
        dr = DreamRoute(settings, policy=policy, budget=budget, seed=seed + len(done), backends=backends,
                        store=store, run_id=run_id, cooldown_s=settings.server.cooldown_s)
        _restore_pacing(dr, store, run_id)
        dr.start_sync()  # learn from other routers sharing the store meanwhile (store.sync: on for PostgreSQL)
        todo = [it for it in items if it.key not in done]
        overhead: list[float] = []
        failed: list[dict] = []
        try:
            with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                          TextColumn("acc {task.fields[acc]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                          console=console, disable=not progress, transient=False) as bar:
                task = bar.add_task(policy, total=len(todo), acc="-")
                right = graded = 0
                histories: dict[str, list[dict]] = {}
                broken: set[str] = set()  # conversations with a turn not answered in this invocation
                for it in todo:
                    conv = it.meta.get("conversation")
                    try:
                        if conv in broken:
                            raise NoTierAvailableError("an earlier turn of this conversation was not answered; "
                                                       "rerun to resume it")
                        if conv is None:
                            ans = dr.complete(it.prompt, gold=it.answer, grader=it.grader, item_key=it.key,
                                              max_tokens=max_tokens)
                        else:  # a conversation turn: sent with the turns before it and their answers
                            if conv not in histories:
                                histories[conv] = conversation_history(store, run_id, conv)
                            messages = histories[conv] + [{"role": "user", "content": it.prompt}]
                            ans = dr.complete(messages, conversation_id=conv, gold=it.answer, grader=it.grader,
                                              item_key=it.key, max_tokens=max_tokens)
                            histories[conv] = messages + [{"role": "assistant", "content": ans.text}]
                            dr.idle()  # between requests nothing else runs: warm handoffs go here
                    except NoTierAvailableError as e:  # recorded as failed (store, summary, console); go on
                        failed.append({"item": it.key, "error": str(e)})
                        if conv is not None:
                            broken.add(conv)
                        bar.update(task, advance=1)
                        console.print(f"[red]{escape(it.key)}: not answered[/]: {escape(str(e))}", highlight=False)
                        continue
                    overhead.append(ans.decision.overhead_ms)
                    final = ans.calls.index(ans.final)
                    if ans.outcomes[final].outcome in ("success", "failure") and it.answer is not None:
                        graded += 1
                        right += ans.outcomes[final].outcome == "success"
                    bar.update(task, advance=1, acc=f"{right / graded:.0%}" if graded else "-")
                    if progress and not console.is_terminal:  # a log file gets one line per item
                        console.print(f"[{bar.tasks[0].completed:.0f}/{len(todo)}] {it.key}: {ans.tier} "
                                      f"({ans.decision.context}) {ans.atp:.1f} J, accuracy so far "
                                      f"{right}/{graded}", highlight=False)
        finally:
            dr.stop_sync()
            for b in dr.backends.values():
                b.close()
        store.finish_run(run_id)
        summary = run_summary(store, run_id, overhead)
        summary.update(policy=policy, budget=budget, seed=seed, workload=str(spec), digest=digest,
                       run_id=run_id, resumed_items=len(done), failed_items=failed)
        if dr.kv is not None:
            summary["kv_cache"] = dict(dr.kv.counts, errors=dr.kv.errors[-5:],
                                       background_atp_joules=store.background_atp(run_id))
        return RunResult(summary, run_id, len(done), len(todo) - len(failed), error, overhead, failed)
    finally:
        store.close()


def run_summary(store: Store, run_id: int, overhead_ms: list[float]) -> dict:
    trust = [dict(tier=r.tier, model=r.model, context=r.context, trust=r.mean, n=r.count)
             for r in store.trust_table()]
    return summarize_run(store.experiences(run_id=run_id), trust, overhead_ms)


def conversation_history(store: Store, run_id: int, conversation: str) -> list[dict]:
    """The messages of a conversation's answered turns in this run (resuming mid-conversation):
    each turn's user prompt and the response that answered it (its last non-audit call)."""
    final: dict[str, dict] = {}
    for r in store.experiences(["request_id", "conversation_id", "turn", "prompt", "response", "role"],
                               run_id=run_id):
        if r["conversation_id"] == conversation and r["role"] != "audit":
            final[r["request_id"]] = r  # later calls of a request (escalations) replace earlier ones
    out: list[dict] = []
    for r in sorted(final.values(), key=lambda r: r["turn"]):
        out += [{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["response"]}]
    return out


def _restore_pacing(dr: DreamRoute, store: Store, run_id: int) -> None:
    """Replay the run's per-request ATP through the pacer so λ resumes where it was."""
    per_request: dict[str, float] = {}
    for r in store.experiences(["request_id", "atp_joules"], run_id=run_id):
        per_request[r["request_id"]] = per_request.get(r["request_id"], 0.0) + (r["atp_joules"] or 0.0)
    for atp in per_request.values():
        dr.pacer.update(atp)


def write_json(path: str | Path, obj) -> None:
    """Write JSON atomically (temp file + rename)."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_suffix(p.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str))
    tmp.replace(p)
