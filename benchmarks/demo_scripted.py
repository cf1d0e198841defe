"""`dreamroute demo`'s job on scripted tiers: which tiers the router tries in its first requests.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/demo_scripted.py --out benchmarks/results/demo_scripted.txt

The same code path as `dreamroute demo` (`run_workload` on ``builtin:arithmetic?n=40``, policy
``dreamroute``, budget 90 J/request, an empty store) with the default hierarchy's tier names and
sizes, but scripted backends instead of llama.cpp (this machine's shared cores are not for real
models): each answers ~200 words, so its ATP is what the size estimate gives a real answer of
that length (sensory ≈ 35 J, tactical ≈ 60 J, specialized ≈ 127 J: above the budget), and it is
right on the levels a real tier of its size tends to manage (sensory: 1 step, one problem in
three; tactical: up to 2 steps; specialized: up to 4). Prints the per-request lines and the
demo's report, then the request at which each tier was first called, for 3 seeds.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from rich.console import Console

from dreamroute.backends.scripted import ScriptedBackend
from dreamroute.config import Settings, TierConfig
from dreamroute.eval.generated import generate_problems
from dreamroute.eval.report import print_report
from dreamroute.eval.runner import run_workload
from dreamroute.store.store import Store

TIERS = (("sensory", 0.135, 1), ("tactical", 0.5, 2), ("specialized", 1.5, 4))
PAD = " ".join(["step"] * 190)


def backends(answers: dict) -> dict:
    def make(name, max_level):
        def script(messages):
            gold, level = answers.get(messages[-1]["content"], ("0", 9))
            ok = level <= max_level and (name != "sensory" or hash(messages[-1]["content"]) % 3 == 0)
            return f"{PAD} The answer is {gold}." if ok else f"{PAD} I think it is about 3 or maybe 4"
        return ScriptedBackend(f"scripted-{name}", script, logprob=-0.3)
    return {n: make(n, lvl) for n, _, lvl in TIERS}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path)
    ap.add_argument("--seeds", type=int, default=3)
    a = ap.parse_args()
    fh = open(a.out, "w") if a.out else sys.stdout
    console = Console(file=fh, width=110, force_terminal=False)
    for seed in range(a.seeds):
        answers = {it.prompt: (it.answer, it.meta["level"]) for it in generate_problems(40, seed=seed)}
        with tempfile.TemporaryDirectory() as d:
            settings = Settings(tiers=[TierConfig(name=n, model=f"scripted-{n}", backend="scripted", params_b=p)
                                       for n, p, _ in TIERS], data_dir=Path(d))
            db = Path(d) / "demo.db"
            console.print(f"[bold]demo on scripted tiers[/], seed {seed}: 40 arithmetic word problems, budget 90 J/request")
            res = run_workload(settings, "builtin:arithmetic?n=40", policy="dreamroute", budget=90.0, seed=seed,
                               fresh=True, db=db, backends=backends(answers), console=console, progress=True)
            print_report(res.summary, settings.tier_names, console, title=f"demo (scripted), seed {seed}")
            with Store(db) as store:
                rows = store.experiences(["request_id", "tier", "id"])
            order = {}
            for r in rows:
                order.setdefault(r["request_id"], len(order))
            first = {}
            for r in rows:
                first.setdefault(r["tier"], order[r["request_id"]] + 1)
            console.print("first called at request: " + ", ".join(f"{t} {first.get(t, 'never')}" for t, _, _ in TIERS))
            console.print()
    if a.out:
        fh.close()


if __name__ == "__main__":
    main()
