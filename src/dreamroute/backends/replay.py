"""The replay backend: answers from recorded outcomes instead of running a model.

``dreamroute simulate`` drives the real router (the same :class:`~dreamroute.router.engine.Engine`
as live runs) over a :class:`~dreamroute.eval.recorded_set.RecordedSet`, with one
:class:`ReplayBackend` per recorded tier. All tiers' backends share one
:class:`ReplayCursor`; before each request the driver selects the item::

    backends, cursor = replay_backends(recorded)
    for item in recorded.items:
        cursor.select(item.key)              # or backends[t].select(item.key): same cursor
        answer = engine.answer(Request([{"role": "user", "content": item.prompt}], ...))
        # only now, after the router committed, look the grades up in `recorded`

``generate`` checks that the last user message is exactly the selected item's
prompt (:class:`~dreamroute.errors.BackendError` otherwise: replay never
answers a different question) and returns that tier's recorded response.

What the router can see is what a live call would give it: the text, token
counts (0 when unknown), the recorded wall seconds as ``decode_s`` and the
recorded mean logprob in ``extra``. The recorded grade is never put in the
:class:`~dreamroute.backends.base.Generation`; the driver reads it from the
RecordedSet after the answer.

ATP: the engine charges a replayed call like a live one, from its token counts
with the tier's calibration (DESIGN.md), or from seconds where counts are
missing. ``extra["atp_joules"]`` (which the engine uses instead) is set only
where the source fixes the cost itself: RouteLLM's 1 (strong) / 0 (weak), or a
recorded ATP on a line with no token counts.

There are no prompt logprobs in a recorded source, so :meth:`ReplayBackend.score`
raises BackendError (surprise is missing, not zero), and there is no KV state
(:meth:`save_state` / :meth:`load_state` raise BackendError). Replayed calls
have no prefix cache: ``cached_tokens`` is 0.
"""

from __future__ import annotations

from collections import Counter
from typing import Callable, Sequence

from ..errors import BackendError, OptionError
from .base import CancelCheck, Generation, Message
from .options import cancel_now, check_options

__all__ = ["ReplayBackend", "ReplayCursor", "replay_backends"]


class ReplayCursor:
    """The item being replayed, shared by every tier's :class:`ReplayBackend`.

    Attributes:
        recorded: the :class:`~dreamroute.eval.recorded_set.RecordedSet`.
        key: the selected item's key (None before the first :meth:`select`).
        calls: generate() calls per tier over the whole replay.
        item_calls: tiers called for the selected item, in order (reset by :meth:`select`).
        log: (item key, tier) of every generate() call, in order.
    """

    def __init__(self, recorded):
        self.recorded = recorded
        self.key: str | None = None
        self._item = None
        self.calls: Counter[str] = Counter()
        self.item_calls: list[str] = []
        self.log: list[tuple[str, str]] = []

    def select(self, key: str) -> None:
        """Make ``key`` the item the next generate() calls answer.

        Raises:
            BackendError: no recorded item has this key.
        """
        try:
            item = self.recorded.get(key)
        except KeyError:
            raise BackendError(f"replay: no recorded item has key {key!r} in {self.recorded.name}; "
                               "select the key of an item of the recorded set") from None
        self.key, self._item = key, item
        self.item_calls = []

    def clear(self) -> None:
        """Select nothing: generate() refuses until the next :meth:`select`."""
        self.key, self._item = None, None
        self.item_calls = []

    @property
    def item(self):
        """The selected :class:`~dreamroute.eval.recorded_set.RecordedItem` (BackendError when none)."""
        if self._item is None:
            raise BackendError("replay: no item selected; call select(item_key) before each request")
        return self._item


