"""The engine's learning side: judging an answer, and learning from it once committed.

Its own file because it runs after :meth:`~dreamroute.router.engine.Engine.answer` has
returned and shares none of the answering side's per-request state (restores, timings, the
fault plan): it turns an answer and its outcomes into records, commits them, and applies
them to the learned state; and it owns the warm handoffs a surprising turn queues, which
:meth:`Learning.idle` runs when the machine has nothing else to do.
:class:`~dreamroute.router.engine.Engine` takes it as a mixin; it depends on the engine's
attributes only (never on its module), so the dependency runs one way.

Learning is a group commit (:mod:`dreamroute.router.commit`): a request's records are built
under the state lock, written with those of the requests that finish meanwhile in one
transaction (one fsync) without the lock, then applied to the learned state in commit order
under it; the request returns once its records are committed and learned.
"""

from __future__ import annotations

import math

from ..cache.response import fastpath_key
from ..cache.reuse import Prefill
from ..grading import get_grader
from ..signals.features import snarc
from ..signals.trust import TrustState
from ..store.store import TrustUpdate
from .memory import OUTCOME_VALUE
from .types import Answer, Call, Outcome


def normalise_prompt(text: str) -> str:
    """Casefolded, whitespace-collapsed prompt (the exact-repeat key)."""
    return " ".join(text.casefold().split())


def _same_answer(a: Call, b: Call) -> bool:
    if a.predicted is not None or b.predicted is not None:
        return a.predicted is not None and a.predicted == b.predicted
    return normalise_prompt(a.text) == normalise_prompt(b.text)


