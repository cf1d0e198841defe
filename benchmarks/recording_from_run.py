"""Replace one tier's outcomes in a recorded-outcome file with a live run's, for replay.

The DREAM experiment (issue 5) measures the student tier before and after a cycle with
``dreamroute run WORKLOAD --policy always:TIER`` (the same command both times). To ask how
routing changes when that tier changes, the router is replayed (``dreamroute simulate``)
over a recording in which every other tier answers as recorded and this tier answers as it
did in the run. This script builds that recording:

    .venv/bin/python benchmarks/recording_from_run.py --db RUN.db --run-id N --tier tactical \
        --base ../shared/data/local_tiers/gsm8k_test_outcomes.jsonl --out FILE.jsonl

Items are matched by GSM8K index (``gsm8k:{index}`` item keys, the ``index`` field of the
base file). Every line of the output keeps the base file's fields; the replaced tier's lines
take the run's response, grade, token counts, wall seconds and mean logprob. ``atp_joules`` is
left out of every line, so the replay costs all tiers the same way (token counts × the tier's
calibration), as it does for the base file. Fails if the run lacks an item of the base file.
"""

from __future__ import annotations

import argparse
import json
import sqlite3
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--db", required=True, type=Path)
    ap.add_argument("--run-id", required=True, type=int)
    ap.add_argument("--tier", required=True)
    ap.add_argument("--base", required=True, type=Path)
    ap.add_argument("--out", required=True, type=Path)
    a = ap.parse_args(argv)

    con = sqlite3.connect(f"file:{a.db}?mode=ro", uri=True)
    rows = con.execute(
        "SELECT item_key, response, outcome, predicted, prompt_tokens, completion_tokens, latency_s, "
        "mean_logprob FROM experiences WHERE run_id = ? AND tier = ? AND role = 'chosen'",
        (a.run_id, a.tier)).fetchall()
    run = {}
    for key, response, outcome, predicted, pt, ct, secs, mlp in rows:
        if key and key.startswith("gsm8k:"):
            run[int(key.split(":", 1)[1])] = dict(
                response=response, correct=outcome == "success", predicted=predicted, prompt_tokens=pt,
                completion_tokens=ct, seconds=secs, mean_logprob=mlp)
    out, replaced, right = [], 0, 0
    for line in a.base.read_text().splitlines():
        if not line.strip():
            continue
        rec = json.loads(line)
        rec.pop("atp_joules", None)
        if rec["tier"] == a.tier:
            if rec["index"] not in run:
                sys.exit(f"run {a.run_id} in {a.db} has no {a.tier} answer to gsm8k:{rec['index']}; "
                         "finish the run first")
            rec.update(run[rec["index"]])
            rec["model"] = f"{rec['model']} (run {a.run_id} of {a.db.name})"
            replaced += 1
            right += rec["correct"]
        out.append(json.dumps(rec))
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text("\n".join(out) + "\n")
    print(f"{a.out}: {len(out)} lines, {replaced} {a.tier} lines from run {a.run_id} "
          f"({right}/{replaced} correct)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
