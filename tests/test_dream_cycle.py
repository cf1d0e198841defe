"""The DREAM cycle's bookkeeping: gate, promotion with starting trust, rejection, rollback, resume after a kill.

The heavy stages (teacher logprobs, LoRA training, export, llama.cpp evaluation) are replaced by
fakes that record fixed measurements; ``tests/test_dream_train.py`` and ``test_dream_export.py``
cover those stages themselves.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from dreamroute.backends.scripted import ScriptedBackend
from dreamroute.dream.dream import DreamError, Dreamer, rollback
from dreamroute.dream.dream_config import DreamConfig
from dreamroute.store.store import Store

from .conftest import scripted_settings


class FakeDreamer(Dreamer):
    """Dreamer with the model-running stages replaced: the measurements come from ``scores``."""

    def __init__(self, *a, scores, fail_at=None, **k):
        super().__init__(*a, **k)
        self.scores, self.fail_at, self.trained = scores, fail_at, 0

    def _labels(self, plan):
        self._record("labels", teacher_logprobs=0)
        return {}

    def _train(self, plan, labels):
        self.trained += 1
        self._record("train", steps=7, train_wall_s=1.0)
        return SimpleNamespace(model=None), None

    def _export(self, model, tok, plan):
        adapter = self.workdir / "adapter.gguf"
        adapter.write_bytes(b"fake adapter")
        vid = self.store.add_version(self.student, "sha-tactical", "tactical + dream", adapter_path=str(adapter),
                                     parent_id=self.cycle["base_version_id"], witnesses=["test"])
        self.store.update_cycle(self.cycle["id"], version_id=vid)
        self.cycle["version_id"] = vid
        self._record("export", export_correlation=0.99)
        return vid

    def _evaluate(self, plan):
        for key, value in self.scores.items():
            if key in self.cycle["result"]:
                continue
            if key == self.fail_at:
                raise KeyboardInterrupt("killed")
            self._record(**{key: value})
        self._record(heldout_right_after=[True, False] * (len(plan.heldout) // 2) + [True] * (len(plan.heldout) % 2))
        self._record("evaluate")
        return self.cycle["result"]


GOOD = {"heldout_before": 0.30, "regression_before": 0.60, "perplexity_before": 10.0,
        "heldout_after": 0.45, "regression_after": 0.60, "perplexity_after": 10.1}


def _store_with_teacher_answers(tmp_path, n=40):
    s = Store(tmp_path / "s.db")
    for i in range(n):
        s.record([dict(role="chosen", prompt=f"question {i}", tier="specialized", context="stable",
                       outcome="success", witness="ground_truth", salience=0.5, response="The answer is 1.",
                       gold="1")], [])
    return s


def _dreamer(tmp_path, store, scores=GOOD, **k):
    settings = scripted_settings(tmp_path)
    backends = {t: ScriptedBackend(f"sha-{t}", lambda m: "x") for t in ("tactical", "specialized")}
    cfg = DreamConfig(min_examples=5, heldout_fraction=0.25)
    return FakeDreamer(settings, store, cfg, student="tactical", teacher="specialized", backends=backends,
                       scores=scores, **k)


def test_better_adapter_is_promoted_with_trust_from_validation(tmp_path):
    with _store_with_teacher_answers(tmp_path) as s:
        d = _dreamer(tmp_path, s)
        rep = d.run()
        assert rep["promoted"] is True and rep["examples"] > 0 and rep["steps"] == 7
        active = s.active_versions()["tactical"]
        assert active.id == rep["version"] and active.adapter_path.endswith("adapter.gguf")
        trust = {r.context: r for r in s.trust_table() if r.model_version_id == active.id}
        held = len(d._plan_stage(None).heldout)
        right = (held + 1) // 2
        assert trust["stable"].alpha == pytest.approx(1 + right) and trust["stable"].beta == pytest.approx(1 + held - right)
        assert set(trust) == {"stable", "moving", "unstable", "novel"}
        assert s.verify_ledger().ok
        actions = [e["action"] for e in s.ledger_entries()][-6:]
        assert actions[-5] == "model.activate" and actions.count("trust.update") == 4
        assert s.cycles()[0]["status"] == "promoted"
        # rollback reactivates the base version
        assert rollback(s, "tactical") == d.cycle["base_version_id"]
        assert s.active_versions()["tactical"].adapter_path is None
        with pytest.raises(DreamError, match="no DREAM version"):
            rollback(s, "tactical")


def test_worse_adapter_is_rejected_and_kept_on_record(tmp_path):
    worse = dict(GOOD, heldout_after=0.25)
    with _store_with_teacher_answers(tmp_path) as s:
        base = s.active_versions().get("tactical")
        rep = _dreamer(tmp_path, s, scores=worse).run()
        assert rep["promoted"] is False and "held-out accuracy" in rep["reasons"][0]
        assert s.get_version(rep["version"]).status == "rejected"
        assert s.active_versions()["tactical"].adapter_path is None
        assert base is None or s.active_versions()["tactical"].id == base.id
    regressed = dict(GOOD, regression_after=0.50)
    with _store_with_teacher_answers(tmp_path / "b") as s:
        rep = _dreamer(tmp_path / "b", s, scores=regressed).run()
        assert rep["promoted"] is False and "regression accuracy" in " ".join(rep["reasons"])


def test_killed_cycle_changes_nothing_served_and_resumes(tmp_path):
    with _store_with_teacher_answers(tmp_path) as s:
        d = _dreamer(tmp_path, s, fail_at="heldout_after")
        with pytest.raises(KeyboardInterrupt):
            d.run()
        active = s.active_versions()["tactical"]
        assert active.adapter_path is None                      # nothing reached serving
        assert s.verify_ledger().ok and s.cycles()[0]["status"] == "running"
        assert s.cycles()[0]["stage"] == "export" and "heldout_before" in s.cycles()[0]["result"]
        d2 = _dreamer(tmp_path, s)
        rep = d2.run()
        assert d2.trained == 0                                  # training was not redone
        assert rep["promoted"] is True and rep["cycle"] == d.cycle["id"]


def test_too_few_examples_and_bad_tiers(tmp_path):
    with _store_with_teacher_answers(tmp_path, n=4) as s:
        with pytest.raises(DreamError, match="needs 5"):
            _dreamer(tmp_path, s).run()
        assert s.cycles() == []                                  # nothing put on record
        assert s.active_versions()["tactical"].adapter_path is None
        settings = scripted_settings(tmp_path)
        with pytest.raises(DreamError, match="bigger tier"):
            Dreamer(settings, s, DreamConfig(), student="specialized", teacher="tactical")
        plan = _dreamer(tmp_path, s).run(dry_run=True)
        assert plan["dry_run"] and plan["train"] + plan["heldout"] == 4


def test_missing_teacher_responses_are_asked_again_and_graded(tmp_path):
    with _store_with_teacher_answers(tmp_path) as s:
        for i in range(6):  # successes on record without their text (imported outcomes)
            s.record([dict(role="chosen", prompt=f"lost {i}", tier="specialized", context="stable",
                           outcome="success", witness="ground_truth", salience=0.9, response="", gold=str(i))], [])
        asked = []

        def teacher(messages):
            asked.append(messages[-1]["content"])
            i = int(messages[-1]["content"].split()[-1])
            return f"The answer is {i if i % 2 == 0 else 99}."  # right on even questions only

        d = _dreamer(tmp_path, s)
        d.backends["specialized"] = ScriptedBackend("sha-specialized", teacher)
        assert d.plan().missing == 6
        rep = d.run()
        assert sorted(asked) == [f"lost {i}" for i in range(6)]
        plan = d.fresh_responses(d._plan_stage(None))
        lost = {it.prompt: it.response for it in plan.train + plan.heldout if it.prompt.startswith("lost")}
        assert lost == {f"lost {i}": f"The answer is {i}." for i in (0, 2, 4)}  # wrong fresh answers dropped
        assert len(asked) == 6                                  # a resumed stage does not ask again
        assert d.cycle["result"]["fresh_responses"] == 3 and d.cycle["result"]["fresh_rejected"] == 3
        assert rep["promoted"] is True
