"""Store write and read speed: record() calls per second (2 experiences, 1 trust update, 1 ledger
entry each, SQLite with synchronous=FULL and the ledger head anchor), then one read of every row.

    .venv/bin/python benchmarks/store_throughput.py --n 400
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.test_store import exp, update  # noqa: E402  (the same rows the store tests write)

from dreamroute.store.store import Store  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=400)
    n = ap.parse_args().n
    with tempfile.TemporaryDirectory() as d, Store(Path(d) / "s.db") as s:
        mv = s.ensure_model_version("sensory", "sha256:aa", "SmolLM2")
        t0 = time.perf_counter()
        for i in range(n):
            s.record([exp(model_version_id=mv, item_key=f"q{i}"), exp(role="audit", model_version_id=mv)],
                     [update(mv, "novel", (1.0 + i, 1.0), True, i + 1, 0)])
        rate = n / (time.perf_counter() - t0)
        t0 = time.perf_counter()
        rows = s.experiences(["id", "tier", "context", "outcome", "atp_joules"])
        read_s = time.perf_counter() - t0
    print(f"record(): {rate:.0f} requests/s; read {len(rows)} rows in {read_s * 1000:.1f} ms "
          f"(load average {os.getloadavg()[0]:.2f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
