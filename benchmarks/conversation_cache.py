"""Reality cache end to end: MT-Bench conversations, interleaved, with and without the cache.

    DREAMROUTE_THREADS=1 .venv/bin/python benchmarks/conversation_cache.py --n 10 \
        --json benchmarks/results/conversation_cache.json

The first N two-turn conversations of MT-Bench's question.jsonl are answered by one
tier (``always:TIER``, default tactical), all first turns, then all second turns, as
a server sees interleaved users: by the time a conversation's second turn arrives,
the backend's KV holds another conversation. Run twice in one process, from empty
stores: with the reality cache, and without (cache disabled). Per second turn:
TTFT as the user sees it (restoring the state, scoring the turn's surprise, which
for a follow-up is the prefill of its new tokens, and the answer's own prefill to
its first token), prompt tokens evaluated, ATP.

    DREAMROUTE_THREADS=1 .venv/bin/python benchmarks/conversation_cache.py --n 10 --restart \
        --json benchmarks/results/conversation_restart.json

``--restart``: the restored follow-up before and after a restart, side by side in one run.
Each conversation is held twice (``ID#before``, ``ID#after``, the same first turn); all
first turns are answered, then the ``#before`` second turns, then the DreamRoute is closed
and a new one opened on the same store and KV directory (a restart), which answers the
``#after`` second turns. Both restore from disk (the backend holds another conversation by
then); per side: TTFT as above, ATP, cached tokens, which tier scored the surprise, and
whether the answers are the same.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from dreamroute import DreamRoute
from dreamroute.config import load_settings
from dreamroute.eval.workloads import load_workload

MT_BENCH = Path(__file__).resolve().parents[1].parent / "shared/data/routellm/mt_bench/question.jsonl"


def conversations(n: int) -> list[tuple[str, list[str]]]:
    by: dict[str, list[str]] = {}
    for it in load_workload(MT_BENCH).items:
        by.setdefault(it.meta["conversation"], []).append(it.prompt)
    return list(by.items())[:n]


def run(convs, tier: str, cache: bool, max_tokens: int, root: Path) -> dict:
    settings = load_settings(None)  # the machine's data dir: its bench calibration prices ATP
    settings = settings.model_copy(update={"cache": settings.cache.model_copy(
        update={"enabled": cache, "dir": root / "kv"})})
    out = []
    t0 = time.perf_counter()
    with DreamRoute(settings, db=root / "s.db", policy=f"always:{tier}") as dr:
        history = {cid: [] for cid, _ in convs}
        for k in range(2):
            for cid, turns in convs:
                msgs = history[cid] + [{"role": "user", "content": turns[k]}]
                ans = dr.complete(msgs, conversation_id=cid, max_tokens=max_tokens)
                history[cid] = msgs + [{"role": "assistant", "content": ans.text}]
                g = ans.final.generation
                r = ans.kv.get(tier)
                # time to first token as the user sees it: the restore, the surprise scoring (which
                # for a follow-up is the prefill of its new tokens) and the answer's own prefill
                scored = ans.surprise_s if ans.surprise_tier == tier else 0.0
                out.append({"conversation": cid, "turn": k, "prompt_tokens": g.prompt_tokens,
                            "evaluated_tokens": g.prompt_tokens - g.cached_tokens + (
                                g.prompt_tokens - r.tokens if r and r.hit and scored else 0),
                            "ttft_s": g.prefill_s + scored + (r.seconds if r else 0.0),
                            "restored": bool(r and r.hit), "atp_joules": ans.atp, "text": ans.text})
        cache_counts = dict(dr.kv.counts) if dr.kv else None
    second = [o for o in out if o["turn"] == 1]
    return {"cache": cache, "wall_s": time.perf_counter() - t0, "kv": cache_counts,
            "second_turn": {"n": len(second), "restored": sum(o["restored"] for o in second),
                            "ttft_s_mean": statistics.mean(o["ttft_s"] for o in second),
                            "ttft_s_median": statistics.median(o["ttft_s"] for o in second),
                            "prompt_tokens_mean": statistics.mean(o["prompt_tokens"] for o in second),
                            "evaluated_tokens_mean": statistics.mean(o["evaluated_tokens"] for o in second),
                            "atp_joules_mean": statistics.mean(o["atp_joules"] for o in second)},
            "turns": out}


def _follow_up(dr, tier: str, cid: str, msgs: list[dict], max_tokens: int) -> dict:
    """One turn's figures: TTFT as the user sees it, tokens, ATP, the surprise tier, restored."""
    ans = dr.complete(msgs, conversation_id=cid, max_tokens=max_tokens)
    g, r = ans.final.generation, ans.kv.get(tier)
    scored = ans.surprise_s if ans.surprise_tier == tier else 0.0
    return {"conversation": cid, "ttft_s": g.prefill_s + scored + (r.seconds if r else 0.0),
            "prompt_tokens": g.prompt_tokens, "cached_tokens": g.cached_tokens, "atp_joules": ans.atp,
            "surprise_atp_joules": ans.surprise_atp, "surprise_tier": ans.surprise_tier, "tier": ans.tier,
            "restored": bool(r and r.hit), "source": r.source if r else None, "text": ans.text}


