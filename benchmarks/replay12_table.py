"""Tables of issue 12's replays (benchmarks/results/replay12/<encoder>/*.json), beside RouteLLM's
published routers and the random router (benchmarks/results/replay/*_random.json).

    .venv/bin/python benchmarks/replay12_table.py
"""

import json
from pathlib import Path

from dreamroute.eval import metrics

ROOT = Path(__file__).parent / "results"
OUT = ROOT / "replay12"
PUBLISHED = {"mmlu": {"apgr": 0.603, "cpt50": 0.3540}, "gsm8k": {"apgr": 0.622, "cpt50": 0.3364}}


def pct(v):
    return "never" if v is None else f"{100 * v:.1f}%"


def order(r):
    return "file" if r.get("shuffle") is None else f"shuffled (seeds {r['shuffle']}..{r['shuffle'] + r['seeds'] - 1})"


def _weak_strong(r):
    t = r["tiers"]
    return r["singles"][t[0]], r["singles"][t[-1]]


def ends(r) -> float:
    """APGR of the curve with always-cheapest (x 0) and always-top (x 1) added, as RouteLLM's own
    threshold sweeps always contain them."""
    weak, strong = _weak_strong(r)
    pts = [(p["cost_fraction"], p["accuracy"]) for p in r["points"]]
    pts += [(weak["cost_fraction"], weak["accuracy"]), (strong["cost_fraction"], strong["accuracy"])]
    return metrics.apgr(pts, weak["accuracy"], strong["accuracy"], weak["cost_fraction"])


def span(r) -> str:
    weak, _ = _weak_strong(r)
    xs = [metrics.rescale_cost(p["cost_fraction"], weak["cost_fraction"]) for p in r["points"]]
    return f"{min(xs):.2f}–{max(xs):.2f}"


def curves() -> None:
    print("| data | router | encoder | order | seeds | APGR | APGR with (0, weak) and (1, strong) | CPT(50%) | CPT(80%) "
          "| AIQ | curve's x span |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for data in ("gsm8k", "mmlu", "local"):
        if data in PUBLISHED:
            p = PUBLISHED[data]
            print(f"| {data} | RouteLLM best published (paper v4) | - | - | - | {p['apgr']:.3f} | (its sweeps include both) "
                  f"| {pct(p['cpt50'])} | - | - | 0–1 |")
            rnd = ROOT / "replay" / f"{data}_random.json"
            if rnd.exists():
                r = json.loads(rnd.read_text())
                print(f"| {data} | random | - | {order(r)} | {r['seeds']} | {r['apgr']:.3f} | {ends(r):.3f} "
                      f"| {pct(r['cpt']['50'])} | {pct(r['cpt']['80'])} | {r['aiq']:.3f} | {span(r)} |")
        for enc_dir in sorted(OUT.iterdir()) if OUT.exists() else []:
            for f in sorted(enc_dir.glob(f"{data}_*.json")):
                r = json.loads(f.read_text())
                if "apgr" not in r:
                    continue
                print(f"| {data} ({r['n']} items) | dreamroute | {enc_dir.name} | {order(r)} | {r['seeds']} "
                      f"| {r['apgr']:.3f} | {ends(r):.3f} | {pct(r['cpt']['50'])} | {pct(r['cpt']['80'])} "
                      f"| {r['aiq']:.3f} | {span(r)} |")


def singles() -> None:
    print()
    print("| data | encoder | budget | order | seeds | accuracy | of top tier's | ATP vs top tier | whole run / budget "
          "| max running avg after 50 / budget | tier mix (answering) | oracle |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for enc_dir in sorted(OUT.iterdir()) if OUT.exists() else []:
        for f in sorted(enc_dir.glob("*.json")):
            r = json.loads(f.read_text())
            if "apgr" in r:
                continue
            top = r["singles"][r["tiers"][-1]]
            frac = r["atp_joules"] / r["top_atp_joules"]
            sp = r.get("spend_seeds") or []
            whole = max((s["whole_run_ratio"] for s in sp if s["whole_run_ratio"] is not None), default=None)
            run50 = max((s["max_running_ratio_after"] for s in sp if s["max_running_ratio_after"] is not None),
                        default=None)
            b = "none" if r["budget"] is None else (f"{r['budget']:.2f} J ({100 * r['budget_fraction']:.0f}% of top)"
                                                  if r.get("budget_fraction") else f"{r['budget']:.2f} J")
            mix = ", ".join(f"{t} {v:.0f}" for t, v in sorted(r["tier_counts"].items()))
            fmt = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
            print(f"| {r['recording']} ({r['n']}) | {enc_dir.name} | {b} | {order(r)} | {r['seeds']} "
                  f"| {100 * r['accuracy']:.1f}% | {100 * r['accuracy'] / top['accuracy']:.1f}% | {100 * frac:.1f}% "
                  f"| {fmt(whole)} (worst seed) | {fmt(run50)} | {mix} "
                  f"| {100 * r['oracle']['accuracy']:.1f}% at {100 * r['oracle']['cost_fraction']:.1f}% |")


if __name__ == "__main__":
    curves()
    singles()
