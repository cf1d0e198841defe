"""The engine: one loop for every request, live or replayed (DESIGN.md steps 3–7).

    signals → policy.route → call → [escalate → call]* → [audit → call]
    → (later, once judged) outcomes → experiences + trust + ledger in one
      transaction → memory, pacing and policy updates

An outcome is never visible before the policy has committed: ``answer``
returns before anything is judged, and ``learn`` takes the gold answer or a
witness afterwards.

With a reality cache (:class:`~dreamroute.cache.reuse.ConversationKV`), each
call of a conversation turn first restores that tier's stored KV state, and
saves it after answering; a follow-up turn's surprise is scored under the
tier that served the conversation, on the new tokens only, as they are
prefilled; a surprising turn queues a warm handoff (the next tier up
prefilled with the conversation), which :meth:`Engine.idle` runs when the
machine has nothing else to do.

Faults (:mod:`dreamroute.router.faults`): a failed backend call (BackendError,
TimeoutError) is logged and recorded (``background_work`` kind ``failed_call``:
its seconds, status and message, no ATP) and its tier cooled down
(:class:`~dreamroute.router.cooldown.Cooldown`; an upstream's Retry-After sets how
long); a cooling tier is not called for anything. ``Request.tier`` pins a tier
(routed as ``always:TIER``): it answers or the request fails. With ``cooldown_s``
set (the server, ``run``), a routed call falls back to the cheapest available tier
the budget allows (in CRISIS: the highest, whatever the budget). A response cache
(``responses``) is kept current here.

``Request.options`` (stop strings, logprobs, a JSON mode) go to every call of the request;
an answer shaped by stop strings or a JSON mode is stored without a fast-path key.
``Request.cancel`` is polled by the backends: a GenerationCancelled (not a backend failure:
no fallback, no cooldown) ends the request with nothing learned or stored as an answer, its
ATP charged to the budget and recorded as ``background_work`` kind ``cancelled``.

Concurrency (:mod:`dreamroute.router.gate`): ``answer`` / ``learn`` / ``idle`` may run in many
threads at once. A request's own state (restores, timings, its fault plan) is kept per thread. The
learned state (memory, index, pacer, policy and its RNG, trust, response cache, cooldown, metabolic
controller, warm-handoff queue) is guarded by one re-entrant lock, :attr:`Engine.state`, held to
decide and to learn, never while a backend call runs. Every backend call (generate, surprise
scoring, a warm-handoff prefill) goes through its tier's gate; a full queue or a wait past
``Request.queue_timeout_s`` raises TierBusyError (no cooldown or fallback; a busy escalation keeps
the answer it had, a busy audit is dropped). A turn's KV restore, generation and save happen in one
gate turn. ``Request.on_text`` streams a pinned request's text as it is generated.

Learning is a group commit (:mod:`dreamroute.router.commit`): a request's records are built
under the state lock, written with those of the requests that finish meanwhile in one
transaction (one fsync) without the lock, then applied to the learned state in commit order
under it; the request returns once its records are committed and learned.
"""

from __future__ import annotations

import math
import threading
import time
from typing import Callable

from ..backends.base import Backend
from ..cache.response import ResponseCache, fastpath_key
from ..cache.reuse import ConversationKV, Prefill
from ..errors import BackendError, GenerationCancelled, RequestError, TierBusyError, UnknownTierError
from ..eval.graders import get_grader
from ..signals import Signals, classify_context, drift, instability, novelty, snarc
from ..store.store import TrustUpdate
from ..trust import TrustState
from .memory import OUTCOME_VALUE, BudgetPacer, Memory
from .commit import GroupCommit
from .cooldown import Cooldown
from .faults import Faults
from .gate import RequestState, TierGate, gated
from .policies import AlwaysPolicy, Policy, RouteView
from .types import Answer, Call, FailedCall, Outcome, Request


def normalise_prompt(text: str) -> str:
    """Casefolded, whitespace-collapsed prompt (the exact-repeat key)."""
    return " ".join(text.casefold().split())