def run_restart(convs, tier: str, max_tokens: int, root: Path) -> dict:
    """The restored second turn before and after a restart (see the module docstring)."""
    settings = load_settings(None)
    settings = settings.model_copy(update={"cache": settings.cache.model_copy(update={"dir": root / "kv"})})
    sides = ("before", "after")
    history: dict[str, list[dict]] = {}
    with DreamRoute(settings, db=root / "s.db", policy=f"always:{tier}") as dr:
        for side in sides:
            for cid, turns in convs:
                msgs = [{"role": "user", "content": turns[0]}]
                ans = dr.complete(msgs, conversation_id=f"{cid}#{side}", max_tokens=max_tokens)
                history[f"{cid}#{side}"] = msgs + [{"role": "assistant", "content": ans.text},
                                                   {"role": "user", "content": turns[1]}]
        before = [_follow_up(dr, tier, f"{cid}#before", history[f"{cid}#before"], max_tokens) for cid, _ in convs]
    t0 = time.perf_counter()
    with DreamRoute(settings, db=root / "s.db", policy=f"always:{tier}") as dr:   # the restart
        reopen_s = time.perf_counter() - t0
        after = [_follow_up(dr, tier, f"{cid}#after", history[f"{cid}#after"], max_tokens) for cid, _ in convs]

    def summary(rows):
        return {"n": len(rows), "restored": sum(o["restored"] for o in rows),
                "ttft_s_mean": statistics.mean(o["ttft_s"] for o in rows),
                "ttft_s_median": statistics.median(o["ttft_s"] for o in rows),
                "cached_tokens_mean": statistics.mean(o["cached_tokens"] for o in rows),
                "atp_joules_mean": statistics.mean(o["atp_joules"] for o in rows),
                "surprise_tiers": sorted({o["surprise_tier"] or "none" for o in rows})}
    same_first = sum(history[f"{c}#before"][1]["content"] == history[f"{c}#after"][1]["content"] for c, _ in convs)
    return {"tier": tier, "reopen_s": reopen_s, "same_first_answers": same_first,
            "same_second_answers": sum(b["text"] == a["text"] for b, a in zip(before, after)),
            "before": summary(before), "after": summary(after), "turns": {"before": before, "after": after}}


def main_restart(convs, tier: str, max_tokens: int, out: str | None) -> None:
    with tempfile.TemporaryDirectory(prefix="dreamroute-restart-") as d:
        res = run_restart(convs, tier, max_tokens, Path(d))
    print(f"{len(convs)} MT-Bench conversations on {tier}: the restored second turn before and after a "
          f"restart (reopened in {res['reopen_s']:.1f} s)")
    print("| | TTFT mean s | TTFT median s | cached tokens | ATP J/turn | surprise scored by | restored |")
    print("|---|---|---|---|---|---|---|")
    for side in ("before", "after"):
        r = res[side]
        print(f"| {side} restart | {r['ttft_s_mean']:.3f} | {r['ttft_s_median']:.3f} | {r['cached_tokens_mean']:.0f} "
              f"| {r['atp_joules_mean']:.2f} | {', '.join(r['surprise_tiers'])} | {r['restored']}/{r['n']} |")
    print(f"identical answers: first turns {res['same_first_answers']}/{len(convs)}, "
          f"second turns {res['same_second_answers']}/{len(convs)}")
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(res, indent=2))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=10)
    ap.add_argument("--tier", default="tactical")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--json")
    ap.add_argument("--restart", action="store_true", help="the restored follow-up before and after a restart")
    a = ap.parse_args()
    convs = conversations(a.n)
    if a.restart:
        return main_restart(convs, a.tier, a.max_tokens, a.json)
    res = {"tier": a.tier, "conversations": len(convs), "max_tokens": a.max_tokens}
    for cache in (True, False):
        with tempfile.TemporaryDirectory(prefix="dreamroute-conv-") as d:
            res["with_cache" if cache else "without_cache"] = run(convs, a.tier, cache, a.max_tokens, Path(d))
    w, wo = res["with_cache"]["second_turn"], res["without_cache"]["second_turn"]
    res["same_second_turn_answers"] = sum(
        x["text"] == y["text"] for x, y in zip(res["with_cache"]["turns"], res["without_cache"]["turns"])
        if x["turn"] == 1)
    print(f"{len(convs)} MT-Bench conversations on {a.tier}, second turns (interleaved):")
    print("| | TTFT mean s | TTFT median s | prompt tokens | evaluated tokens | ATP J/turn | restored |")
    print("|---|---|---|---|---|---|---|")
    for name, r in (("with cache", w), ("without cache", wo)):
        print(f"| {name} | {r['ttft_s_mean']:.2f} | {r['ttft_s_median']:.2f} | {r['prompt_tokens_mean']:.0f} "
              f"| {r['evaluated_tokens_mean']:.0f} | {r['atp_joules_mean']:.1f} | {r['restored']}/{r['n']} |")
    print(f"identical second-turn answers: {res['same_second_turn_answers']}/{w['n']}")
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
