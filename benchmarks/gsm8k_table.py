"""Print the GSM8K routing table from benchmarks/results/gsm8k100/*.json (written by gsm8k_routing.sh)."""

import json
from pathlib import Path

OUT = Path(__file__).parent / "results" / "gsm8k100"


def main() -> None:
    rows = []
    for name in ("always_sensory", "always_tactical", "always_specialized", "dreamroute"):
        p = OUT / f"{name}.json"
        if p.exists():
            rows.append((name, json.loads(p.read_text())))
    spec = dict(rows).get("always_specialized")
    budget = (OUT / "budget.txt").read_text().strip() if (OUT / "budget.txt").exists() else "?"
    print(f"| policy | n | accuracy | ATP/request (J) | ATP vs specialized | accuracy vs specialized | tier mix | escalations | audits |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, r in rows:
        rel_atp = f"{r['atp_per_request'] / spec['atp_per_request']:.1%}" if spec else "-"
        rel_acc = f"{r['accuracy'] / spec['accuracy']:.1%}" if spec and spec["accuracy"] else "-"
        mix = ", ".join(f"{k} {v}" for k, v in sorted(r["tier_counts"].items()))
        print(f"| {name} | {r['n']} | {r['accuracy']:.1%} | {r['atp_per_request']:.1f} | {rel_atp} | {rel_acc} "
              f"| {mix} | {r['escalations']} | {r['audits']} |")
    print(f"\nbudget (chosen on train.jsonl): {budget} J/request")


if __name__ == "__main__":
    main()
