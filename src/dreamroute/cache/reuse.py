"""Conversation KV reuse around backend calls: restore before a turn, save after, warm handoffs.

:class:`ConversationKV` is what the engine uses; it works with any backend of
the protocol (``prompt_tokens``, ``held_tokens``, ``state_tokens``,
``save_state``, ``load_state``). A backend without token-level state (a remote
server, a recording) raises BackendError there, and its tier simply gets no
reuse. Every cache failure (damaged or foreign file, full disk) is recorded in
:attr:`ConversationKV.errors` and costs only the prefill it would have saved.

Threads: restores and saves of different tiers may run at once (each inside its tier's gate);
the counters and errors take a lock of their own; the warm-handoff queue (``pending``) is the
engine's, changed under ``Engine.state``.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

from ..backends.base import Message, common_prefix
from ..errors import BackendError, CacheError
from .reality import RealityCache, restorable_prefix


@dataclass
class Restore:
    """What a restore did for one tier and turn.

    Attributes:
        tier: the tier.
        hit: a stored (or still held) state was reused.
        tokens: prompt tokens that need no evaluation (the reused prefix; 0 on a miss).
        source: ``"memory"`` (the backend still held the conversation), ``"disk"``
            (loaded from the cache), or None on a miss.
        reason: why it missed (no state yet, an earlier turn changed, a damaged
            file ...), None on a hit.
        seconds: time spent reading and loading the state.
    """

    tier: str
    hit: bool
    tokens: int = 0
    source: str | None = None
    reason: str | None = None
    seconds: float = 0.0


@dataclass
class Prefill:
    """A warm-handoff job: prefill ``tier`` with a conversation while the machine is idle."""

    tier: str
    conversation: str
    messages: list[Message]
    run_id: int | None = None


class ConversationKV:
    """Restores and saves per-conversation KV states of backends through a :class:`RealityCache`.

    Args:
        cache: where states live.
    """

    def __init__(self, cache: RealityCache):
        self.cache = cache
        self.errors: list[str] = []
        self.pending: list[Prefill] = []
        self.counts = {"hits": 0, "misses": 0, "saved": 0, "restored_tokens": 0}
        self._lock = threading.Lock()

    def _error(self, msg: str) -> None:
        with self._lock:
            self.errors.append(msg)
            del self.errors[:-100]

    def restore(self, tier: str, backend, conversation: str, messages: list[Message]) -> Restore:
        """Make ``backend`` hold the longest valid prefix of this conversation, if any.

        The state last stored for (backend identity, conversation) is reused when its
        tokens up to the end of its own prompt are a prefix of the new prompt
        (:func:`~dreamroute.cache.reality.restorable_prefix`); the backend then
        evaluates only the rest. If the backend still holds that conversation from the
        previous turn, nothing is read from disk. Never raises for cache problems.
        """
        t0 = time.perf_counter()
        try:
            prompt = backend.prompt_tokens(messages)
        except BackendError as e:
            return self._miss(tier, f"no token-level KV state: {e}", t0)
        try:
            c = self.cache.get(backend.identity, conversation)
        except CacheError as e:
            self._error(str(e))
            return self._miss(tier, str(e), t0)
        if c is None:
            return self._miss(tier, "no stored state for this conversation", t0)
        held = restorable_prefix(backend.held_tokens(), prompt, c.n_prompt)
        if held:
            return self._hit(tier, held, "memory", t0)
        try:
            state = c.read_state()
            p = restorable_prefix(backend.state_tokens(state), prompt, c.n_prompt)
            if not p:
                return self._miss(tier, "an earlier turn differs from the stored conversation", t0)
            backend.load_state(state)
        except (CacheError, BackendError) as e:
            self.cache.drop(backend.identity, conversation)
            self._error(str(e))
            return self._miss(tier, str(e), t0)
        return self._hit(tier, p, "disk", t0)

    def hold(self, tier: str, backend, conversation: str, messages: list[Message], restored: dict) -> None:
        """Inside the tier's gate, before a call: make ``backend`` hold the conversation, via
        :meth:`restore`, unless ``restored`` (tier → this request's :class:`Restore`) has one for
        the tier already (made while scoring surprise) and the backend still holds what it
        restored; another request may have used the tier since, and then it is restored again
        (``restored[tier]`` becomes the new one)."""
        r = restored.get(tier)
        if r is not None:
            if not r.hit:
                return
            try:
                if common_prefix(backend.held_tokens(), backend.prompt_tokens(messages)) >= r.tokens:
                    return
            except BackendError:
                return
        restored[tier] = self.restore(tier, backend, conversation, messages)

    def _hit(self, tier: str, tokens: int, source: str, t0: float) -> Restore:
        with self._lock:
            self.counts["hits"] += 1
            self.counts["restored_tokens"] += tokens
        return Restore(tier, True, tokens, source, None, time.perf_counter() - t0)

    def _miss(self, tier: str, reason: str, t0: float) -> Restore:
        with self._lock:
            self.counts["misses"] += 1
        return Restore(tier, False, 0, None, reason, time.perf_counter() - t0)

    def save(self, tier: str, backend, conversation: str, n_prompt: int) -> int | None:
        """Store what ``backend`` holds now as the conversation's state (``n_prompt``: tokens
        of the prompt just answered).

        First the backend settles its state (``settle()``: the answer's cells, decoded one
        token at a time, are re-evaluated as a batch, so a restore answers exactly as a cold
        prefill). Returns the number of tokens that re-evaluated (their ATP is the caller's
        to charge), or None (and records why) when the state could not be stored.
        """
        try:
            settled = backend.settle()
            state = backend.save_state()
            n_tokens = len(backend.held_tokens())
            self.cache.put(backend.identity, conversation, tier, state, n_tokens, n_prompt)
        except (BackendError, CacheError) as e:
            self._error(str(e))
            return None
        with self._lock:
            self.counts["saved"] += 1
        return settled

    # ------------------------------------------------------------------ warm handoff
    def schedule(self, job: Prefill) -> None:
        """Queue a warm-handoff prefill (one per (tier, conversation): the newest wins)."""
        self.pending = [j for j in self.pending if (j.tier, j.conversation) != (job.tier, job.conversation)]
        self.pending.append(job)

    def run_prefill(self, job: Prefill, backend) -> tuple[int, float] | None:
        """Prefill ``backend`` with the job's conversation and store its state.

        Restores what is stored for that tier first, so only new tokens are evaluated.
        Returns (tokens evaluated, seconds), or None when the backend cannot (no
        token-level state) or the cache write failed.
        """
        t0 = time.perf_counter()
        r = self.restore(job.tier, backend, job.conversation, job.messages)
        try:
            prompt = backend.prompt_tokens(job.messages)
            # the part a next turn shares: the rendered conversation without the generation prompt
            n_shared = common_prefix(prompt, backend.prompt_tokens(job.messages + [{"role": "user", "content": "."}]))
            backend.score(job.messages, new_only=True)  # evaluates the tokens not yet held
        except BackendError as e:
            self._error(str(e))
            return None
        if self.save(job.tier, backend, job.conversation, n_shared) is None:
            return None
        return len(prompt) - r.tokens, time.perf_counter() - t0

