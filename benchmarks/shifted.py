"""Shifted recordings (issue 12): whole-run and windowed spend against the budget, accuracy beside the oracle's.

    .venv/bin/python benchmarks/shifted.py --source ../shared/data/gsm8k/test.jsonl --json benchmarks/results/shifted/test.json --plot-dir benchmarks/results/shifted
    .venv/bin/python benchmarks/shifted.py --source ../shared/data/gsm8k/train.jsonl --grid   # the settings search (training data)

Builds recordings from a GSM8K file's questions (each item's level from its number of
solution steps: ≤ 2 → every tier right, 3–4 → the middle and top tiers, ≥ 5 → only the top
tier; :mod:`dreamroute.eval.shifted`), three tiers named swift < steady < sage costing
1 : 4 : 10 J (± 20 % per call), in the patterns easy→hard, hard→easy, bursts and mixed,
and replays the live router (``dreamroute`` policy, empty store) over each, for 3 seeds,
at a budget of half the top tier's ATP (5 J). Reports, per pattern: accuracy, the
offline optimum within the budget (hindsight), whole-run spend / budget, the largest
running average after the first 50 requests / budget, the largest 50-request window /
budget, and accuracy per segment. ``--grid`` runs the settings search on the file given.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from conftest import scripted_settings  # noqa: E402

from dreamroute.eval.shifted import PATTERNS, arrange, levelled_items, oracle_accuracy_within, recording  # noqa: E402
from dreamroute.eval.simulate import replay_once  # noqa: E402
from dreamroute.eval.spend import plot_spend, segment_summary, spend_summary  # noqa: E402

BUDGET = 5.0


def run_suite(pool, router: dict, *, n: int, seeds: int, patterns=PATTERNS, keep_traces: bool = False) -> dict:
    out = {}
    for pattern in patterns:
        rows = []
        for seed in range(seeds):
            items, marks = arrange(pool, pattern, n, seed=seed, shift=0.5)
            rs = recording(items, seed=seed, name=f"{pattern}-{seed}")
            settings = scripted_settings(Path(tempfile.mkdtemp()), **router)
            run = replay_once(settings, rs, "dreamroute", budget=BUDGET, seed=seed, shuffle=None)
            orc = oracle_accuracy_within(rs, BUDGET)
            row = {"seed": seed, "accuracy": run.accuracy, "oracle_accuracy": orc[0], "oracle_atp": orc[1],
                   "marks": marks, **spend_summary(run.trace, BUDGET), "segments": segment_summary(run.trace, marks)}
            if keep_traces:
                row["trace"] = run.trace
            rows.append(row)
        out[pattern] = rows
    return out


def score(res: dict) -> dict:
    rows = [r for rs in res.values() for r in rs]
    return {"accuracy_over_oracle": float(np.mean([r["accuracy"] / r["oracle_accuracy"] for r in rows])),
            "max_whole": max(r["whole_run_ratio"] for r in rows),
            "max_running_after_50": max(r["max_running_ratio_after"] for r in rows)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--source", default="../shared/data/gsm8k/train.jsonl")
    ap.add_argument("--n", type=int, default=600)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--grid", action="store_true")
    ap.add_argument("--grid-spec", help="JSON for --grid: {router setting: [values]} (their product) or "
                                        "[{router setting: value}, ...]")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--plot-dir", type=Path)
    a = ap.parse_args()
    pool = levelled_items(a.source)
    if a.grid:
        grid = json.loads(a.grid_spec) if a.grid_spec else {
            "thompson_coupling": [0.8, 0.95], "pacing_lambda_floor": [0.05, 0.1],
            "pacing_bank_horizon": [100, 200], "pacing_cap": [1.03]}
        combos = ([dict(zip(grid, values)) for values in itertools.product(*grid.values())]
                  if isinstance(grid, dict) else grid)  # a dict of lists (product) or a list of settings
        results = []
        for router in combos:
            t0 = time.time()
            sc = score(run_suite(pool, router, n=a.n, seeds=a.seeds))
            results.append({"router": router, **sc})
            print(json.dumps(results[-1]), f"{time.time() - t0:.0f}s", flush=True)
        if a.json:
            a.json.parent.mkdir(parents=True, exist_ok=True)
            a.json.write_text(json.dumps({"source": a.source, "n": a.n, "seeds": a.seeds, "grid": results}, indent=2))
        return
    res = run_suite(pool, {}, n=a.n, seeds=a.seeds, keep_traces=a.plot_dir is not None)
    for pattern, rows in res.items():
        print(f"{pattern:10s} acc {np.mean([r['accuracy'] for r in rows]):.3f} oracle "
              f"{np.mean([r['oracle_accuracy'] for r in rows]):.3f} whole {max(r['whole_run_ratio'] for r in rows):.3f} "
              f"max running after 50 {max(r['max_running_ratio_after'] for r in rows):.3f} "
              f"max 50-window {max(r['max_window_ratio'] for r in rows):.2f}")
    if a.plot_dir:
        for pattern, rows in res.items():
            plot_spend(a.plot_dir / f"{pattern}.png", {f"seed {r['seed']}": r.pop("trace") for r in rows}, BUDGET,
                       f"{pattern}: running ATP per request (swift:steady:sage = 1:4:10 J, budget {BUDGET:g} J)",
                       marks=rows[0]["marks"])
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps({"source": a.source, "n": a.n, "seeds": a.seeds, "budget": BUDGET,
                                      "tiers": ["swift", "steady", "sage"], "costs": [1, 4, 10],
                                      "patterns": res, "score": score(res)}, indent=2))


if __name__ == "__main__":
    main()
