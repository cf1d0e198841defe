"""A tier added to a store with history (issue 12): how soon it is tried and how much traffic it takes.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/exploration.py --json benchmarks/results/exploration.json

Scripted tiers on generated word problems (levels 1–5), budget 6 J/request (binding): a store
is filled with 500 experiences of ``brook`` (right up to 2 steps, ~2.5 J) and ``ridge`` (right
on every level, ~10 J); then ``delta`` (right on every level at a third of ridge's cost per
token: better per joule) is added between them and the router runs 200 more requests from
that store. The same as tests/test_exploration.py, for 5 seeds; plus the variant where the new
tier is *worse* (right up to 1 step only), to show it is tried and then left.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.conftest import problem_answers  # noqa: E402
from tests.test_exploration import backend, settings_for  # noqa: E402

from dreamroute import DreamRoute  # noqa: E402


def one(seed: int, delta_level: int) -> dict:
    items, answers = problem_answers(800, seed=seed)
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        db = tmp / "s.db"
        with DreamRoute(settings_for(tmp, [("brook", 0.3), ("ridge", 1.5)]), db=db, budget=6.0, seed=seed,
                        backends={"brook": backend("brook", answers, 2, 0.01),
                                  "ridge": backend("ridge", answers, 5, 0.05)}) as dr:
            i = 0
            while dr.store.count_experiences() < 500:
                it = items[i]
                dr.complete(it.prompt, gold=it.answer, grader=it.grader, item_key=it.key)
                i += 1
        with DreamRoute(settings_for(tmp, [("brook", 0.3), ("delta", 0.5), ("ridge", 1.5)]), db=db, budget=6.0,
                        seed=seed, backends={"brook": backend("brook", answers, 2, 0.01),
                                             "delta": backend("delta", answers, delta_level, 0.017),
                                             "ridge": backend("ridge", answers, 5, 0.05)}) as dr:
            finals, calls, right = [], [], 0
            for it in items[i:i + 200]:
                ans = dr.complete(it.prompt, gold=it.answer, grader=it.grader, item_key=it.key)
                finals.append(ans.tier)
                calls.append([c.tier for c in ans.calls])
                right += ans.outcomes[ans.calls.index(ans.final)].outcome == "success"
            avg = dr.pacer.average
    first = next((k + 1 for k, c in enumerate(calls) if "delta" in c), None)
    return {"seed": seed, "delta_right_up_to_level": delta_level, "first_delta_call": first,
            "delta_calls_first_100": sum("delta" in c for c in calls[:100]),
            "answering_101_200": dict(Counter(finals[100:])), "accuracy_200": right / 200, "atp_per_request": avg}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()
    rows = [one(s, lvl) for lvl in (5, 1) for s in range(a.seeds)]
    for r in rows:
        print(json.dumps(r))
    if a.json:
        a.json.write_text(json.dumps({"budget": 6.0, "runs": rows}, indent=2))


if __name__ == "__main__":
    main()