def confidence(call_text: str, mean_logprob: float | None, grader_name: str | None) -> float | None:
    """exp(mean token logprob) × (1 if the answer is in the expected form else 0.5).

    With no logprobs the form alone gives 1.0 or 0.5; with neither (or an
    empty response, e.g. a recording that kept only grades), None.
    """
    if not call_text.strip() and mean_logprob is None:
        return None
    form = None
    if grader_name:
        form = 1.0 if get_grader(grader_name).well_formed(call_text) else 0.5
    if mean_logprob is None:
        return form
    p = math.exp(max(-50.0, mean_logprob))
    return p * (form if form is not None else 1.0)


class Engine:
    """Drives a policy over a hierarchy of backends and records what happens.

    Args:
        tiers: tier names, cheapest first.
        backends: tier → Backend.
        store: a :class:`~dreamroute.store.store.Store`.
        memory: learned state (:class:`Memory`), already loaded from the store.
        policy: the routing policy.
        pacer: budget pacing (shared across the run).
        run_id: the run experiences are filed under, if any.
        kv: the reality cache glue (None: no conversation KV reuse).
        handoff: queue warm handoffs after surprising turns (needs ``kv``).
        responses: the fast path's response cache, kept current here (None: none).
        cooldown_s: fall back from a failing backend and skip its tier this long, s
            (None: a backend failure fails the request; an upstream's Retry-After still cools it).
        gates: tier → :class:`~dreamroute.router.gate.TierGate` (None: one call at a time per
            tier, a queue of 64; ``DreamRoute`` builds them from each tier's ``max_in_flight`` and
            ``max_queue``).

    Attributes:
        state: the re-entrant lock of the learned state (see the module docstring); code outside
            the engine that reads or changes memory, pacer, trust or policy takes it too.
        gates: tier → its gate.
        cooldown: the :class:`Cooldown` of failing tiers.
        faults: the :class:`~dreamroute.router.faults.Faults` rules (fallback, budget, records).
        on_failure: called with each :class:`FailedCall` (the server counts them).
    """

    def __init__(self, tiers, backends: dict[str, Backend], store, memory: Memory, policy: Policy,
                 pacer: BudgetPacer, run_id: int | None = None, kv: ConversationKV | None = None,
                 handoff: bool = True, responses: ResponseCache | None = None,
                 cooldown_s: float | None = None, gates: dict[str, TierGate] | None = None):
        self.tiers = list(tiers)
        self.state = threading.RLock()
        self.gates = gates if gates is not None else {t: TierGate(t, 1, 64) for t in self.tiers}
        self._local = threading.local()  # the current request of each thread (see _run)
        self.backends = backends
        self.store = store
        self.memory = memory
        self.policy = policy
        self.pacer = pacer
        self.run_id = run_id
        self.config = memory.config
        self.kv = kv
        self.handoff = handoff
        self.responses = responses
        self.cooldown = Cooldown(self.tiers, cooldown_s)
        self.on_failure: Callable[[FailedCall], None] | None = None
        self.metabolic = None  # a MetabolicController (the server's): knobs per request, ATP spent
        self._forced: dict[str, Policy] = {}
        self.faults = Faults(self)
        self.commits = GroupCommit(lambda batch: self.store.record_many([(e, u) for _, _, e, u in batch]),
                                   lambda item, ids: self._apply(*item, ids), self.state)

    def policy_for(self, request: Request) -> Policy:
        """The engine's policy, or ``always:TIER`` for a request that forces a tier.
        Raises UnknownTierError for a forced tier the hierarchy lacks."""
        return self.policy if request.tier is None else self._always(request.tier)

    def _always(self, tier: str) -> Policy:
        with self.state:
            if tier not in self._forced:
                self._forced[tier] = AlwaysPolicy(self.tiers, tier)
            return self._forced[tier]

    # ---- the current request and the tier gates --------------------------------------
    @property
    def _run(self) -> RequestState:
        """This thread's request: its restores, timings, deadline (set by :meth:`answer`)."""
        run = getattr(self._local, "run", None)
        if run is None:
            run = self._local.run = RequestState()
        return run

    def _gate(self, tier: str, request: Request):
        """``with self._gate(tier, request):`` one call on ``tier`` in its turn (:func:`gated`)."""
        return gated(self.gates[tier], self._run, request.cancel)

    # ---- deciding and calling --------------------------------------------------------
    def _signals(self, request: Request, vec, hood, policy: Policy) -> tuple[Signals, float, float, str | None]:
        """Signals, the ATP of surprise scoring (J), its model seconds, and the tier that scored it.
        Takes the state lock, but not while scoring surprise."""
        with self.state:
            if request.conversation_id:  # after a restart: its serving tier and last turn, from the store
                self.memory.recall_conversation(self.store, request.conversation_id)
            prev = self.memory.conversations.get(request.conversation_id) if request.conversation_id else None
            n = novelty(hood.sims)
            u = instability(self.memory.index.outcome[hood.rows_all]) if len(hood.rows_all) else 0.0
            d = drift(vec, prev)
        surprise, z, atp, secs, tier = None, None, 0.0, 0.0, None
        follow_up = self._follow_up(request)
        if self.config.surprise and (follow_up or getattr(policy, "needs_surprise", False)):
            # a follow-up's surprise comes with the prefill its serving tier needs anyway
            surprise, atp, secs, tier = self._surprise(request)
            if surprise is not None:
                with self.state:
                    z = self.memory.surprise[tier].z(surprise)
        return Signals(n, d, u, surprise, z, classify_context(n, u, d, z, self.config)), atp, secs, tier

    def _follow_up(self, request: Request) -> bool:
        """A later turn of a conversation, with a reality cache to restore it from."""
        return bool(self.kv and request.conversation_id and request.turn > 0)

    def _surprise(self, request: Request) -> tuple[float | None, float, float, str]:
        """Mean NLL per token of the new prompt text, the ATP it cost (J), its seconds, the tier.

        A single request (or a conversation without a reality cache) is scored whole
        under the cheapest tier. A follow-up turn with a reality cache is scored under
        the tier that served the conversation, after restoring its KV state, on the
        tokens not held yet (the new turn) as they are prefilled: the tier answering
        it next reuses that prefill. A backend that cannot score (a remote server
        without prompt logprobs, a recorded source) gives None: missing, not zero; so
        does a tier that is cooling down (it is not called), and one that times out or
        whose upstream refuses as overloaded (429/503, Retry-After) is cooled and its
        failure recorded. A tier whose queue is full (TierBusyError) is not waited for: missing.
        Seconds and CPU time are those of the scoring, not of waiting for the tier's turn.
        """
        tier = self.tiers[0]
        conv = request.conversation_id
        follow_up = self._follow_up(request)
        if follow_up:
            tier = self.memory.serving.get(conv, tier)
        run = self._run
        t0, c0 = time.perf_counter(), time.thread_time()
        lps, secs, cpu = None, 0.0, 0.0
        if self.cooldown.cooling(tier) == 0:
            try:
                with self._gate(tier, request):
                    t0, c0 = time.perf_counter(), time.thread_time()
                    try:
                        if follow_up:
                            run.restored[tier] = self.kv.restore(tier, self.backends[tier], conv, request.messages)
                        lps = self.backends[tier].score(request.messages, new_only=follow_up)
                    finally:
                        secs, cpu = time.perf_counter() - t0, time.thread_time() - c0
            except TierBusyError:
                pass  # the scoring tier is saturated: surprise is missing, the request goes on
            except (BackendError, TimeoutError) as e:  # recorded outside the gate (it takes the state lock)
                if isinstance(e, TimeoutError) or e.overloaded:
                    self.faults.record(tier, "surprise", request, e, secs)
        run.surprise_cpu_s = cpu
        if not lps:
            return None, 0.0, secs, tier
        atp = self.memory.costs[tier].joules(len(lps) + 1, 0)  # the first token, or the one re-read
        return -sum(lps) / len(lps), atp, secs, tier

    def _call(self, tier: str, role: str, request: Request) -> Call:
        try:
            backend = self.backends[tier]
        except KeyError:
            raise UnknownTierError(tier, self.tiers) from None
        conv = request.conversation_id if self.kv is not None else None
        kw = request.options.kwargs()
        if request.cancel is not None:
            kw["cancel"] = request.cancel
        if request.on_text is not None and request.tier is not None:
            kw["on_text"] = request.on_text  # a pinned request: its one call is its answer
        with self._gate(tier, request):  # restore, generate and save within one turn of the tier
            if conv:  # restored here, or again if another call used the tier since surprise scoring
                self.kv.hold(tier, backend, conv, request.messages, self._run.restored)
            try:
                gen = backend.generate(request.messages, max_tokens=request.max_tokens, **kw)
            except GenerationCancelled as e:  # what the stopped call had done is charged (_cancelled)
                e.tier = tier
                e.atp = self.memory.costs[tier].joules(e.prompt_tokens, e.completion_tokens, e.cached_tokens)
                raise
            settled = self.kv.save(tier, backend, conv, gen.prompt_tokens) if conv else None
        cost = self.memory.costs[tier]
        if gen.prompt_tokens or gen.completion_tokens:
            atp = cost.joules(gen.prompt_tokens, gen.completion_tokens, gen.cached_tokens)
        else:
            atp = cost.joules_from_seconds(gen.seconds)
        if settled:  # the answer's KV re-evaluated as a batch before it was stored: a prefill
            atp += cost.joules(settled, 0)
        if "atp_joules" in gen.extra:  # a recorded source that fixes its own cost (RouteLLM: 0 / 1)
            atp = float(gen.extra["atp_joules"])
        grader = get_grader(request.grader) if request.grader else None
        predicted = grader.extract(gen.text) if grader else None
        return Call(tier, role, gen, atp, confidence(gen.text, gen.mean_logprob, request.grader), predicted,
                    self.memory.versions.get(tier))

    def _call_or_fall_back(self, tier: str, role: str, request: Request) -> Call | None:
        """:meth:`_call` under the fault rules (:meth:`Faults.call`): None for a dropped audit or an
        escalation with nowhere to go. Raises TierError / TierCoolingError (a pinned tier) or
        NoTierAvailableError (a routed request no tier can answer within the budget)."""
        return self.faults.call(tier, role, request, self._call)

    def answer(self, request: Request) -> Answer:
        """Route and answer one request (no outcome is judged here).

        Raises RequestError for a request with no user text or max_tokens < 1; TierBusyError when
        its first tier has no room (queue full, or waited past ``request.queue_timeout_s``).
        Safe to call from many threads at once (see the module docstring).
        """
        if not request.prompt.strip():
            raise RequestError("the request has no user message text; send a non-empty prompt")
        if request.max_tokens < 1:
            raise RequestError(f"max_tokens must be >= 1, got {request.max_tokens}")
        t0, c0 = time.perf_counter(), time.thread_time()
        run = self._local.run = RequestState(request.queue_timeout_s)
        self.faults.begin()
        policy = self.policy_for(request)
        vec = self.memory.encoder.encode(request.prompt)
        with self.state:
            hood = self.memory.neighbourhood(vec)
        signals, surprise_atp, surprise_s, surprise_tier = self._signals(request, vec, hood, policy)
        with self.state:
            knobs = self._knobs(request, signals)
            crisis = knobs is not None and knobs.force_tier is not None
            if crisis and request.tier is None:
                policy = self._always(knobs.force_tier)  # CRISIS: the top tier, whatever the budget
            view = RouteView(signals, hood, self.memory, self.pacer,
                             sum(len(m.get("content", "")) for m in request.messages), request.prompt,
                             available=self.cooldown.available(),
                             lam_scale=knobs.lam_scale if knobs is not None else 1.0,
                             quality_floor=knobs.quality_floor if knobs is not None else None)
            decision = policy.route(request, view)
            # until it is learned, this request's expected ATP counts as spent for the others (InFlight)
            self.pacer.reserve(surprise_atp + (decision.expected_atp.get(decision.tier) or 0.0))
        t1, c1 = time.perf_counter(), time.thread_time()
        decision.overhead_ms = ((t1 - t0) - surprise_s - run.wait_s) * 1e3
        decision.overhead_cpu_ms = ((c1 - c0) - run.surprise_cpu_s) * 1e3
        calls: list[Call] = []
        pinned = request.tier is not None or (isinstance(policy, AlwaysPolicy) and not crisis)

        def spent() -> float:
            return surprise_atp + sum(c.atp for c in calls)

        def expected(t: str) -> float:
            e = decision.expected_atp.get(t)
            return e if e is not None else self.memory.expected_atp(hood, t, view.prompt_chars, request.max_tokens)

        self.faults.plan(pinned=pinned, crisis=crisis, spent=spent, expected=expected)

        def escalation() -> str | None:
            with self.state:
                view.available = self.cooldown.available()  # a tier that failed meanwhile is not escalated to
                nxt = policy.escalate(decision, calls[-1], view)
                self.pacer.reserve(spent() + (expected(nxt) if nxt is not None else 0.0))
                return nxt

        try:
            calls.append(self._call_or_fall_back(decision.tier, "chosen", request))
            while (nxt := escalation()) is not None:
                if (call := self._call_or_fall_back(nxt, "escalated", request)) is None:
                    break
                calls.append(call)
            final = calls[-1]
            up = self.tiers.index(final.tier) + 1
            with self.state:
                audit = decision.audit and up < len(self.tiers) and self.pacer.allows(sum(c.atp for c in calls))
                if audit:
                    self.pacer.reserve(spent() + expected(self.tiers[up]))
            if audit and (call := self._call_or_fall_back(self.tiers[up], "audit", request)) is not None:
                calls.append(call)
        except GenerationCancelled as e:
            self.pacer.release()
            self._cancelled(e, request, surprise_atp + sum(c.atp for c in calls), decision.tier)
            raise
        except BaseException:
            self.pacer.release()
            raise
        answer = Answer(request, decision, calls, surprise_atp, surprise_tier=surprise_tier,
                        surprise_s=surprise_s, kv=dict(run.restored), failures=list(self.faults.failures))
        if knobs is not None:
            answer.metabolic_state = knobs.state.value
            with self.state:
                self.metabolic.on_answer(answer.atp)
        answer._vec, answer._policy = vec, policy  # kept for learn()
        self.pacer.reserve(answer.atp)  # what it did spend, until learn() charges it
        return answer

    def _cancelled(self, e: GenerationCancelled, request: Request, spent: float, tier: str) -> None:
        """A request stopped by its cancel check: nothing of it is an answer (no experience, trust
        or ledger entry), but the ATP it spent (surprise scoring, the calls that finished, the
        stopped call's tokens so far) is charged to the budget and recorded as background work
        of kind ``cancelled``; ``e.atp`` becomes that total, J. A request that left while waiting
        for its first tier's turn, having spent nothing, never ran: nothing is recorded."""
        e.atp += spent
        if e.queued and e.atp == 0 and e.prompt_tokens + e.completion_tokens == 0:
            return
        with self.state:
            self.pacer.charge(e.atp)
            if self.metabolic is not None:
                self.metabolic.on_background(e.atp)
        self.store.record_background("cancelled", e.tier or tier, e.prompt_tokens + e.completion_tokens, e.atp,
                                     e.seconds, model_version_id=self.memory.versions.get(e.tier or tier),
                                     conversation_id=request.conversation_id, run_id=self.run_id)

    def _knobs(self, request: Request, signals: Signals):
        """The metabolic controller's knobs for this request, from its pre-answer salience
        (SNARC with the outcome unknown and no conflict yet), or None without a controller."""
        if self.metabolic is None:
            return None
        pre = snarc(signals.surprise_z, signals.novelty, request.priority, None, 0.0, self.config.snarc_weights)
        return self.metabolic.on_request(request.priority, pre.salience)

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

    def handle(self, request: Request, gold: str | None = None) -> tuple[Answer, list[Outcome]]:
        """answer → judge → learn, for one request."""
        ans = self.answer(request)
        outcomes = self.judge(ans, gold)
        self.learn(ans, outcomes)
        return ans, outcomes


def _same_answer(a: Call, b: Call) -> bool:
    if a.predicted is not None or b.predicted is not None:
        return a.predicted is not None and a.predicted == b.predicted
    return normalise_prompt(a.text) == normalise_prompt(b.text)
