"""The engine's senses: a request's signals, and the surprise scoring they may need.

Its own file because it is the step before deciding (DESIGN.md step 3): from the prompt's
neighbourhood and conversation it computes novelty, drift and instability under the state
lock, and, when the policy or a follow-up turn needs it, surprise, the one backend call made
before a tier is chosen (under that tier's gate, never holding the lock), with its own
failure handling. :class:`~dreamroute.router.engine.Engine` takes it as a mixin; it depends
on the engine's attributes only (never on its module), so the dependency runs one way.

With a reality cache, a follow-up turn's surprise is scored under the tier that served the
conversation, on the new tokens only, as they are prefilled; the tier answering it next
reuses that prefill.
"""

from __future__ import annotations

import time

from ..errors import BackendError, TierBusyError
from ..signals.features import Signals, classify_context, drift, instability, novelty
from .policy_base import Policy
from .types import Request


class Sensing:
    """The signal and surprise methods of :class:`~dreamroute.router.engine.Engine` (a mixin).

    Uses the engine's ``state``, ``store``, ``memory``, ``config``, ``kv``, ``tiers``,
    ``backends``, ``cooldown``, ``faults`` and its ``_run`` and ``_gate``.
    """

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
