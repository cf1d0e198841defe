"""A deterministic backend for tests: answers from a script, counts and times from rules.

Nothing sleeps (unless ``realtime``) and nothing is random, so router, store and metabolism
tests can assert exact tokens, seconds and ATP.

Generation options are honoured on the script's words: ``stop`` cuts the answer before the
earliest stop string, generating word by word as a model would; ``logprobs`` gives each word
(with the space before it) as a token; ``top_logprobs`` lists the word first, then synthetic
alternatives ``<alt1>``, ``<alt2>`` ... each half as likely as the one before and never more
likely than the word (so the distribution stays below 1 and the word is the greedy choice);
a JSON ``response_format`` cannot steer a script, so the answer is checked instead
(:func:`~dreamroute.backends.options.json_problem`) and one that is not what it asks for
raises BackendError.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from typing import Callable, Sequence, Union

from ..errors import BackendError
from .base import CancelCheck, Generation, Message, TokenLogprob, common_prefix
from .options import TextEmitter, cancel_now, check_options, earliest_stop, json_problem, trim_details

Script = Union[Callable[[list[Message]], str], dict[str, str], Sequence[str]]
LogprobRule = Union[float, Callable[[str, int], float]]
_MAGIC = b"DRSCRIPT1\n"


def whitespace_tokens(text: str) -> list[str]:
    """The scripted tokenizer: ``text.split()``."""
    return text.split()


def prompt_tokens(messages: list[Message]) -> list[str]:
    """The scripted chat template, as tokens: ``<role>`` then the content's words for
    each message, then ``<assistant>`` (the generation prompt)."""
    out: list[str] = []
    for m in messages:
        out.append(f"<{m.get('role', 'user')}>")
        out.extend(whitespace_tokens(m.get("content") or ""))
    out.append("<assistant>")
    return out


def rule_logprob(token: str, seen: bool) -> float:
    """The fixed score rule: ``-0.5`` for a token already seen earlier in the
    prompt, else ``-(1 + 0.1 * min(len(token), 20))`` (natural log)."""
    return -0.5 if seen else -(1.0 + 0.1 * min(len(token), 20))


class ScriptedBackend:
    """A :class:`~dreamroute.backends.base.Backend` whose answers come from a script.

    Args:
        identity: the model identity (KV states and trust are keyed by it).
        script: a function of the messages returning the answer; or a dict from
            the last user message's content to the answer; or a list of answers
            returned in order, one per generate() call.
        prefill_s_per_token: seconds charged per prompt token not already cached.
        decode_s_per_token: seconds charged per completion token.
        logprob: natural-log probability of each generated token (``<= 0``), or
            a function ``(token, index) -> float``.
        default: the answer when a dict script has no entry (``None``: raise).
        realtime: really take the seconds charged (sleep the prefill, then each token's
            decode time), polling the cancel check between tokens: a slow backend for
            cancellation and concurrency tests.

    Attributes:
        calls: the messages of every generate() call, in order.
        load_s: always 0.0 (nothing to load).

    Token counts use a whitespace tokenizer (:func:`prompt_tokens`); cached
    prompt tokens are the prefix shared with the tokens held from the previous
    call (or restored by :meth:`load_state`), like llama.cpp's prefix reuse.
    """

    def __init__(self, identity: str, script: Script, *, prefill_s_per_token: float = 0.001,
                 decode_s_per_token: float = 0.01, logprob: LogprobRule = -0.1,
                 default: str | None = None, realtime: bool = False):
        if not callable(script) and not isinstance(script, (dict, list, tuple)):
            raise TypeError("script must be a function of the messages, a dict or a list of answers")
        if not callable(logprob) and logprob > 0:
            raise ValueError(f"logprob must be <= 0 (a natural-log probability), got {logprob}")
        if prefill_s_per_token < 0 or decode_s_per_token < 0:
            raise ValueError("per-token seconds must be >= 0")
        self.identity = identity
        self.script = script
        self.prefill_s_per_token = float(prefill_s_per_token)
        self.decode_s_per_token = float(decode_s_per_token)
        self.logprob = logprob
        self.default = default
        self.realtime = bool(realtime)
        self.calls: list[list[Message]] = []
        self.load_s = 0.0
        self._next = 0
        self._history: list[str] = []

    # ------------------------------------------------------------------ answers

    def _answer(self, messages: list[Message]) -> str:
        if callable(self.script):
            return str(self.script(messages))
        if isinstance(self.script, dict):
            last = next((m.get("content", "") for m in reversed(messages) if m.get("role") == "user"), "")
            if last in self.script:
                return self.script[last]
            if self.default is not None:
                return self.default
            raise BackendError(f"scripted backend {self.identity!r} has no answer for {last[:60]!r}")
        if self._next >= len(self.script):
            raise BackendError(f"scripted backend {self.identity!r} has used all "
                               f"{len(self.script)} scripted answers")
        answer = self.script[self._next]
        self._next += 1
        return answer

    def _token_logprob(self, token: str, index: int) -> float:
        v = float(self.logprob(token, index)) if callable(self.logprob) else float(self.logprob)
        if v > 0:
            raise BackendError(f"scripted backend {self.identity!r}: logprob rule gave {v} > 0")
        return v

    # ------------------------------------------------------------------ protocol

    def load(self) -> None:
        """Nothing to load (kept for the same lifecycle as real backends)."""

    def close(self) -> None:
        """Forget the held tokens (like freeing a KV cache)."""
        self._history = []

    def reset(self) -> None:
        """Forget the held tokens: the next call has nothing cached."""
        self._history = []

    def generate(self, messages: list[Message], *, max_tokens: int = 320,
                 temperature: float = 0.0, seed: int = 0, stop: Sequence[str] | None = None,
                 logprobs: bool = False, top_logprobs: int = 0, response_format: dict | None = None,
                 cancel: CancelCheck | None = None, on_text: Callable[[str], None] | None = None) -> Generation:
        """Answer from the script (temperature and seed are ignored: always deterministic).

        The answer is generated word by word: cut to ``max_tokens`` whitespace tokens
        (``finish_reason`` ``"length"``), or before the earliest ``stop`` string once the words
        so far contain one (``"stop"``; the word that completed it counts as generated).
        Seconds are per-token rates × counts (slept too with ``realtime``). Options are
        honoured as the module docstring says. ``on_text`` gets the text word by word as it is
        generated (:class:`~dreamroute.backends.options.TextEmitter`; with a JSON
        ``response_format``, whole once the answer has been checked).

        Raises:
            BackendError: the script has no answer, the logprob rule gives a value > 0, or the
                answer is not what a JSON ``response_format`` asks for.
            OptionError: an option out of range (:func:`~dreamroute.backends.options.check_options`).
            GenerationCancelled: ``cancel`` returned True (before the call, or between words).
        """
        opts = check_options(stop=stop, logprobs=logprobs, top_logprobs=top_logprobs,
                             response_format=response_format)
        t0 = time.perf_counter()
        prompt = prompt_tokens(messages)
        cached = common_prefix(self._history, prompt)
        cancel_now(cancel, prompt_tokens=len(prompt), cached_tokens=cached)
        self.calls.append([dict(m) for m in messages])
        answer = self._answer(messages)
        if self.realtime:
            time.sleep((len(prompt) - cached) * self.prefill_s_per_token)
        words, lps, finish, text = [], [], "stop", None
        emit = TextEmitter(on_text, opts.stop)
        limit = max_tokens if max_tokens is not None and max_tokens > 0 else None
        for w in whitespace_tokens(answer):
            if limit is not None and len(words) >= limit:
                finish = "length"
                break
            cancel_now(cancel, prompt_tokens=len(prompt), completion_tokens=len(words), cached_tokens=cached,
                       seconds=time.perf_counter() - t0)
            if self.realtime:
                time.sleep(self.decode_s_per_token)
            words.append(w)
            lps.append(self._token_logprob(w, len(lps)))
            if opts.stop and (cut := earliest_stop(" ".join(words), opts.stop)) is not None:
                text = " ".join(words)[:cut]
                break
            if not opts.json_mode:
                emit.update(" ".join(words))
        full = " ".join(words)
        text = full if text is None else text
        if (problem := json_problem(text, opts.response_format)) is not None:
            raise BackendError(f"scripted backend {self.identity!r}: its scripted answer is {problem}, not what "
                               f"response_format {opts.response_format.get('type')!r} asks for (a script cannot "
                               "be constrained; script a JSON answer)")
        emit.finish(text)
        details = None
        if opts.logprobs:
            details = trim_details([self._detail(w, i, lp, opts.top_logprobs) for i, (w, lp)
                                    in enumerate(zip(words, lps))], len(text.encode("utf-8")))
        self._history = prompt + words
        return Generation(
            text=text, prompt_tokens=len(prompt), completion_tokens=len(words),
            token_logprobs=lps, prefill_s=(len(prompt) - cached) * self.prefill_s_per_token,
            decode_s=len(words) * self.decode_s_per_token, finish_reason=finish,
            cached_tokens=cached, model=self.identity, token_details=details)

    @staticmethod
    def _detail(word: str, index: int, lp: float, k: int) -> TokenLogprob:
        """A word as a token (with the space before it, so the tokens join to the text) and,
        with ``k``, the word plus ``k - 1`` synthetic alternatives (see the module docstring)."""
        tok = word if index == 0 else " " + word
        top: tuple[TokenLogprob, ...] = ()
        if k:
            p = math.exp(lp)
            share = min(p, 1.0 - p)
            alts = [TokenLogprob(f"<alt{j}>", f"<alt{j}>".encode(), max(math.log(share * 0.5 ** j), -9999.0)
                                 if share > 0 else -9999.0) for j in range(1, k)]
            top = (TokenLogprob(tok, tok.encode("utf-8"), lp), *alts)
        return TokenLogprob(tok, tok.encode("utf-8"), lp, top)

    def score(self, messages: list[Message], *, new_only: bool = False) -> list[float]:
        """Per-token log-probabilities of the prompt after its first token, by
        :func:`rule_logprob` (length ``prompt_tokens - 1``; with ``new_only`` only the
        tokens after the prefix already held). Leaves the prompt held, so a following
        generate() of the same messages has it all cached."""
        prompt = prompt_tokens(messages)
        held = common_prefix(self._history, prompt)
        seen: set[str] = set()
        out: list[float] = []
        for i, tok in enumerate(prompt):
            if i > 0 and (not new_only or i >= held):
                out.append(rule_logprob(tok, tok in seen))
            seen.add(tok)
        self._history = list(prompt)
        return out

    def prompt_tokens(self, messages: list[Message]) -> list[str]:
        """The prompt as this backend tokenizes it (:func:`prompt_tokens`)."""
        return prompt_tokens(messages)

    def held_tokens(self) -> list[str]:
        """The tokens held now (the previous call's prompt and answer, or a restored state)."""
        return list(self._history)

    def state_tokens(self, state: bytes) -> list[str]:
        """The tokens a :meth:`save_state` result holds. Raises BackendError like :meth:`load_state`."""
        return self._parse(state)

    def settle(self) -> int:
        """Nothing to re-evaluate here (no numerics differ between decode paths): 0."""
        return 0

    def save_state(self) -> bytes:
        """The held tokens as checksummed JSON bytes, tagged with the identity."""
        body = _MAGIC + json.dumps({"identity": self.identity, "tokens": self._history}).encode()
        return body + hashlib.sha256(body).digest()

    def load_state(self, state: bytes) -> None:
        """Restore held tokens from :meth:`save_state`.

        Raises:
            BackendError: truncated or damaged bytes, or another identity.
        """
        self._history = self._parse(state)

    def _parse(self, state: bytes) -> list[str]:
        data = bytes(state)
        body, digest = data[:-32], data[-32:]
        if (len(data) < len(_MAGIC) + 32 or not body.startswith(_MAGIC)
                or hashlib.sha256(body).digest() != digest):
            raise BackendError(f"scripted backend {self.identity!r}: the state is truncated or damaged")
        rec = json.loads(body[len(_MAGIC):])
        if rec.get("identity") != self.identity:
            raise BackendError(f"scripted backend {self.identity!r}: the state was saved by "
                               f"{rec.get('identity')!r}; it cannot be restored here")
        return [str(t) for t in rec.get("tokens", [])]
