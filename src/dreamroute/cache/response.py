"""The response cache behind the fast path (DESIGN.md, "Routing a request", step 1).

An exact repeat of a conversation whose answer has a witnessed success on
record (ground truth, user feedback, an agreeing audit) is answered from here,
before the router, at no model cost. The key (:func:`fastpath_key`) is the
whole message list exactly as the models receive it: each message's role and
content, in order, nothing normalised. Two requests share an answer only when
they cannot have different ones, and anything a model reads can change its
answer: whitespace inside content carries meaning (code, tables, verse: "a  b"
is not "a b"), so does leading and trailing whitespace, and so does the
Unicode form (an NFC and an NFD "é" are different bytes, tokenised differently
by a byte-level BPE tokenizer such as SmolLM2's or Qwen's, which llama.cpp does
not normalise). Case is kept, and a negated, reordered or reworded question,
another system prompt or another earlier turn is another key. What is ignored
never reaches a model: message fields other than ``role`` and ``content`` (the
server passes only those; it also joins a content list of text parts and reads
``developer`` as ``system`` before the key is taken). Keys stored before
migration 9 were taken with whitespace collapsed; they were moved to
``experiences.messages_hash_v1`` and are never looked up.

:func:`messages_key` (whitespace and Unicode form normalised) is the server's
conversation key for deriving conversation ids, where a lenient match costs
nothing (a KV state is reused only when its tokens match); it is not the fast
path's.

A failure on record for the cached answer (feedback, a later grade of the same
answer) removes it. The cache is rebuilt from the store at start
(:meth:`ResponseCache.load`) and kept current by the engine (after each
request is learned, and on feedback). Plain Python, no web framework: the
engine, :class:`~dreamroute.DreamRoute` and the server all use it.
"""

from __future__ import annotations

import hashlib
import json
import threading
import unicodedata
from collections import OrderedDict
from dataclasses import dataclass

from ..backends.base import Message


def normalise_text(text: str) -> str:
    """Unicode NFC, whitespace runs collapsed to one space, ends stripped; case kept."""
    return " ".join(unicodedata.normalize("NFC", text).split())


def normalise_messages(messages: list[Message]) -> list[tuple[str, str]]:
    """``[(role, normalised content), ...]`` of a chat, in order (other message fields ignored)."""
    return [(str(m.get("role", "user")), normalise_text(str(m.get("content") or ""))) for m in messages]


