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

Judging and learning (a group commit), and the warm handoffs, are the engine's learning side:
:class:`~dreamroute.router.learning.Learning`, a mixin of :class:`Engine`; so are a request's
signals and surprise scoring (:class:`~dreamroute.router.sensing.Sensing`).
"""

from __future__ import annotations

import math
import threading
import time
from typing import Callable

from ..backends.base import Backend
from ..cache.response import ResponseCache
from ..cache.reuse import ConversationKV
from ..errors import GenerationCancelled, RequestError, UnknownTierError
from ..grading import get_grader
from ..signals.features import Signals, snarc
from .baselines import AlwaysPolicy
from .commit import GroupCommit
from .cooldown import Cooldown
from .dual_pacer import BudgetPacer
from .faults import Faults
from .gate import RequestState, TierGate, gated
from .learning import Learning
from .memory import Memory
from .policy_base import Policy, RouteView
from .sensing import Sensing
from .types import Answer, Call, FailedCall, Outcome, Request


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


class Engine(Sensing, Learning):
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

    def handle(self, request: Request, gold: str | None = None) -> tuple[Answer, list[Outcome]]:
        """answer → judge → learn, for one request."""
        ans = self.answer(request)
        outcomes = self.judge(ans, gold)
        self.learn(ans, outcomes)
        return ans, outcomes
