"""Print the replay table (benchmarks/results/replay/*.json) beside RouteLLM's published best routers."""

import json
from pathlib import Path

OUT = Path(__file__).parent / "results" / "replay"
# RouteLLM paper (Ong et al., "RouteLLM: Learning to Route LLMs with Preference Data", v4), best router per benchmark
PUBLISHED = {"mmlu": {"apgr": 0.603, "cpt50": 0.3540, "cpt80": 0.7031},
             "gsm8k": {"apgr": 0.622, "cpt50": 0.3364, "cpt80": 0.6326}}
CALLS_WEAK_EVERY_ITEM = {"dreamroute": "yes (weak answers first when its cost is 0; escalation reads the weak answer)",
                         "random": "no", "cascade": "yes"}
CALLS_WEAK_MMLU = {"dreamroute": "yes (its cost is 0; MMLU's recording has no response text, so the weak call "
                                 "tells the router nothing before it commits)", "random": "no", "cascade": "yes"}
CALLS_CHEAPEST_LOCAL = {"dreamroute": "no (the cheapest tier costs ATP here; decided per item)", "cascade": "yes",
                        "random": "no"}

CALLS = {"local": CALLS_CHEAPEST_LOCAL, "mmlu": CALLS_WEAK_MMLU}


def pct(v):
    return "never" if v is None else f"{100 * v:.1f}%"


def main() -> None:
    print("| data | router | order | seeds | APGR | CPT(50%) | CPT(80%) | AIQ | calls the cheapest tier on every item |")
    print("|---|---|---|---|---|---|---|---|---|")
    for data in ("gsm8k", "mmlu", "local"):
        if data in PUBLISHED:
            p = PUBLISHED[data]
            print(f"| {data} | RouteLLM best (paper v4; MMLU on 57 subjects) | - | - | {p['apgr']:.3f} "
                  f"| {pct(p['cpt50'])} | {pct(p['cpt80'])} | - | - |")
        for f in sorted(OUT.glob(f"{data}_*.json")):
            r = json.loads(f.read_text())
            if "apgr" not in r:
                continue  # a single setting: in the table below
            order = "file" if r.get("shuffle") is None else f"shuffled from seed {r['shuffle']}"
            name = r["policy"].split(":")[0]
            print(f"| {data} ({r['n']} items) | {r['policy']} | {order} | {r['seeds']} | {r['apgr']:.3f} "
                  f"| {pct(r['cpt']['50'])} | {pct(r['cpt']['80'])} | {r['aiq']:.3f} "
                  f"| {CALLS.get(data, CALLS_WEAK_EVERY_ITEM).get(name, '?')} |")


def single_settings() -> None:
    rows = [json.loads(f.read_text()) for f in sorted(OUT.glob("*.json"))]
    rows = [r for r in rows if "apgr" not in r]
    if not rows:
        return
    print()
    print("| data | router | budget | order | seeds | accuracy | ATP vs top tier | accuracy vs top tier | oracle |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        top = r["singles"][r["tiers"][-1]]
        frac = r["atp_joules"] / r["top_atp_joules"]
        order = "file" if r.get("shuffle") is None else f"shuffled from seed {r['shuffle']}"
        print(f"| {r['recording']} ({r['n']} items) | {r['policy']} | {r['budget']} | {order} | {r['seeds']} "
              f"| {100 * r['accuracy']:.1f}% | {100 * frac:.1f}% | {100 * r['accuracy'] / top['accuracy']:.1f}% "
              f"| {100 * r['oracle']['accuracy']:.1f}% at {100 * r['oracle']['cost_fraction']:.1f}% |")


if __name__ == "__main__":
    main()
    single_settings()
