"""Replay drives the live router: bandit feedback, charges, metrics, and no grade reaches the router early."""

from __future__ import annotations

import csv
import random

import numpy as np

from dreamroute.eval.recorded import load_recorded
from dreamroute.eval.simulate import replay_once, simulate

from .conftest import scripted_settings


def write_routellm_csv(path, n=500, seed=0):
    """A RouteLLM-style recording where the weak model's answer form predicts its correctness."""
    rng = random.Random(seed)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["prompt", "weak-model", "strong-model", "weak-model_response"])
        for i in range(n):
            well_formed = rng.random() < 0.7
            weak_ok = rng.random() < (0.85 if well_formed else 0.1)
            strong_ok = rng.random() < 0.9
            resp = f"Some steps.\n#### {i}" if well_formed else f"hmm, maybe {i} or {i + 1}"
            w.writerow([f"Question {i}: what is {i} plus {rng.randint(1, 9)} apples?", weak_ok, strong_ok, resp])
    return path


def test_grades_shuffled_across_items_make_routing_no_better_than_random(tmp_path):
    rec = load_recorded(write_routellm_csv(tmp_path / "gsm8k_synthetic.csv"))
    settings = scripted_settings(tmp_path)
    real = simulate(settings, rec, policy="dreamroute", sweep=5, progress=False)
    rng = np.random.default_rng(1)
    keys = [it.key for it in rec.items]
    shuffled = {}
    for tier in rec.tiers:  # each tier's grades permuted across items: form no longer predicts them
        perm = rng.permutation(len(keys))
        for k, j in zip(keys, perm):
            shuffled[(k, tier)] = rec.items[j].calls[tier].correct
    blind = simulate(settings, rec, policy="dreamroute", sweep=5, progress=False, grades=shuffled)
    assert real["apgr"] > 0.6
    assert 0.3 < blind["apgr"] < 0.65
    assert real["apgr"] - blind["apgr"] > 0.1


def test_replay_charges_audits_and_escalations(tmp_path):
    rec = load_recorded(write_routellm_csv(tmp_path / "gsm8k_synthetic.csv", n=120))
    settings = scripted_settings(tmp_path, audit_base=0.5, audit_novelty=0.0)
    # no budget: audits allowed; cascade at 0.9 escalates every malformed weak answer
    run = replay_once(settings, rec, "dreamroute", budget=None, seed=0, shuffle=None)
    assert run.audits > 0
    assert run.top_calls == run.calls.get("strong", 0)
    # every strong call, whatever its role, costs 1 and weak calls 0
    assert run.atp == run.calls.get("strong", 0)
    casc = replay_once(settings, rec, "cascade:0.9", budget=None, seed=0, shuffle=None)
    assert casc.escalations > 0 and casc.atp == casc.escalations
    malformed = sum(1 for it in rec.items if "####" not in it.calls["weak"].response)
    assert casc.escalations == malformed


def test_simulate_reports_singles_oracle_and_metrics(tmp_path):
    rec = load_recorded(write_routellm_csv(tmp_path / "gsm8k_synthetic.csv", n=200))
    res = simulate(scripted_settings(tmp_path), rec, policy="random", sweep=3, progress=False)
    assert res["singles"]["weak"]["cost_fraction"] == 0.0
    assert res["singles"]["strong"]["cost_fraction"] == 1.0
    weak_acc = np.mean([it.calls["weak"].correct for it in rec.items])
    assert abs(res["singles"]["weak"]["accuracy"] - weak_acc) < 1e-9
    oracle_acc = np.mean([it.calls["weak"].correct or it.calls["strong"].correct for it in rec.items])
    assert abs(res["oracle"]["accuracy"] - oracle_acc) < 1e-9
    assert [round(p["knob"], 3) for p in res["points"]] == [0.0, 0.5, 1.0]
    assert set(res["cpt"]) == {"20", "50", "80"} and 0.0 <= res["aiq"] <= 1.0