class Learning:
    """The judging and learning methods of :class:`~dreamroute.router.engine.Engine` (a mixin).

    Uses the engine's ``state``, ``store``, ``memory``, ``pacer``, ``commits``, ``config``,
    ``run_id``, ``tiers``, ``kv``, ``handoff``, ``responses``, ``cooldown``, ``gates``,
    ``backends``, ``metabolic``, ``policy`` and :meth:`~dreamroute.router.engine.Engine.policy_for`.
    """

    # ---- judging and learning --------------------------------------------------------
    def judge(self, answer: Answer, gold: str | None = None) -> list[Outcome]:
        """Outcome per call: graded against ``gold`` when given, else by audit agreement, else unknown."""
        req = answer.request
        grader = get_grader(req.grader) if req.grader else None
        if gold is not None and grader is not None:
            out = []
            for c in answer.calls:
                g = grader.grade(c.text, gold)
                oc = "success" if g.correct else "failure"
                out.append(Outcome(oc, "ground_truth", OUTCOME_VALUE[oc], gold, g.predicted))
            return out
        audit = next((c for c in answer.calls if c.role == "audit"), None)
        out = [Outcome("unknown", "none", None, None, c.predicted) for c in answer.calls]
        if audit is not None:
            final = answer.final
            agree = _same_answer(final, audit)
            i = answer.calls.index(final)
            oc = "success" if agree else "failure"
            out[i] = Outcome(oc, f"audit:{audit.tier}", OUTCOME_VALUE[oc], None, final.predicted)
        return out

    def learn(self, answer: Answer, outcomes: list[Outcome]) -> list[int]:
        """Write experiences, trust updates and ledger entries (one transaction, shared with the
        requests finishing meanwhile: :attr:`commits`), then update memory, in commit order under
        the state lock; returns once both are done. Nothing is learned before it is committed.
        Ends this thread's in-flight reservation of the request's ATP (the pacer has it as spent
        now, or it was not recorded)."""
        try:
            # a caller that holds the state lock already cannot wait for a batch's leader (who
            # needs the lock to apply it): its request commits alone, here, as before group commit
            alone = self.state._is_owned()
            with self.state:
                exps, updates = self._records(answer, outcomes)
                if alone:
                    return self._apply(answer, outcomes, exps, updates,
                                       self.store.record_many([(exps, updates)])[0])
            return self.commits.submit((answer, outcomes, exps, updates))
        finally:
            self.pacer.release()

    def _records(self, answer: Answer, outcomes: list[Outcome]) -> tuple[list[dict], list[TrustUpdate]]:
        """The experiences and trust updates of an answer (changing nothing: the in-memory trust
        is set from what the store writes, once it is committed)."""
        req, dec = answer.request, answer.decision
        calls = answer.calls
        conflict = 0.0
        if len(calls) >= 2:
            conflict = 0.0 if all(_same_answer(calls[0], c) for c in calls[1:]) else 1.0
        exps, updates, seen = [], [], {}
        # an answer shaped by stop strings or a JSON mode is not the plain messages' answer: never served for them
        key = None if req.options.shapes_text else fastpath_key(req.messages)
        for i, (c, o) in enumerate(zip(answer.calls, outcomes)):
            sn = snarc(dec.signals.surprise_z, dec.signals.novelty, req.priority, o.reward, conflict,
                       self.config.snarc_weights)
            g = c.generation
            exps.append(dict(
                request_id=req.request_id, run_id=self.run_id, item_key=req.item_key, role=c.role,
                conversation_id=req.conversation_id, turn=req.turn, prompt=req.prompt,
                tier=c.tier, model_version_id=c.model_version_id,
                response=c.text, prompt_tokens=g.prompt_tokens, completion_tokens=g.completion_tokens,
                cached_tokens=g.cached_tokens, prefill_s=g.prefill_s, decode_s=g.decode_s, latency_s=g.seconds,
                atp_joules=c.atp + (answer.surprise_atp if i == 0 else 0.0), mean_logprob=g.mean_logprob,
                confidence=c.confidence, context=dec.context, novelty=dec.signals.novelty, drift=dec.signals.drift,
                instability=dec.signals.instability, surprise=dec.signals.surprise if i == 0 else None,
                surprise_tier=answer.surprise_tier if i == 0 and dec.signals.surprise is not None else None,
                snarc_s=sn.s, snarc_n=sn.n, snarc_a=sn.a, snarc_r=sn.r, snarc_c=sn.c, salience=sn.salience,
                outcome=o.outcome, witness=o.witness, gold=o.gold, predicted=o.predicted, priority=req.priority,
                messages_hash=key, finish_reason=g.finish_reason))
            if o.reward is not None and c.model_version_id is not None:
                k = (c.model_version_id, dec.context)
                before, after = self.memory.trust.preview(*k, o.reward, seen.get(k))
                seen[k] = after
                updates.append(TrustUpdate(c.model_version_id, dec.context, before.alpha, before.beta,
                                           after.alpha, after.beta, after.count, [o.witness],
                                           f"{c.role} {o.outcome}", i, reward=o.reward, op="observe",
                                           gamma=self.memory.trust.gamma, prior=self.memory.trust.prior))
        return exps, updates

    def _apply(self, answer: Answer, outcomes: list[Outcome], exps: list[dict], updates: list[TrustUpdate],
               ids: list[int]) -> list[int]:
        """Under the state lock, once the records are committed (``ids``: the experiences'): learn."""
        req, dec = answer.request, answer.decision
        # the rows as the store holds them now: a verdict (feedback, under this lock) may have been
        # committed after this batch was written and before this apply, so the batch's own returned
        # rows can be stale; reread under the lock, they are the latest (other routers' included)
        for vid, ctx in dict.fromkeys((u.model_version_id, u.context) for u in updates):
            row = self.store.get_trust(vid, ctx)
            if row is not None:
                self.memory.trust.set(vid, ctx, TrustState(row.alpha, row.beta, row.count))
        self._remember(answer, outcomes, ids)
        self.pacer.update(answer.atp)
        (getattr(answer, "_policy", None) or self.policy_for(req)).update(dec, answer, outcomes)
        if self.responses is not None:
            for e, eid in zip(exps, ids):
                self.responses.observe_row({**e, "id": eid})
        return ids

    def _remember(self, answer: Answer, outcomes: list[Outcome], ids: list[int]) -> None:
        req, mem = answer.request, self.memory
        vec = getattr(answer, "_vec", None)
        if vec is None:
            vec = mem.encoder.encode(req.prompt)
        for c, o, eid in zip(answer.calls, outcomes, ids):
            ti = mem.tier_index[c.tier]
            value = OUTCOME_VALUE.get(o.outcome, math.nan)
            mem.exp_rows[eid] = mem.index.add(vec, ti, value, c.atp, eid, direct=c.role != "escalated")
            if c.role != "escalated" and o.outcome in OUTCOME_VALUE and c.model_version_id is not None:
                mem.direct_trust.observe(c.model_version_id, answer.decision.context, value)
            mem.tier_stats[c.tier].add(len(req.prompt), c.generation.prompt_tokens, c.atp)
            if c.role != "audit" and o.outcome in OUTCOME_VALUE:
                mem.calibration.add(ti, c.confidence, value)
        mem.learn_answers(req.prompt, answer.calls, [OUTCOME_VALUE.get(o.outcome, math.nan) for o in outcomes])
        sig = answer.decision.signals
        if sig.surprise is not None:
            mem.surprise[answer.surprise_tier or self.tiers[0]].add(sig.surprise)
        if req.conversation_id:
            mem.conversations[req.conversation_id] = vec
            mem.serving[req.conversation_id] = answer.tier
            self._queue_handoff(answer)

    # ---- warm handoff ----------------------------------------------------------------
    def _queue_handoff(self, answer: Answer) -> None:
        """After a surprising turn, queue a prefill of the tier above the one that answered."""
        z = answer.decision.signals.surprise_z
        if not (self.kv and self.handoff) or z is None or z < self.config.tau_surprise:
            return
        up = self.tiers.index(answer.tier) + 1
        if up >= len(self.tiers):
            return
        messages = list(answer.request.messages) + [{"role": "assistant", "content": answer.text}]
        self.kv.schedule(Prefill(self.tiers[up], answer.request.conversation_id, messages, self.run_id))

    def idle(self, max_jobs: int = 1) -> int:
        """Run up to ``max_jobs`` queued warm-handoff prefills (call when no request is in flight).

        Each evaluates the conversation's tokens the tier does not hold yet, stores its
        KV state, and is charged: its ATP goes to the budget pacer and the store's
        background work. A job whose tier is busy (its gate not free at once) is put back
        and the run ends there: idle work never waits for, nor delays, a request.
        Returns the number of jobs run.
        """
        done = 0
        while self.kv and self.kv.pending and done < max_jobs:
            with self.state:
                if not self.kv.pending:
                    break
                job = self.kv.pending.pop(0)
            if self.cooldown.cooling(job.tier) > 0:
                continue  # a cooling tier is not called, not even for a prefill (the turn pays it if needed)
            gate = self.gates[job.tier]
            if not gate.try_acquire():
                with self.state:
                    if not any((j.tier, j.conversation) == (job.tier, job.conversation) for j in self.kv.pending):
                        self.kv.pending.insert(0, job)
                break
            try:
                res = self.kv.run_prefill(job, self.backends[job.tier])
            finally:
                gate.release()
            done += 1
            if res is None:
                continue
            tokens, secs = res
            atp = self.memory.costs[job.tier].joules(tokens, 0)
            with self.state:
                self.pacer.charge(atp)
                if self.metabolic is not None:
                    self.metabolic.on_background(atp)
            self.store.record_background("prefill", job.tier, tokens, atp, secs,
                                         model_version_id=self.memory.versions.get(job.tier),
                                         conversation_id=job.conversation, run_id=job.run_id)
        return done