def messages_key(messages: list[Message]) -> str:
    """sha256 hex of the normalised message list (:func:`normalise_messages`): the key the
    server derives conversation ids from. Not the fast path's key (:func:`fastpath_key`)."""
    blob = json.dumps(normalise_messages(messages), ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def fastpath_key(messages: list[Message]) -> str:
    """The fast path's (and the store's ``experiences.messages_hash``) key of a whole
    conversation: sha256 hex (64 chars) of the JSON list ``[[role, content], ...]`` with
    each content exactly as given (a missing role is ``user``, a missing or None content
    ``""``, as the backends read them; nothing else normalised). JSON quoting keeps the
    encoding injective: two message lists share a key only when every role and content
    is equal (or sha256 collides)."""
    items = [[str(m.get("role", "user")), m.get("content") or ""] for m in messages]
    items = [[r, c if isinstance(c, str) else str(c)] for r, c in items]
    blob = json.dumps(items, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class CachedAnswer:
    """An answer the fast path may serve.

    Attributes:
        key: :func:`fastpath_key` of the conversation it answers.
        request_id: the request that produced it (feedback on a hit goes to it).
        experience_id: its stored experience.
        text: the answer.
        tier / context: who answered it, in which context.
        prompt_tokens / completion_tokens: its token counts when it was generated.
        witness: who judged it a success (``ground_truth``, ``user:api``, ``audit:TIER`` ...).
    """

    key: str
    request_id: str
    experience_id: int
    text: str
    tier: str
    context: str
    prompt_tokens: int
    completion_tokens: int
    witness: str


class ResponseCache:
    """Witnessed-success answers by conversation key, least recently used evicted past ``max_entries``.

    Thread-safe: a lookup takes a lock held for a dict access (microseconds), so it can run on
    the server's event loop while the engine updates the cache from a worker thread.

    Args:
        max_entries: most answers kept (>= 1).
    """

    def __init__(self, max_entries: int = 100_000):
        if max_entries < 1:
            raise ValueError(f"max_entries must be >= 1, got {max_entries}")
        self.max_entries = max_entries
        self._entries: OrderedDict[str, CachedAnswer] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: str) -> bool:
        return key in self._entries

    # ---- serving ------------------------------------------------------------------------
    def get(self, messages: list[Message], *, max_tokens: int | None = None,
            tier: str | None = None) -> CachedAnswer | None:
        """The cached answer of exactly this conversation, or None.

        Args:
            messages: the request's chat (keyed exactly, :func:`fastpath_key`).
            max_tokens: the request's generation limit: an answer longer than it (in its own
                completion tokens) is a miss rather than a cut answer.
            tier: a forced tier (``model: TIER``): only that tier's answer is served.
        """
        key = fastpath_key(messages)
        with self._lock:
            hit = self._entries.get(key)
            if hit is None:
                return None
            if (max_tokens is not None and hit.completion_tokens > max_tokens) or (tier and hit.tier != tier):
                return None
            self._entries.move_to_end(key)
            return hit

    # ---- keeping it current -------------------------------------------------------------
    def observe(self, key: str, request_id: str, experience_id: int, text: str, tier: str, context: str,
                prompt_tokens: int, completion_tokens: int, outcome: str, witness: str,
                finish_reason: str | None = "stop") -> None:
        """One judged answer to conversation ``key``, in the order they happened.

        ``success`` (with a witness) makes it the key's answer, unless generation was cut off
        (``finish_reason`` ``length``: a client asking for more tokens must not get the fragment);
        ``failure`` removes the key's answer when it is this one (same normalised text, or the
        same experience); ``unknown`` does nothing.
        """
        if outcome == "success" and witness and witness != "none" and text.strip() and finish_reason != "length":
            entry = CachedAnswer(key, request_id, experience_id, text, tier, context, int(prompt_tokens),
                                 int(completion_tokens), witness)
            with self._lock:
                self._entries[key] = entry
                self._entries.move_to_end(key)
                while len(self._entries) > self.max_entries:
                    self._entries.popitem(last=False)
        elif outcome == "failure":
            with self._lock:
                cur = self._entries.get(key)
                if cur is not None and (cur.experience_id == experience_id
                                        or normalise_text(cur.text) == normalise_text(text)):
                    del self._entries[key]

    def observe_row(self, row: dict) -> None:
        """:meth:`observe` from a store row (``Store.judged_answers`` or ``experiences_for_request``)."""
        if row.get("messages_hash") and row.get("role", "chosen") != "audit":
            self.observe(row["messages_hash"], row["request_id"], row["id"], row["response"] or "",
                         row["tier"], row["context"], row["prompt_tokens"] or 0, row["completion_tokens"] or 0,
                         row["outcome"], row["witness"], row.get("finish_reason"))

    def load(self, store) -> int:
        """Rebuild from the store's judged answers (``Store.judged_answers``), oldest first, so
        the latest verdict on each answer wins. Returns the number of answers cached."""
        with self._lock:
            self._entries.clear()
        for row in store.judged_answers():
            self.observe_row(row)
        return len(self)

    def drop_request(self, request_id: str) -> int:
        """Remove every answer that request ``request_id`` produced; returns how many."""
        with self._lock:
            keys = [k for k, v in self._entries.items() if v.request_id == request_id]
            for k in keys:
                del self._entries[k]
        return len(keys)
