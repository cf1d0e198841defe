"""Validating a DREAM candidate and the promotion gate: the ``evaluate`` and ``decide`` stages of
:class:`~dreamroute.dream.dream.Dreamer` (mixed into it; it needs the dreamer's ``store``,
``config``, ``settings``, ``cycle``, ``perplexity_source`` and ``_record``).

The candidate is measured against its base on the held-out slice, a regression set of generated
problems and MT-Bench perplexity; :meth:`EvaluateAndDecide.decide` promotes it (with starting
trust from its validation results, never copied from the old version) or rejects it.
"""

from __future__ import annotations

from ..eval.generated import generate_problems
from ..grading import get_grader, parse_number
from ..signals.trust import TrustState
from ..store.schema import TrustUpdate
from .select import Plan, ReplayItem


def item_grader(item: ReplayItem) -> tuple[str, str | None]:
    """(grader, reference) for a held-out item: its gold answer (numeric → ``gsm8k``, else ``exact``),
    else the teacher's own final answer (a witnessed success) under the ``gsm8k`` grader when numeric."""
    if item.gold is not None:
        return ("gsm8k" if parse_number(item.gold) is not None else "exact"), item.gold
    ref = get_grader("gsm8k").extract(item.response)
    return ("gsm8k", ref) if ref is not None else ("exact", item.response.strip())


class EvaluateAndDecide:
    """Evaluation and the promotion decision of a Dreamer (mixed into it)."""

    # ------------------------------------------------------------------ evaluation
    def _accuracy(self, backend, items: list[tuple[str, str, str]]) -> tuple[float, list[bool]]:
        right = []
        for prompt, grader, ref in items:
            g = backend.generate([{"role": "user", "content": prompt}], max_tokens=320)
            right.append(bool(get_grader(grader).grade(g.text, ref).correct))
        return (sum(right) / len(right) if right else float("nan")), right

    def _perplexity(self, backend, prompts: list[str]) -> float:
        import math
        lps = []
        for p in prompts:
            lps += backend.score([{"role": "user", "content": p}])
        return math.exp(-sum(lps) / len(lps)) if lps else float("nan")

    def _eval_sets(self, plan: Plan):
        """(held-out items, regression items, perplexity prompts): (prompt, grader, reference) triples
        and MT-Bench first-turn questions."""
        from ..eval.workloads import load_workload
        held = [(it.prompt, *item_grader(it)) for it in plan.heldout]
        reg = [(it.prompt, it.grader, it.answer)
               for it in generate_problems(self.config.regression_items, seed=10_000 + self.config.seed)]
        ppl: list[str] = []
        if self.perplexity_source is not None and self.perplexity_source.exists() and self.config.perplexity_prompts:
            ppl = [i.prompt for i in load_workload(self.perplexity_source).items if i.meta.get("turn") == 0]
            ppl = ppl[: self.config.perplexity_prompts]
        return held, reg, ppl

    def _evaluate(self, plan: Plan) -> dict:
        """Held-out and regression accuracy and perplexity, before (the base) and after (with the
        adapter); each figure is recorded as soon as it is measured (a resumed cycle skips it)."""
        held, reg, ppl = self._eval_sets(plan)
        r = self.cycle["result"]
        version = self.store.get_version(self.cycle["version_id"])
        from ..backends import make_backend
        for phase in ("before", "after"):
            keys = [f"heldout_{phase}", f"regression_{phase}", f"perplexity_{phase}"]
            if all(k in r for k in keys):
                continue
            b = make_backend(self.settings.tier(self.student), self.settings)
            if phase == "after":
                b.use_adapter(version.adapter_path)
            try:
                if keys[0] not in r:
                    acc, right = self._accuracy(b, held)
                    self._record(**{keys[0]: acc, f"heldout_right_{phase}": right})
                if keys[1] not in r:
                    self._record(**{keys[1]: self._accuracy(b, reg)[0]})
                if keys[2] not in r:
                    self._record(**{keys[2]: self._perplexity(b, ppl)})
            finally:
                b.close()
        self._record("evaluate")
        return self.cycle["result"]

    # ------------------------------------------------------------------ gate
    def decide(self, plan: Plan) -> bool:
        """Promote the candidate if it beats the base on the held-out slice by ``promote_margin``
        and loses at most ``max_regression`` accuracy and ``max_perplexity_increase`` perplexity on
        the regression set; else reject it (kept on record). Returns whether it was promoted."""
        r, cfg = self.cycle["result"], self.config
        gain = r["heldout_after"] - r["heldout_before"]
        loss = r["regression_before"] - r["regression_after"]
        ppl_b, ppl_a = r.get("perplexity_before"), r.get("perplexity_after")
        ppl_rise = (ppl_a / ppl_b - 1.0) if ppl_b and ppl_a and ppl_b == ppl_b and ppl_a == ppl_a else 0.0
        reasons = []
        if not gain > cfg.promote_margin - 1e-12 or gain <= 0:
            reasons.append(f"held-out accuracy {r['heldout_before']:.3f} → {r['heldout_after']:.3f} "
                           f"(needs a gain > {cfg.promote_margin:.3f})")
        if loss > cfg.max_regression:
            reasons.append(f"regression accuracy fell {loss:.3f} > {cfg.max_regression:.3f}")
        if ppl_rise > cfg.max_perplexity_increase:
            reasons.append(f"perplexity rose {100 * ppl_rise:.1f}% > {100 * cfg.max_perplexity_increase:.1f}%")
        vid, witness = self.cycle["version_id"], f"dream:{self.cycle['id']}:validation"
        if reasons:
            self.store.set_version_status(vid, "rejected", witnesses=[witness], reason="; ".join(reasons))
            self._record("decided", promoted=False, reasons=reasons)
            self.store.update_cycle(self.cycle["id"], status="rejected")
            return False
        self.store.promote_version(vid, self._starting_trust(plan, vid), witnesses=[witness],
                                   reason=f"held-out +{gain:.3f}, regression -{loss:.3f}")
        self._record("decided", promoted=True, reasons=[])
        self.store.update_cycle(self.cycle["id"], status="promoted")
        return True

    def _starting_trust(self, plan: Plan, vid: int) -> list[TrustUpdate]:
        """Beta(prior + successes, prior + failures) of the new version's held-out answers, per
        context of the experiences they came from (all contexts get the overall figure where
        none was seen)."""
        rights = self.cycle["result"].get("heldout_right_after", [])
        ctx_of = {r["id"]: r["context"] for r in self.store.experiences(["id", "context"])}
        counts: dict[str, list[int]] = {}
        for it, ok in zip(plan.heldout, rights):
            c = counts.setdefault(ctx_of.get(it.experience_id, "stable"), [0, 0])
            c[0 if ok else 1] += 1
        a0, b0 = self.settings.router.prior_alpha, self.settings.router.prior_beta
        tot = [sum(c[0] for c in counts.values()), sum(c[1] for c in counts.values())]
        out = []
        for ctx in ("stable", "moving", "unstable", "novel"):
            s, f = counts.get(ctx, tot)
            st = TrustState(a0 + s, b0 + f, s + f)
            out.append(TrustUpdate(vid, ctx, a0, b0, st.alpha, st.beta, st.count,
                                   [f"dream:{self.cycle['id']}:validation"], "validation", None))
        return out