class ReplayBackend:
    """A :class:`~dreamroute.backends.base.Backend` answering from one tier's recorded calls.

    Args:
        tier: a tier of ``recorded``.
        recorded: the :class:`~dreamroute.eval.recorded_set.RecordedSet`.
        identity: the model identity (default ``recorded:<model>@<digest[:12]>``).
        cursor: the shared :class:`ReplayCursor` (default: a new one; use
            :func:`replay_backends` to build all tiers with one cursor).

    Attributes:
        calls: generate() calls made on this tier.
        load_s: always 0.0 (nothing to load).

    Raises:
        ValueError: ``tier`` is not a tier of the set, or ``cursor`` belongs to another set.
    """

    def __init__(self, tier: str, recorded, identity: str | None = None, *, cursor: ReplayCursor | None = None):
        if tier not in recorded.tiers:
            raise ValueError(f"tier {tier!r} is not in the recorded set {recorded.name} "
                             f"(its tiers: {', '.join(recorded.tiers)})")
        if cursor is not None and cursor.recorded is not recorded:
            raise ValueError("the cursor replays another recorded set")
        self.tier = tier
        self.recorded = recorded
        self.model = recorded.models.get(tier) or (recorded.items[0].calls[tier].model if recorded.items else "")
        self.identity = identity or f"recorded:{self.model or tier}@{recorded.digest[:12]}"
        self.cursor = cursor if cursor is not None else ReplayCursor(recorded)
        self.calls = 0
        self.load_s = 0.0

    def select(self, key: str) -> None:
        """Select the item to answer (on the shared cursor, so for every tier)."""
        self.cursor.select(key)

    def load(self) -> None:
        """Nothing to load."""

    def close(self) -> None:
        """Nothing to release."""

    def generate(self, messages: list[Message], *, max_tokens: int = 320,
                 temperature: float = 0.0, seed: int = 0, stop: Sequence[str] | None = None,
                 logprobs: bool = False, top_logprobs: int = 0, response_format: dict | None = None,
                 cancel: CancelCheck | None = None, on_text: Callable[[str], None] | None = None) -> Generation:
        """The selected item's recorded response of this tier.

        Temperature and seed are ignored (a recording has one answer);
        ``finish_reason`` is ``"length"`` when the recorded completion filled
        ``max_tokens``. A recording was made without stop strings, per-token logprobs
        or a JSON mode, and its token counts and grade belong to that answer, so asking
        for any of them is refused rather than faked. ``cancel`` is checked once, before
        answering (a replayed answer takes no time); ``on_text`` gets the recorded text in one
        piece.

        Raises:
            BackendError: no item selected, or the last user message is not the
                selected item's prompt.
            OptionError: ``stop``, ``logprobs`` / ``top_logprobs`` or a JSON
                ``response_format`` was asked (``param`` names it).
            GenerationCancelled: ``cancel`` returned True.
        """
        opts = check_options(stop=stop, logprobs=logprobs, top_logprobs=top_logprobs,
                             response_format=response_format)
        for param, asked in (("stop", opts.stop), ("logprobs", opts.logprobs), ("response_format", opts.json_mode)):
            if asked:
                raise OptionError(f"replay tier {self.tier!r}: a recorded answer cannot honour {param} "
                                  "(it was recorded without it); ask without it", param)
        cancel_now(cancel)
        item = self.cursor.item
        last = next((m.get("content") for m in reversed(messages) if m.get("role") == "user"), None)
        if last != item.prompt:
            raise BackendError(
                f"replay tier {self.tier!r}: the request is not the selected item {item.key!r} "
                f"(asked {str(last)[:60]!r}, recorded {item.prompt[:60]!r}); replay only answers the "
                "recorded question: select the item of this prompt first")
        rc = item.calls[self.tier]
        self.calls += 1
        self.cursor.calls[self.tier] += 1
        self.cursor.item_calls.append(self.tier)
        self.cursor.log.append((item.key, self.tier))
        pt, ct = rc.prompt_tokens or 0, rc.completion_tokens or 0
        extra: dict = {"mean_logprob": rc.mean_logprob, "recorded": True}
        fixed = self.recorded.kind == "routellm" or (rc.prompt_tokens is None and rc.completion_tokens is None)
        if fixed and rc.atp_joules is not None:
            extra["atp_joules"] = float(rc.atp_joules)
        finish = "length" if rc.completion_tokens is not None and max_tokens and ct >= max_tokens else "stop"
        if on_text is not None and rc.response:
            on_text(rc.response)
        return Generation(text=rc.response or "", prompt_tokens=pt, completion_tokens=ct, token_logprobs=None,
                          prefill_s=0.0, decode_s=float(rc.seconds or 0.0), finish_reason=finish,
                          cached_tokens=0, model=self.identity, extra=extra)

    def score(self, messages: list[Message], *, new_only: bool = False) -> list[float]:
        """Always raises: a recorded source has no prompt logprobs (surprise is missing)."""
        raise BackendError("recorded source has no prompt logprobs")

    def prompt_tokens(self, messages: list[Message]) -> list:
        """Always raises BackendError: no token-level access (no KV state to reuse)."""
        raise BackendError(f"replay tier {self.tier!r}: a recorded source has no token-level KV state")

    def held_tokens(self) -> list:
        """Always []: no KV state is held here."""
        return []

    def state_tokens(self, state: bytes) -> list:
        """Always raises BackendError: no KV state."""
        raise BackendError(f"replay tier {self.tier!r}: a recorded source has no token-level KV state")

    def settle(self) -> int:
        """Nothing to re-evaluate here (no numerics differ between decode paths): 0."""
        return 0

    def save_state(self) -> bytes:
        """Always raises: a recorded source has no KV state."""
        raise BackendError(f"replay tier {self.tier!r}: a recorded source has no KV state to save")

    def load_state(self, state: bytes) -> None:
        """Always raises: a recorded source has no KV state."""
        raise BackendError(f"replay tier {self.tier!r}: a recorded source has no KV state to restore")


def replay_backends(recorded, identities: dict[str, str] | None = None
                    ) -> tuple[dict[str, ReplayBackend], ReplayCursor]:
    """One :class:`ReplayBackend` per tier of ``recorded`` (cheapest first), all sharing one cursor.

    Args:
        identities: tier → identity, overriding the default per tier.
    """
    cursor = ReplayCursor(recorded)
    ids = identities or {}
    return {t: ReplayBackend(t, recorded, ids.get(t), cursor=cursor) for t in recorded.tiers}, cursor
